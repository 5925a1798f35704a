"""How a network's filters and representations change over training (Zeiler & Fergus 2014, fig. 4; Kornblith et al. 2019).

:func:`evolution` takes checkpoints of one architecture in training order (files, :class:`~convscope.Model`
objects or ``nn.Module`` objects) and measures, for every checkpoint and every chosen layer (default: every
``Conv2d``):

- **weight drift**: ``||W_t - W_ref|| / ||W_ref||`` (L2 over the whole weight tensor, biases left out) with
  ``W_ref`` the previous checkpoint's weights (:attr:`Evolution.drift_previous`) and the final one's
  (:attr:`Evolution.drift_final`);
- **filter cosine**: per output filter, the cosine similarity of its weights with the same filter (same index)
  of the final checkpoint; :attr:`Evolution.filter_cosine` holds the mean over the filters. Filters keep their
  index during training, so this says how much each filter still has to turn; a filter of norm zero has
  cosine 0 with anything;
- **representation similarity**: linear CKA (Kornblith, Norouzi, Lee & Hinton, ICML 2019, "Similarity of Neural
  Network Representations Revisited") between the layer's activations at the checkpoint and at the final
  checkpoint (:attr:`Evolution.cka`) and at the previous one (:attr:`Evolution.cka_previous`), on a probe set
  of images. CKA is invariant to orthogonal transforms and isotropic scaling of the features, hence to
  permutations of channels, which cosine of filters by index is not;
- **agreement**: the fraction of probe images whose top-1 class equals the final checkpoint's (and accuracy
  when ``targets`` are given), for models whose output is a vector of class scores.

Features for CKA: ``features="pooled"`` (default) takes each image's layer output globally average-pooled
(one value per channel, N x C); ``features="spatial"`` average-pools the maps to a ``grid x grid`` layout and
flattens it (N x C*grid^2), which also sees *where* things are. CKA is computed in its kernel form: for the
n probe images (n <= ``max_images``) the centred linear Gram matrix ``K = Xc Xc^T`` (n x n, ``Xc`` the
features minus their mean over images; equal to ``H X X^T H`` with the centring matrix ``H = I - 11^T/n``)
and ``CKA(K, L) = <K, L>_F / (||K||_F ||L||_F)``. The kernel form is what allows one model at a time: the
feature form ``||Xc^T Yc||^2`` needs both models' features side by side, while each checkpoint's n x n Gram
is computed alone and compared later. Memory: per layer the n x n Grams of the final and the previous
checkpoint, the current checkpoint's features for the n probe images (n x C, which is at most max(n, C)^2),
and CPU copies of the chosen layers' weights of the previous and the final checkpoint.

Order of work: the final checkpoint is measured first (everything is compared to it), then the others in
training order, each loaded, measured and freed before the next is loaded. Each checkpoint's probe pass is one
run of the dataset engine (:func:`convscope.dataset.engine.run`) with a :class:`ProbeFeatures` reducer: the
per-layer features (and top-1 class) of every probe image, kept by input position, turned into Gram matrices
when the pass ends. The probe set is the first ``max_images`` inputs; an unreadable one is skipped and listed
(:attr:`Evolution.skipped`), never fatal. Checkpoints given as modules are run inside
:class:`~convscope.probe.Capture` (eval mode, hooks removed, everything restored afterwards).

Resuming: with ``state=PATH`` everything the remaining checkpoints need (the measured table rows, cosines and
kernels, the final and the previous checkpoint's weights and Gram matrices, the probe positions) is saved
atomically after each checkpoint, in one :class:`~convscope.dataset.engine.StateStore` file. The same call
again skips the checkpoints done and gives the same :class:`Evolution` as one uninterrupted run; a state of
other checkpoints, probe images or options is refused with the reason. Checkpoint files are recognised by
path, size and modification time (:func:`checkpoint_identity`), so a resume never loads a checkpoint only to
check it; checkpoints in memory by their weights' fingerprint.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .. import models  # models.load_model looked up at call time (tests replace it to watch loading)
from ..errors import InputShapeError, LayerKindError, LayerNotFoundError, suggestion
from ..images import SAMPLES
from ..models import Model, as_model, check_input, model_fingerprint
from ..options import Option
from ..probe import resolve_layer
from ..progress import tqdm
from ..render import figure_to_image, matrix_grid, titled
from ..render.picture import Pictured
from .engine import MODEL_PREPROCESSING, Forward, Reducer, RunInfo, StateStore
from .engine import run as run_engine
from .folder import BATCH_SIZE, DatasetError, ImageSource, SkippedImagesWarning, StateFileError

FEATURES = ("pooled", "spatial")
#: Filters per layer whose kernels are kept for :meth:`Evolution.filters_image`.
KEEP_FILTERS = 64
#: Probe images used at most: every layer holds two n x n float64 Gram matrices (10,000 -> 0.8 GB each).
MAX_IMAGES = Option(int, 256, "probe images at most", minimum=2, maximum=10_000)
#: Side of the pooled grid of ``features="spatial"``.
GRID = Option(int, 4, "side of the pooled map of spatial CKA features", minimum=1, maximum=64)


class EvolutionError(DatasetError):
    """Checkpoints that cannot be compared (different architectures, fewer than two) or a bad option."""


# ============================================================================ CKA


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """The centred linear kernel ``H X X^T H`` of features ``x`` (n, d), computed as ``Xc Xc^T`` in float64."""
    x = x.detach().double().flatten(1)
    xc = x - x.mean(0, keepdim=True)
    return xc @ xc.T


def gram_cka(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 - the paper's names
    """Linear CKA from two centred Gram matrices (n, n): ``<K, L>_F / (||K||_F ||L||_F)``.

    NaN when either representation is constant over the images (a zero Gram matrix).
    """
    if k.shape != l.shape:
        raise EvolutionError(f"Gram matrices of different sizes {tuple(k.shape)} and {tuple(l.shape)}: different probe images")
    k, l = k.double(), l.to(k.device).double()  # noqa: E741
    denom = float(k.norm() * l.norm())
    if denom == 0.0 or not math.isfinite(denom):
        return float("nan")
    return float((k * l).sum()) / denom


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same n inputs.

    ``x`` (n, d1), ``y`` (n, d2): rows are inputs (more dimensions are flattened). Equals
    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with linear kernels ``K = X X^T``, ``L = Y Y^T`` and
    ``HSIC(K, L) = tr(K H L H) / (n - 1)^2``; in [0, 1], 1 for identical representations and invariant to
    orthogonal transforms and isotropic scaling of either.
    """
    if x.shape[0] != y.shape[0]:
        raise EvolutionError(f"CKA compares the same inputs: {x.shape[0]} rows against {y.shape[0]}")
    if x.shape[0] < 2:
        raise EvolutionError("CKA needs at least 2 inputs")
    return gram_cka(centered_gram(x), centered_gram(y))


# ============================================================================ result


@dataclass(eq=False)
class Evolution(Pictured):
    """Filters and representations of one architecture across training checkpoints.

    Tables are float64 tensors (checkpoints, layers) in the order of :attr:`checkpoints` and :attr:`layers`;
    NaN where a value does not exist (``drift_previous``/``cka_previous`` of the first checkpoint) or was not
    measured (checkpoints left after an interruption).

    - ``drift_previous``, ``drift_final``: relative L2 change of the layer's weights from the previous / final
      checkpoint (0 = unchanged; 1 = a change as large as the reference weights).
    - ``filter_cosine``: mean over filters of the cosine similarity of each filter to the same filter of the
      final checkpoint (1 = every filter points the final way); ``filter_cosines[c][layer]``: all of them.
    - ``cka``, ``cka_previous``: linear CKA of the layer's activations on the probe images with the final /
      previous checkpoint's (1 = the same representation up to rotation and scale).
    - ``agreement`` (checkpoints,): fraction of probe images whose top-1 class equals the final
      checkpoint's; ``accuracy``: fraction equal to ``targets``; ``None`` without a classifier output / targets.
    - ``images``: n, the probe images used; ``features``: ``"pooled"`` or ``"spatial"`` (``grid``).
    - ``kernels[layer]``: (checkpoints, F, 3, kh, kw) for layers reading RGB, else (checkpoints, F, kh, kw),
      the kernel slice of each filter's strongest input channel in the final checkpoint (``strongest``);
      F <= :data:`KEEP_FILTERS`. ``interrupted``: Ctrl-C stopped the run; ``done``: checkpoints measured.
    - ``skipped``: (position, reason) of the unreadable probe inputs (left out of every checkpoint's pass);
      ``resumed``: checkpoints read back from the ``state`` file instead of measured by this call;
      ``seconds``: the time of this call.
    """

    checkpoints: list[str]
    layers: list[str]
    drift_previous: torch.Tensor
    drift_final: torch.Tensor
    filter_cosine: torch.Tensor
    filter_cosines: list[dict[str, torch.Tensor]]
    cka: torch.Tensor
    cka_previous: torch.Tensor
    agreement: torch.Tensor | None
    accuracy: torch.Tensor | None
    images: int
    features: str
    grid: int
    kernels: dict[str, torch.Tensor]
    strongest: dict[str, torch.Tensor | None]
    done: list[bool]
    interrupted: bool = False
    seconds: float = 0.0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    resumed: int = 0
    _image: Image.Image | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __str__(self) -> str:
        n = sum(self.done)
        return (f"evolution of {len(self.layers)} layer(s) over {n} of {len(self)} checkpoints, "
                f"CKA on {self.images} probe images ({self.features} features)")

    def _layer_index(self, layer: str) -> int:
        if layer not in self.layers:
            raise LayerNotFoundError(f"layer {layer!r} was not measured{suggestion(layer, self.layers)}")
        return self.layers.index(layer)

    def table(self, name: str) -> dict[str, dict[str, float | None]]:
        """One table as ``{checkpoint: {layer: value}}`` (``None`` for NaN); ``name`` is a tensor attribute."""
        names = ("drift_previous", "drift_final", "filter_cosine", "cka", "cka_previous")
        if name not in names:
            raise EvolutionError(f"unknown table {name!r}; choose one of {', '.join(names)}")
        t = getattr(self, name)
        return {c: {lay: _num(t[i, j]) for j, lay in enumerate(self.layers)} for i, c in enumerate(self.checkpoints)}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): the tables as lists of rows (checkpoints) of columns (layers)."""
        def rows(t: torch.Tensor) -> list[list[float | None]]:
            return [[_num(v) for v in row] for row in t]

        return {
            "checkpoints": list(self.checkpoints),
            "layers": list(self.layers),
            "images": self.images,
            "features": self.features if self.features == "pooled" else f"spatial {self.grid}x{self.grid}",
            "drift_previous": rows(self.drift_previous),
            "drift_final": rows(self.drift_final),
            "filter_cosine": rows(self.filter_cosine),
            "cka": rows(self.cka),
            "cka_previous": rows(self.cka_previous),
            "agreement": None if self.agreement is None else [_num(v) for v in self.agreement],
            "accuracy": None if self.accuracy is None else [_num(v) for v in self.accuracy],
            "done": list(self.done),
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "skipped": [{"position": p, "reason": r} for p, r in self.skipped],
            "resumed": self.resumed,
        }

    # ------------------------------------------------------------------ pictures
    def filters_image(self, layer: str | None = None, max_filters: int = 16, *, cell: int | None = None) -> Image.Image:
        """The same filters at every checkpoint: one row per checkpoint, one column per filter (by index).

        A layer reading 3 channels (the first layer) shows RGB kernels, as in Zeiler & Fergus (2014, fig. 4);
        deeper layers show, per filter, the kernel slice of its strongest input channel in the final
        checkpoint. Each tile is scaled on its own: grey = 0, ``w / (2 max|w|) + 0.5``, so early, small
        weights stay visible. ``layer=None``: the first measured layer.
        """
        if max_filters < 1:
            raise EvolutionError(f"max_filters must be at least 1, got {max_filters}")
        layer = self.layers[0] if layer is None else layer
        self._layer_index(layer)
        if layer not in self.kernels:
            raise EvolutionError(f"layer {layer!r} has no weights to draw (it was measured for CKA only); "
                                 f"layers with filters: {', '.join(self.kernels) or 'none'}")
        rows = [i for i, d in enumerate(self.done) if d]
        k = self.kernels[layer][rows, :max_filters].double()
        rgb = k.ndim == 5
        flat = k.flatten(2)
        m = flat.abs().amax(2).clamp_min(1e-12)
        scaled = k / (2 * m.view(*m.shape, *([1] * (k.ndim - 2)))) + 0.5
        if rgb:
            arrays = scaled.permute(0, 1, 3, 4, 2).numpy()
        else:
            arrays = scaled.numpy()
        arrays = (np.clip(arrays, 0, 1) * 255 + 0.5).astype(np.uint8)
        tiles = [[Image.fromarray(a) for a in row] for row in arrays]
        kh = int(k.shape[-1])
        cell = cell or max(24, min(64, 8 * kh))
        what = "RGB filters" if rgb else "filters (strongest input channel)"
        picture = matrix_grid(tiles, row_labels=[self.checkpoints[i] for i in rows],
                              column_labels=[str(j) for j in range(k.shape[1])], cell=cell)
        return titled(picture, f"{layer}: {what} over training, grey = 0")

    def curves_image(self, *, width: float = 11.0, height: float = 3.6, dpi: int = 100) -> Image.Image:
        """Line plots over checkpoints, one line per layer (colour = depth): CKA to the final checkpoint
        (with top-1 agreement dashed), weight drift from the final and drift from the previous checkpoint."""
        from matplotlib import colormaps  # heavy: imported when a figure is drawn

        from ..render.figures import Figure  # heavy (matplotlib): imported when a figure is drawn

        fig = Figure(figsize=(width, height), dpi=dpi)
        axes = fig.subplots(1, 3)
        x = np.arange(len(self.checkpoints))
        cmap = colormaps["viridis"]
        n = len(self.layers)
        panels = ((self.cka, "CKA to final"), (self.drift_final, "weight drift from final"),
                  (self.drift_previous, "weight drift from previous"))
        for ax, (table, title) in zip(axes, panels):
            for j, layer in enumerate(self.layers):
                ax.plot(x, table[:, j].numpy(), marker="o", ms=3, lw=1.2, color=cmap(j / max(1, n - 1)), label=layer)
            ax.set_title(title, fontsize=10)
            ax.set_xticks(x)
            ax.set_xticklabels([_short(c) for c in self.checkpoints], rotation=30, ha="right", fontsize=8)
            ax.grid(alpha=0.3)
        if self.agreement is not None:
            axes[0].plot(x, self.agreement.numpy(), ls="--", color="black", lw=1.2, label="top-1 agreement")
        axes[0].set_ylim(-0.05, 1.05)
        if n <= 10:
            axes[0].legend(fontsize=7, loc="lower right")
        else:
            from matplotlib.cm import ScalarMappable  # heavy: imported when a figure is drawn
            from matplotlib.colors import Normalize
            from matplotlib.ticker import MaxNLocator

            bar = fig.colorbar(ScalarMappable(Normalize(0, n - 1), cmap), ax=axes[2])
            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
            bar.set_label(f"layer depth (0 = {_short(self.layers[0])}, {n - 1} = {_short(self.layers[-1])})", fontsize=8)
        fig.tight_layout()
        return figure_to_image(fig)

    def to_image(self) -> Image.Image:
        return self.curves_image()


def _num(v: Any) -> float | None:
    f = float(v)
    return None if math.isnan(f) else f


def _short(text: str, n: int = 18) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


# ============================================================================ the probe pass as a reducer


@dataclass
class Probe:
    """What :class:`ProbeFeatures` gives back for one checkpoint: ``grams[layer]`` the centred n x n Gram matrix of
    the layer's features (float64), ``top1`` (n,) the top-1 classes (``None`` without class scores) and
    ``positions`` (n,) the input positions of the n probe images scored, in input order."""

    grams: dict[str, torch.Tensor]
    top1: torch.Tensor | None
    positions: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.positions.numel())


class ProbeFeatures(Reducer):
    """One checkpoint's probe pass as a reducer of :func:`convscope.dataset.engine.run`: per probe image, every
    chosen layer's CKA features (``features="pooled"``: (C,); ``"spatial"``: (C * grid^2,)) and, with
    ``classifier``, the top-1 class, kept by input position (the probe set is at most :data:`MAX_IMAGES`
    images); :meth:`finish` turns the features into centred Gram matrices (:func:`centered_gram`).
    :meth:`merge_states` concatenates (``a``'s images precede ``b``'s). An output that is not (N, classes)
    scores leaves ``top1`` out."""

    def __init__(self, layers: Sequence[str], *, features: str = "pooled", grid: int = 4, classifier: bool = True,
                 name: str = "probe"):
        super().__init__()
        self.layers = tuple(layers)
        self.features, self.grid, self.needs_output, self.name = features, grid, classifier, name

    def options(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "features": self.features, "grid": self.grid, "classifier": self.needs_output}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        part: dict[str, Any] = {f"f{j}": _features(batch.activations[n], self.features, self.grid, n).cpu()
                                for j, n in enumerate(self.layers)}
        part["index"] = batch.index.cpu()
        logits = batch.output
        part["classifier"] = logits is not None and logits.ndim == 2
        if part["classifier"]:
            part["top1"] = logits.argmax(1).cpu()
        return self.merge_states(state, part)

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or b is None:
            return b if a is None else a
        keys = [f"f{j}" for j in range(len(self.layers))] + ["index"]
        out: dict[str, Any] = {k: torch.cat([a[k].cpu(), b[k].cpu()]) for k in keys}
        out["classifier"] = bool(a["classifier"] and b["classifier"])
        if out["classifier"]:
            out["top1"] = torch.cat([a["top1"].cpu(), b["top1"].cpu()])
        return out

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> Probe:
        if state is None:
            return Probe({}, None, torch.zeros(0, dtype=torch.long))
        return Probe({n: centered_gram(state[f"f{j}"]) for j, n in enumerate(self.layers)},
                     state["top1"] if state["classifier"] else None, state["index"])


# ============================================================================ the run


def _label(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return Path(item).name
    return f"checkpoint {i}"


def _signature(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def _load(item: Any, *, arch: str | None, num_classes: int | None, device: Any, trust: bool) -> Model:
    """One checkpoint as a Model: loaded from its file (freed after its pass), or a Model / module borrowed."""
    if isinstance(item, (str, os.PathLike)):
        return models.load_model(item, arch=arch, num_classes=num_classes, device=device, trust=trust)
    if isinstance(item, (Model, nn.Module)):
        return as_model(item)
    raise EvolutionError(f"a checkpoint must be a file path, a convscope Model or an nn.Module, got {type(item).__name__}")


def _preprocessing_of(model: Model) -> dict[str, Any]:
    """The final checkpoint's preprocessing settings (plain data: every checkpoint's pass uses them)."""
    return {"input_size": list(model.input_size), "mean": list(model.mean), "std": list(model.std),
            "resize_size": model.resize_size, "interpolation": model.interpolation}


def _with_preprocessing(module: nn.Module, ref: dict[str, Any]) -> Model:
    """``module`` (left as it is: mode, device, parameters) with the final checkpoint's preprocessing ``ref``."""
    return Model(module=module, input_size=tuple(ref["input_size"]), mean=tuple(ref["mean"]), std=tuple(ref["std"]),
                 labels=["-"], resize_size=ref["resize_size"], interpolation=ref["interpolation"], channels=None,
                 set_eval=False, name="checkpoint")


def _features(act: torch.Tensor, mode: str, grid: int, layer: str) -> torch.Tensor:
    if act.ndim == 4:
        if mode == "pooled":
            return act.float().mean((2, 3))
        return F.adaptive_avg_pool2d(act.float(), grid).flatten(1)
    if act.ndim >= 2:
        return act.float().flatten(1)
    raise LayerKindError(f"layer {layer!r} outputs shape {tuple(act.shape)}; CKA needs one feature vector per image")


class _FirstImages(ImageSource):
    """The first ``n`` images of a folder or list (:class:`~convscope.dataset.folder.ImageSource`)."""

    def __init__(self, images: Any, n: int):
        super().__init__(images)
        self._items = list(self._items[:n])
        self.names = self.names[:n]
        if getattr(self, "classes", None) is not None:
            self.classes = self.classes[:n]


def _probe_source(images: Any, max_images: int) -> Any:
    """The probe set: the first ``max_images`` inputs of ``images`` (a folder, a list of paths / PIL images, tensors,
    an iterable of tensors (read once, kept), or a map-style torch Dataset); unreadable ones among them are skipped."""
    if isinstance(images, torch.Tensor):
        return check_input(images, device=None, channels=None)[:max_images]
    if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.utils.data.IterableDataset):
        return torch.utils.data.Subset(images, range(min(len(images), max_images)))  # type: ignore[arg-type]
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, Sequence) and not all(
            isinstance(t, torch.Tensor) for t in images)):
        return _FirstImages(images, max_images)
    chunks, count = [], 0
    for t in images:  # preprocessed tensors, (C, H, W) or (n, C, H, W): the first max_images of them
        if not isinstance(t, torch.Tensor):
            raise DatasetError(f"an iterable of tensors must hold only tensors, got a {type(t).__name__}")
        t = check_input(t, device=None, channels=None)[: max_images - count]
        chunks.append(t)
        count += t.shape[0]
        if count >= max_images:
            break
    if not chunks:
        raise DatasetError("no probe images (an empty iterable)")
    return torch.cat(chunks)


def _inputs_identity(source: Any) -> dict[str, Any]:
    """The probe set's part of a state's fingerprint: count and SHA-256 of the names (files) or of the values
    (tensors); a torch Dataset is known by its type and length only."""
    if isinstance(source, torch.Tensor):
        data = source.detach().float().cpu().contiguous().numpy().tobytes()
        return {"count": int(source.shape[0]), "sha256": hashlib.sha256(data).hexdigest(), "root": None}
    if isinstance(source, torch.utils.data.Dataset):
        base = source.dataset if isinstance(source, torch.utils.data.Subset) else source
        return {"count": len(source), "sha256": f"{type(base).__module__}.{type(base).__qualname__}:{len(source)}",  # type: ignore[arg-type]
                "root": None}
    return {"count": len(source.names), "sha256": source.fingerprint(),
            "root": None if source.root is None else str(Path(source.root).resolve())}


def checkpoint_identity(item: Any) -> dict[str, Any]:
    """How a resumed evolution recognises a checkpoint without loading it: a file by its resolved path, size and
    modification time (a rewritten file changes them); a module or Model already in memory by
    :func:`~convscope.models.model_fingerprint` of its weights."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            st = path.stat()
        except OSError:
            return {"file": str(path)}  # loading it reports the problem
        return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if isinstance(item, Model):
        return {"module": model_fingerprint(item.module)}
    if isinstance(item, nn.Module):
        return {"module": model_fingerprint(item)}
    return {"object": type(item).__name__}  # refused by _load


def _run_fingerprint(items: Sequence[Any], inputs: dict[str, Any], *, arch: str | None, num_classes: int | None,
                     layers: Sequence[str] | None, max_images: int, features: str, grid: int, amp: str | None,
                     targets: torch.Tensor | None) -> dict[str, Any]:
    """The identity of an evolution run (see :class:`~convscope.dataset.engine.StateStore`): the checkpoints
    (:func:`checkpoint_identity`, in order), the probe inputs and every option that changes a number."""
    return {"what": "evolution", "model": {}, "inputs": inputs, "checkpoint_count": len(items),
            "checkpoints": {f"#{i}": checkpoint_identity(c) for i, c in enumerate(items)},
            "arch": arch, "num_classes": num_classes, "layers": None if layers is None else list(layers),
            "preprocessing": MODEL_PREPROCESSING.to_json(), "max_images": max_images, "features": features,
            "grid": grid if features == "spatial" else None, "amp": amp,
            "targets": None if targets is None else hashlib.sha256(targets.numpy().tobytes()).hexdigest()}


def _probe_pass(model: Model, source: Any, layers: list[str], *, features: str, grid: int, batch_size: int,
                quiet: bool, engine_options: dict[str, Any]) -> tuple[Probe, list[tuple[int, str]]]:
    """One checkpoint's probe pass through the dataset engine: its :class:`Probe` and the unreadable inputs.

    A Ctrl-C inside the pass raises :class:`KeyboardInterrupt` (the checkpoint is not measured). An output
    without class scores runs the pass again without them."""
    for classifier in (True, False):
        reducer = ProbeFeatures(layers, features=features, grid=grid, classifier=classifier)
        try:
            with warnings.catch_warnings():
                if quiet:  # the same unreadable files are skipped on every pass: warn once
                    warnings.simplefilter("ignore", SkippedImagesWarning)
                ran = run_engine(model, source, [reducer], what="evolution probe", batch_size=batch_size,
                                 progress=False, **engine_options)
            break
        except InputShapeError:  # no class scores in the output: no agreement to measure
            if not classifier:
                raise
    if ran.info.interrupted:
        raise KeyboardInterrupt
    return ran.results[0], list(ran.info.skipped)


def evolution(
    checkpoints: Sequence[Any],
    images: Any = None,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    layers: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    max_images: int = 256,
    features: str = "pooled",
    grid: int = 4,
    targets: Sequence[int] | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    trust: bool = False,
    progress: bool | None | Callable[[int, int], None] = None,
    state: str | os.PathLike | None = None,
    workers: int | None = None,
    amp: str | None = None,
    engine: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
) -> Evolution:
    """Measure how filters and representations change across ``checkpoints`` of one architecture.

    ``checkpoints``: in training order (the last is the reference, "final"): model files (loaded with
    :func:`convscope.load_model` with ``arch``, ``num_classes``, ``device`` and ``trust``; state_dicts,
    checkpoint dicts and safetensors), :class:`~convscope.Model` objects or ``nn.Module`` objects, at least
    two, every one with the same parameter names and shapes. ``images``: the probe set (a folder, a list of
    paths / ``sample:NAME`` / PIL images, preprocessed tensors (N, 3, H, W) or an iterable of them, or a
    map-style torch Dataset); ``None``: the bundled samples (:data:`convscope.SAMPLES`). The probe images are the
    first ``max_images`` inputs; unreadable ones among them are skipped and listed (:attr:`Evolution.skipped`),
    and if none can be read, :class:`~convscope.dataset.folder.UnreadableImagesError`. Files are preprocessed
    with the final checkpoint's settings (ImageNet defaults at 224 px when it is a plain module).
    ``layers``: layer names (default: every ``Conv2d``); drift and filter cosine need a layer with a
    ``weight``, CKA any layer with a tensor output. ``labels``: a name per checkpoint (default: file names).
    ``features``: ``"pooled"`` (global average per channel) or ``"spatial"`` (maps pooled to ``grid x grid``,
    flattened) for CKA. ``targets``: true classes of the probe images, for accuracy.
    ``progress``: a tqdm bar (``None``: only on a terminal) or ``fn(done, total)`` in checkpoints.
    ``workers``, ``amp``, ``engine``, ``address``, ``num_gpus``: the probe passes' engine options (see
    :func:`convscope.dataset.engine.run`).

    Checkpoints are loaded and measured one at a time and freed before the next (the final one first); each
    probe pass is one :func:`~convscope.dataset.engine.run` of a :class:`ProbeFeatures` reducer. Ctrl-C
    keeps the checkpoints done (``interrupted``). ``state``: a file where, after each checkpoint is measured,
    everything the remaining comparisons need is saved atomically (the measured rows, kernels and cosines, the
    final and the previous checkpoint's weights of the chosen layers and Gram matrices); the same call again
    skips the checkpoints done (a checkpoint interrupted mid-pass is measured again) and returns the same
    :class:`Evolution` as one uninterrupted run. A state of other checkpoints (:func:`checkpoint_identity`),
    probe images or options raises :class:`~convscope.dataset.folder.StateMismatchError` naming what
    differs. Returns an :class:`Evolution`; see the module docstring for the formulas.
    """
    single = isinstance(checkpoints, (str, os.PathLike, nn.Module, Model))
    items = [checkpoints] if single else list(checkpoints)
    if len(items) < 2:
        raise EvolutionError(f"evolution needs at least two checkpoints, got {len(items)}")
    if features not in FEATURES:
        raise EvolutionError(f"unknown features {features!r}; choose {' or '.join(FEATURES)}")
    BATCH_SIZE.check("batch_size", batch_size)
    MAX_IMAGES.check("max_images", max_images)  # CKA needs at least 2 probe images
    GRID.check("grid", grid)
    names = [_label(c, i) for i, c in enumerate(items)] if labels is None else [str(s) for s in labels]
    if len(names) != len(items):
        raise EvolutionError(f"{len(names)} labels for {len(items)} checkpoints")
    if images is None:
        images = [f"sample:{s}" for s in SAMPLES]
    target_t = None if targets is None else torch.as_tensor(targets, dtype=torch.long).flatten().cpu()
    source = _probe_source(images, max_images)
    store = None
    if state is not None:
        fp = _run_fingerprint(items, _inputs_identity(source), arch=arch, num_classes=num_classes, layers=layers,
                              max_images=max_images, features=features, grid=grid, amp=amp, targets=target_t)
        store = StateStore(state, "evolution", fp, getattr(source, "names", None))
    engine_options = dict(workers=workers, amp=amp, engine=engine, address=address, num_gpus=num_gpus)

    T = len(items)
    order = [T - 1] + list(range(T - 1))  # the final checkpoint first: everything is compared to it
    carried = _restore(store, T)  # None until the final checkpoint is measured
    resumed = 0 if carried is None else sum(carried["done"])
    interrupted = False
    start = time.perf_counter()
    report = progress if callable(progress) else None
    bar = tqdm(total=T, initial=resumed, desc="evolution", unit="ckpt", leave=False,
               disable=True if report else (None if progress is None else not progress))
    try:
        for idx in order:
            if carried is not None and carried["done"][idx]:
                continue
            loaded = _load(items[idx], arch=arch, num_classes=num_classes, device=device, trust=trust)
            module = loaded.module
            if carried is None:
                chosen = _choose_layers(module, layers)
                weighted = [n for n in chosen if isinstance(getattr(resolve_layer(module, n), "weight", None), torch.Tensor)]
                carried = _start(T, chosen, weighted, _signature(module), _preprocessing_of(loaded))
            else:
                _check_same(carried["signature"], _signature(module), names[idx], names[T - 1])
            weights = {n: resolve_layer(module, n).weight.detach().float().cpu().clone() for n in carried["weighted"]}
            probe, skipped = _probe_pass(_with_preprocessing(module, carried["ref"]), source, carried["layers"],
                                         features=features, grid=grid, batch_size=batch_size, quiet=idx != T - 1,
                                         engine_options=engine_options)
            del loaded, module
            new = _advance(carried, idx, weights, probe, skipped, target_t)
            if store is not None:
                _save(store, new)  # atomically: a kill -9 leaves the state before or after this checkpoint
            carried = new  # committed in one assignment (Ctrl-C never leaves a half-measured checkpoint)
            del weights, probe, new
            _free()
            bar.update(1)
            if report:
                report(sum(carried["done"]), T)
    except KeyboardInterrupt:
        if carried is None or not carried["done"][T - 1]:
            raise
        interrupted = True
    finally:
        bar.close()
    return _result(carried, names, features, grid, target_t, interrupted, time.perf_counter() - start, resumed)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _choose_layers(module: nn.Module, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        chosen = [n for n, m in module.named_modules() if n and isinstance(m, nn.Conv2d)]
        if not chosen:
            raise EvolutionError("the model has no Conv2d layer; name the layers to compare with layers=[...]")
        return chosen
    if isinstance(layers, str):
        layers = [s for s in layers.split(",") if s.strip()]
    chosen = [s.strip() for s in layers]
    if not chosen:
        raise EvolutionError("no layers given")
    for n in chosen:
        resolve_layer(module, n)
    return list(dict.fromkeys(chosen))


def _check_same(ref: list[tuple[str, tuple[int, ...]]], sig: list[tuple[str, tuple[int, ...]]], name: str, final: str) -> None:
    if sig == ref:
        return
    ref_d, sig_d = dict(ref), dict(sig)
    for key, shape in ref:
        if key not in sig_d:
            raise EvolutionError(f"{name} is not the architecture of {final}: it has no parameter {key!r}")
        if sig_d[key] != shape:
            raise EvolutionError(f"{name} is not the architecture of {final}: {key} has shape {sig_d[key]}, "
                                 f"expected {shape}")
    extra = [k for k in sig_d if k not in ref_d]
    raise EvolutionError(f"{name} is not the architecture of {final}: extra parameter(s) {', '.join(extra[:3])}")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    d = float((a.double() - ref.double()).norm())
    r = float(ref.double().norm())
    return d / r if r > 0 else (0.0 if d == 0 else float("inf"))


def _filter_cosine(w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a, b = w.double().flatten(1) if w.ndim > 1 else w.double()[:, None], ref.double().flatten(1) if ref.ndim > 1 else ref.double()[:, None]
    denom = (a.norm(dim=1) * b.norm(dim=1))
    cos = (a * b).sum(1) / denom.clamp_min(1e-300)
    return torch.where(denom > 0, cos, torch.zeros_like(cos))


# ============================================================================ what is carried from checkpoint to checkpoint
#
# ``carried`` holds everything measured so far and everything the remaining checkpoints are compared with:
# ``done`` (T,), ``layers``/``weighted``/``signature``/``ref`` (the final checkpoint's layers, architecture and
# preprocessing), ``tables`` (T, L), ``agreement``/``accuracy`` (T,), ``cosines[idx][layer]``, ``kernels[layer][idx]``,
# ``strongest``, ``final`` (weights, grams, top1 of the final checkpoint), ``prev`` (index, weights, grams of the
# last checkpoint measured in training order), ``positions``/``n``/``skipped`` (the probe images), ``has_logits``.
# :func:`_advance` builds a new one and never changes the one it is given.

_TABLES = ("drift_previous", "drift_final", "filter_cosine", "cka", "cka_previous")


def _start(T: int, layers: list[str], weighted: list[str], signature: list, ref: dict[str, Any]) -> dict[str, Any]:
    nan = float("nan")
    return {"done": [False] * T, "layers": layers, "weighted": weighted, "signature": signature, "ref": ref,
            "tables": {k: torch.full((T, len(layers)), nan, dtype=torch.float64) for k in _TABLES},
            "agreement": torch.full((T,), nan, dtype=torch.float64), "accuracy": torch.full((T,), nan, dtype=torch.float64),
            "cosines": {}, "kernels": {n: {} for n in weighted}, "strongest": {}, "final": None, "prev": None,
            "positions": None, "n": 0, "skipped": [], "has_logits": True}


def _advance(c: dict[str, Any], idx: int, weights: dict[str, torch.Tensor], probe: Probe, skipped: list[tuple[int, str]],
             targets: torch.Tensor | None) -> dict[str, Any]:
    """The carried state after checkpoint ``idx`` (``weights`` of the weighted layers, its ``probe``), as a new dict."""
    T = len(c["done"])
    new = dict(c)
    tables = {k: v.clone() for k, v in c["tables"].items()}
    agreement, accuracy = c["agreement"].clone(), c["accuracy"].clone()
    if idx == T - 1:  # the final checkpoint, measured first: the reference of every comparison
        if probe.n < 2:
            raise EvolutionError(f"CKA needs at least 2 readable probe images, got {probe.n}")
        new.update(final={"weights": weights, "grams": probe.grams, "top1": probe.top1}, positions=probe.positions,
                   n=probe.n, skipped=list(skipped),
                   strongest={n: None if w.ndim != 4 or w.shape[1] == 3 else w[:KEEP_FILTERS].flatten(2).norm(dim=2).argmax(1)
                              for n, w in weights.items()})
    elif not torch.equal(c["positions"], probe.positions):
        raise EvolutionError("the probe images differ between checkpoints (files changed during the run?)")
    final, positions, strongest = new["final"], new["positions"], new["strongest"]
    layers, weighted = c["layers"], c["weighted"]
    cosines = {**c["cosines"], idx: {}}
    kernels = {n: dict(v) for n, v in c["kernels"].items()}
    for j, n in enumerate(layers):
        tables["cka"][idx, j] = gram_cka(probe.grams[n], final["grams"][n])
        if n not in weights:
            continue
        w, ref = weights[n], final["weights"][n]
        tables["drift_final"][idx, j] = _rel(w, ref)
        cos = _filter_cosine(w, ref).float()
        cosines[idx][n] = cos
        tables["filter_cosine"][idx, j] = float(cos.double().mean())
        if w.ndim == 4:
            k = w[:KEEP_FILTERS]
            s = strongest.get(n)
            kernels[n][idx] = k.clone() if s is None else k[torch.arange(k.shape[0]), s].clone()
        else:
            kernels[n][idx] = w[:KEEP_FILTERS].reshape(min(KEEP_FILTERS, w.shape[0]), 1, -1).clone()
    final_top = final["top1"]
    new["has_logits"] = c["has_logits"] and probe.top1 is not None and final_top is not None
    if probe.top1 is not None and final_top is not None:
        agreement[idx] = float((probe.top1 == final_top).double().mean())
        if targets is not None:
            if targets.numel() < positions.max() + 1:
                raise EvolutionError(f"{targets.numel()} targets for at least {int(positions.max()) + 1} probe images")
            accuracy[idx] = float((probe.top1 == targets[positions]).double().mean())
    if idx != T - 1:
        prev = c["prev"]
        if prev is not None and prev["index"] == idx - 1:
            _compare_previous(idx, prev["weights"], prev["grams"], weights, probe.grams, tables, layers, weighted)
        new["prev"] = {"index": idx, "weights": weights, "grams": probe.grams}
        if idx == T - 2:  # the final checkpoint's previous one is done: compare them
            _compare_previous(T - 1, weights, probe.grams, final["weights"], final["grams"], tables, layers, weighted)
    done = list(c["done"])
    done[idx] = True
    new.update(done=done, tables=tables, agreement=agreement, accuracy=accuracy, cosines=cosines, kernels=kernels)
    return new


def _compare_previous(idx: int, prev_w: dict, prev_g: dict, weights: dict, grams: dict, tables: dict,
                      layers: list[str], weighted: list[str]) -> None:
    for j, n in enumerate(layers):
        tables["cka_previous"][idx, j] = gram_cka(grams[n], prev_g[n])
        if n in weighted:
            tables["drift_previous"][idx, j] = _rel(weights[n], prev_w[n])


def _result(c: dict[str, Any], names: list[str], features: str, grid: int, targets: torch.Tensor | None,
            interrupted: bool, seconds: float, resumed: int) -> Evolution:
    T = len(names)
    nan = float("nan")
    kept = {}
    for n in c["weighted"]:
        like = c["kernels"][n][T - 1]
        kept[n] = torch.stack([c["kernels"][n].get(i, torch.full_like(like, nan)) for i in range(T)])
    tables = c["tables"]
    return Evolution(
        checkpoints=names, layers=list(c["layers"]), drift_previous=tables["drift_previous"],
        drift_final=tables["drift_final"], filter_cosine=tables["filter_cosine"],
        filter_cosines=[dict(c["cosines"].get(i, {})) for i in range(T)], cka=tables["cka"],
        cka_previous=tables["cka_previous"], agreement=c["agreement"] if c["has_logits"] else None,
        accuracy=c["accuracy"] if (targets is not None and c["has_logits"]) else None, images=int(c["n"]),
        features=features, grid=grid, kernels=kept, strongest=dict(c["strongest"]), done=list(c["done"]),
        interrupted=interrupted, seconds=seconds, skipped=list(c["skipped"]), resumed=resumed,
    )


# ============================================================================ the saved state


class _Carried:
    """The name and options under which the carried state is kept in the state file (one stage, one entry)."""

    name = "carried"

    def options(self) -> dict[str, Any]:
        return {}


_STAGE = "evolution"


def _save(store: StateStore, c: dict[str, Any]) -> None:
    """``c`` as one state (plain data + flat tensors, layers by their position) in stage ``evolution``."""
    layers = c["layers"]
    j = {n: i for i, n in enumerate(layers)}
    plain: dict[str, Any] = {
        "done": c["done"], "layers": layers, "weighted": c["weighted"],
        "signature": [[k, list(s)] for k, s in c["signature"]], "ref": c["ref"], "n": c["n"],
        "skipped": [[int(p), str(r)] for p, r in c["skipped"]], "has_logits": c["has_logits"],
        "prev_index": None if c["prev"] is None else c["prev"]["index"],
        "final_top1": c["final"]["top1"] is not None,
        "cosines": [[int(i), n] for i, per in c["cosines"].items() for n in per],
        "kernels": [[n, int(i)] for n, per in c["kernels"].items() for i in per],
        "strongest": [n for n, s in c["strongest"].items() if s is not None],
    }
    tensors: dict[str, torch.Tensor] = {f"table/{k}": v for k, v in c["tables"].items()}
    tensors.update({"agreement": c["agreement"], "accuracy": c["accuracy"], "positions": c["positions"]})
    for part in ("final", "prev"):
        if c[part] is None:
            continue
        tensors.update({f"{part}/weights/{j[n]}": w for n, w in c[part]["weights"].items()})
        tensors.update({f"{part}/grams/{j[n]}": g for n, g in c[part]["grams"].items()})
    if c["final"]["top1"] is not None:
        tensors["final/top1"] = c["final"]["top1"]
    tensors.update({f"cosine/{i}/{j[n]}": v for i, per in c["cosines"].items() for n, v in per.items()})
    tensors.update({f"kernel/{j[n]}/{i}": v for n, per in c["kernels"].items() for i, v in per.items()})
    tensors.update({f"strongest/{j[n]}": s for n, s in c["strongest"].items() if s is not None})
    record = {"complete": all(c["done"]), "done": sum(c["done"]), "total": len(c["done"])}
    store.save(_STAGE, record, [_Carried()], [{**plain, **tensors}])  # type: ignore[list-item]


def _restore(store: StateStore | None, T: int) -> dict[str, Any] | None:
    """The carried state saved in ``store`` (``None``: nothing saved yet)."""
    if store is None:
        return None
    saved = store.stage(_STAGE, [_Carried()], torch.device("cpu"))  # type: ignore[list-item]
    if saved is None:
        return None
    s = saved[1][0]
    layers = list(s["layers"])
    if len(s["done"]) != T:
        raise StateFileError(f"{store.path}: a state of {len(s['done'])} checkpoints, not {T}; delete it or choose another")

    def part(name: str, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: s[f"{name}/{layers.index(n)}"] for n in names}

    weighted = list(s["weighted"])
    c = _start(T, layers, weighted, [(k, tuple(shape)) for k, shape in s["signature"]], dict(s["ref"]))
    c.update(done=[bool(d) for d in s["done"]], n=int(s["n"]), skipped=[(int(p), str(r)) for p, r in s["skipped"]],
             has_logits=bool(s["has_logits"]), positions=s["positions"], agreement=s["agreement"], accuracy=s["accuracy"],
             tables={k: s[f"table/{k}"] for k in _TABLES},
             final={"weights": part("final/weights", weighted), "grams": part("final/grams", layers),
                    "top1": s["final/top1"] if s["final_top1"] else None},
             strongest={n: (s[f"strongest/{layers.index(n)}"] if n in s["strongest"] else None) for n in weighted})
    if s["prev_index"] is not None:
        c["prev"] = {"index": int(s["prev_index"]), "weights": part("prev/weights", weighted),
                     "grams": part("prev/grams", layers)}
    for i, n in s["cosines"]:
        c["cosines"].setdefault(int(i), {})[n] = s[f"cosine/{i}/{layers.index(n)}"]
    for n, i in s["kernels"]:
        c["kernels"][n][int(i)] = s[f"kernel/{layers.index(n)}/{i}"]
    return c
