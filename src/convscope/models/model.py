"""The :class:`Model`: a network together with the preprocessing and labels that belong to it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import InputShapeError, TargetError, suggestion
from ..images import ImageLike, load_image
from ..probe import choose_layer, guard, layer_table, module_device, resolve_layer
from .labels import default_labels

#: ImageNet's channel mean and standard deviation (pixels in [0, 1]): the default normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass
class Prediction:
    """The top classes for one image: indices, names and softmax probabilities, best first."""

    indices: list[int]
    labels: list[str]
    probabilities: list[float]

    def __iter__(self):
        return iter(zip(self.indices, self.labels, self.probabilities))

    def __str__(self) -> str:
        return "\n".join(f"{p:7.2%}  {i:4d}  {name}" for i, name, p in self)


@dataclass(eq=False)
class Model:
    """A classifier with its own preprocessing and class names.

    Build one with :func:`convscope.load_model`. ``module`` is kept in eval mode. Images go in through
    :meth:`preprocess` (resize the shorter side to ``resize_size``, centre-crop ``input_size``,
    normalise with ``mean``/``std``) and come back through :meth:`deprocess`.
    """

    module: nn.Module = field(repr=False)
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    labels: list[str] | None = field(default=None, repr=False)  # None: counted by one dry run when first read
    name: str = "model"
    resize_size: int | None = None
    interpolation: str = "bilinear"
    source: str = ""
    #: Channels an input tensor must have (``None``: any; plain modules wrapped by :func:`as_model`).
    channels: int | None = 3
    #: Put the module in eval mode now (``load_model``); ``False`` leaves the user's module as it is
    #: (:func:`as_model`: every capability runs it under :class:`~convscope.probe.guard`, which restores it).
    set_eval: bool = field(default=True, repr=False)
    _layer_cache: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.input_size, int):
            self.input_size = (self.input_size, self.input_size)
        self.input_size = (int(self.input_size[0]), int(self.input_size[1]))
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        if self.resize_size is None:
            self.resize_size = round(min(self.input_size) / 0.875)
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {', '.join(_RESAMPLE)}")
        if self.set_eval:
            self.module.eval()

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        """Where the module's parameters (or buffers) live."""
        return module_device(self.module)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def _get_labels(self) -> list[str]:
        if self._labels is None:
            self._labels = default_labels(count_classes(self.module, self.input_size, self.channels or 3) or 1000)
        return self._labels

    def _set_labels(self, value: Any) -> None:
        self._labels = None if value is None else list(value)

    def to(self, device: str | torch.device) -> Model:
        """Move the module to ``device`` (in place) and return ``self``."""
        self.module.to(device)
        return self

    # ------------------------------------------------------------------ images
    def transform_image(self, img: ImageLike) -> Image.Image:
        """The picture the network sees: resized and centre-cropped, before normalisation."""
        img = load_image(img)
        h, w = self.input_size
        short = self.resize_size or min(h, w)
        scale = short / min(img.size)
        new = (max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale)))
        if new != img.size:
            img = img.resize(new, _RESAMPLE[self.interpolation])
        left, top = (new[0] - w) // 2, (new[1] - h) // 2
        return img.crop((left, top, left + w, top + h))

    def preprocess(self, img: ImageLike | list[ImageLike]) -> torch.Tensor:
        """Image (path, PIL, array, ``sample:NAME``) or list of them -> float tensor (N, 3, H, W) on the device."""
        images = img if isinstance(img, (list, tuple)) else [img]
        arrays = [np.asarray(self.transform_image(i), dtype=np.float32) / 255.0 for i in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous().to(self.device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Undo normalisation: preprocessed tensor -> pixel values in [0, 1] (not clipped)."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x * std + mean

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise pixel values in [0, 1] into the model's input space."""
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def deprocess(self, x: torch.Tensor) -> Image.Image | list[Image.Image]:
        """Preprocessed tensor (3, H, W) or (N, 3, H, W) -> PIL image (a list for N > 1)."""
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputShapeError(f"expected a tensor (N, 3, H, W), got {tuple(x.shape)}")
        pixels = self.to_pixels(x.detach().float()).clamp(0, 1)
        arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        images = [Image.fromarray(a) for a in arrays]
        return images[0] if len(images) == 1 else images

    # ------------------------------------------------------------------ inference
    def as_input(self, x: torch.Tensor | ImageLike) -> torch.Tensor:
        """Accept an image or a tensor; return a validated (N, 3, H, W) float tensor on the device."""
        if not isinstance(x, torch.Tensor):
            return self.preprocess(x)
        return check_input(x, device=self.device, channels=self.channels)

    @torch.no_grad()
    def logits(self, x: torch.Tensor | ImageLike) -> torch.Tensor:
        """Pre-softmax class scores (N, classes)."""
        x = self.as_input(x)
        return output_logits(self.module(x))

    def predict(self, x: torch.Tensor | ImageLike, top: int = 5) -> list[Prediction]:
        """The ``top`` most probable classes of every image in the batch."""
        if top < 1:
            raise TargetError("--top must be at least 1")
        probs = self.logits(x).softmax(dim=1)
        top = min(top, probs.shape[1])
        values, indices = probs.topk(top, dim=1)
        return [
            Prediction(idx.tolist(), [self.label(i) for i in idx.tolist()], val.tolist())
            for val, idx in zip(values, indices)
        ]

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else f"class {index}"

    def class_index(self, target: int | str) -> int:
        """A class index from an int or a label (exact, then unique substring match)."""
        return resolve_class(target, self.labels)

    # ------------------------------------------------------------------ layers
    def layers(self, input_size: tuple[int, int] | None = None):
        """Every named layer in forward order, with output shape, parameters and receptive field.

        Returns a list of :class:`convscope.probe.LayerInfo`; computed with one dry run at ``input_size``
        (default: the model's) and cached for the model's own size.
        """
        size = tuple(input_size) if input_size is not None else self.input_size
        if size != self.input_size:
            return layer_table(self.module, (1, self.channels or 3, *size))
        if self._layer_cache is None:
            self._layer_cache = layer_table(self.module, (1, self.channels or 3, *self.input_size))
        return self._layer_cache

    def layer(self, name: str) -> nn.Module:
        """The submodule called ``name``; unknown names raise an error suggesting close ones."""
        return resolve_layer(self.module, name)

    def _repr_html_(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        return (
            f"<b>{self.name}</b>: {n:,} parameters, input {self.input_size[0]}x{self.input_size[1]}, "
            f"{len(self.labels)} classes, on {self.device}"
        )


Model.labels = property(Model._get_labels, Model._set_labels, doc="Class names, index = class id.")  # type: ignore[assignment]

#: Preprocessing assumed for a plain ``nn.Module`` (wrapped by :func:`as_model` or ``load_model(module)``)
#: unless the caller says otherwise: ImageNet's mean and std, 224 px inputs (shorter side resized to 256).
PLAIN_MODULE_DEFAULTS: dict[str, Any] = {"input_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def as_model(model: Model | nn.Module, *, input_size: int | tuple[int, int] | None = None) -> Model:
    """The one answer to "Model or plain module?": every public entry point calls this first.

    A :class:`Model` comes back as it is. A plain ``nn.Module`` is wrapped with
    :data:`PLAIN_MODULE_DEFAULTS` (ImageNet mean/std, 224 px or ``input_size``), numbered or ImageNet
    labels counted lazily by one dry run when first needed, any input channel count, and its train/eval
    mode, device and parameters left untouched. To give a module other preprocessing or labels, wrap it
    yourself with ``cs.load_model(module, input_size=..., mean=..., std=..., labels=...)``.
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        size = input_size if input_size is not None else PLAIN_MODULE_DEFAULTS["input_size"]
        return Model(module=model, input_size=size, mean=PLAIN_MODULE_DEFAULTS["mean"], std=PLAIN_MODULE_DEFAULTS["std"],
                     labels=None, name=type(model).__name__, source="module", channels=None, set_eval=False)
    raise TypeError(f"expected a convscope Model or an nn.Module, got {type(model).__name__}")


def default_layer(model: Model | nn.Module, kind: str = "cam") -> str:
    """A sensible layer of ``model`` (a :class:`Model` or a plain module) for a method family:
    ``"cam"`` (the last spatial layer with the most channels, e.g. ``bn2`` on EfficientNet-Lite0,
    ``layer4`` on ResNet) or ``"first_conv"``; see :func:`convscope.probe.choose_layer`."""
    return choose_layer(as_model(model).layers(), kind)


def count_classes(module: nn.Module, size: int | tuple[int, int], channels: int = 3) -> int | None:
    """Number of class scores, from one dry run on a black image under :class:`~convscope.probe.guard`
    (the module is left as it was); falls back to the last linear layer's width; ``None`` if both fail."""
    h, w = (size, size) if isinstance(size, int) else size
    try:
        with guard(module, eval=True, freeze=True, no_inplace=False), torch.no_grad():
            out = output_logits(module(torch.zeros(1, channels, h, w, device=module_device(module))))
        if out.ndim == 2:
            return int(out.shape[-1])
    except Exception:  # a module that cannot take this input: fall back to its layers
        pass
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
            last = m.out_channels if last is None else last
    return last


def model_fingerprint(module: nn.Module) -> dict[str, Any]:
    """A cheap identity of a model's weights (class, tensor count and size, sum of |w|), stored with saved
    run states so a resumed run refuses another model."""
    tensors = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    with torch.no_grad():
        sums = [t.detach().double().abs().sum().cpu() for t in tensors]
    return {"class": type(module).__name__, "tensors": len(tensors), "numel": sum(t.numel() for t in tensors),
            "abs_sum": float(torch.stack(sums).sum()) if sums else 0.0}


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`model_fingerprint` records name the same weights (sums equal to 1e-6)."""
    if {k: a.get(k) for k in ("class", "tensors", "numel")} != {k: b.get(k) for k in ("class", "tensors", "numel")}:
        return False
    return math.isclose(float(a.get("abs_sum", 0)), float(b.get("abs_sum", 0)), rel_tol=1e-6, abs_tol=1e-9)


def check_input(x: torch.Tensor, *, device: torch.device | None = None, channels: int | None = 3) -> torch.Tensor:
    """Validate a model input: 4-D (a 3-D tensor gets a batch axis), floating point, finite."""
    if not isinstance(x, torch.Tensor):
        raise InputShapeError(f"expected a tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise InputShapeError(f"expected an input of shape (N, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise InputShapeError(f"expected {channels} channels, got input of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputShapeError(f"expected a floating-point input, got {x.dtype}; use model.preprocess")
    if not torch.isfinite(x).all():
        raise InputShapeError("input holds NaN or infinite values")
    return x.to(device) if device is not None else x


def output_logits(out: Any) -> torch.Tensor:
    """The class scores in a model's output: a tensor, or the first tensor of a tuple/dict/object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for key in ("logits", "out", "output"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise InputShapeError(f"cannot find class scores in the model's output of type {type(out).__name__}")


def resolve_class(target: int | str, labels: list[str]) -> int:
    """Class index from an int, a numeric string or a label name; out-of-range gives a clear error."""
    n = len(labels)
    if isinstance(target, str):
        t = target.strip()
        if t.lstrip("-").isdigit():
            target = int(t)
        else:
            lowered = t.lower()
            exact = [i for i, name in enumerate(labels) if name.lower() == lowered]
            if exact:
                return exact[0]
            partial = [i for i, name in enumerate(labels) if lowered in name.lower()]
            if len(partial) == 1:
                return partial[0]
            if partial:
                shown = ", ".join(f"{i} ({labels[i]})" for i in partial[:6])
                raise TargetError(f"class {target!r} is ambiguous: {shown}")
            raise TargetError(f"unknown class {target!r}{suggestion(t, labels)}")
    if isinstance(target, torch.Tensor):
        target = int(target.item())
    if not isinstance(target, (int, np.integer)) or isinstance(target, bool):
        raise TargetError(f"class must be an int or a label, got {type(target).__name__}")
    if not 0 <= int(target) < n:
        raise TargetError(f"class index {target} is out of range: the model has {n} classes (0..{n - 1})")
    return int(target)
