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
training order, each loaded, measured and freed before the next is loaded. Checkpoints given as modules are
run inside :class:`~convscope.probe.Capture` (eval mode, hooks removed, everything restored afterwards).
"""

from __future__ import annotations

import gc
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
from ..models import Model, as_model, output_logits
from ..options import Option
from ..probe import Capture, forward_fast, module_device, resolve_layer
from ..progress import tqdm
from ..render import figure_to_image, matrix_grid, titled
from ..render.picture import Pictured
from .folder import BATCH_SIZE, DatasetError, Preprocess, SkippedImagesWarning, open_images

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


def _preprocessor(model: Model) -> Preprocess:
    """The checkpoint's preprocessing alone (a Model around ``nn.Identity``), so no checkpoint stays loaded."""
    return Model(module=nn.Identity(), input_size=model.input_size, mean=model.mean, std=model.std, labels=["-"],
                 resize_size=model.resize_size, interpolation=model.interpolation).preprocess


def _features(act: torch.Tensor, mode: str, grid: int, layer: str) -> torch.Tensor:
    if act.ndim == 4:
        if mode == "pooled":
            return act.float().mean((2, 3))
        return F.adaptive_avg_pool2d(act.float(), grid).flatten(1)
    if act.ndim >= 2:
        return act.float().flatten(1)
    raise LayerKindError(f"layer {layer!r} outputs shape {tuple(act.shape)}; CKA needs one feature vector per image")


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
) -> Evolution:
    """Measure how filters and representations change across ``checkpoints`` of one architecture.

    ``checkpoints``: in training order (the last is the reference, "final"): model files (loaded with
    :func:`convscope.load_model` with ``arch``, ``num_classes``, ``device`` and ``trust``; state_dicts,
    checkpoint dicts and safetensors), :class:`~convscope.Model` objects or ``nn.Module`` objects, at least
    two, every one with the same parameter names and shapes. ``images``: the probe set (a folder, a list of
    paths / ``sample:NAME`` / PIL images, or preprocessed tensors (N, 3, H, W)); ``None``: the bundled
    samples (:data:`convscope.SAMPLES`). Files are preprocessed with the final checkpoint's settings
    (ImageNet defaults at 224 px when it is a plain module). At most ``max_images`` probe images are used.
    ``layers``: layer names (default: every ``Conv2d``); drift and filter cosine need a layer with a
    ``weight``, CKA any layer with a tensor output. ``labels``: a name per checkpoint (default: file names).
    ``features``: ``"pooled"`` (global average per channel) or ``"spatial"`` (maps pooled to ``grid x grid``,
    flattened) for CKA. ``targets``: true classes of the probe images, for accuracy.
    ``progress``: a tqdm bar (``None``: only on a terminal) or ``fn(done, total)`` in checkpoints.

    Checkpoints are loaded and measured one at a time and freed before the next (the final one first). Ctrl-C
    keeps the checkpoints done (``interrupted``). Returns an :class:`Evolution`; see the module docstring
    for the formulas.
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

    T = len(items)
    order = [T - 1] + list(range(T - 1))  # the final checkpoint first: everything is compared to it
    nan = float("nan")
    tables: dict[str, torch.Tensor] = {}  # (checkpoints, layers), made once the layers are known
    state: dict[str, Any] = {}
    done = [False] * T
    interrupted = False
    skipped: list[tuple[int, str]] = []
    agreement = torch.full((T,), nan, dtype=torch.float64)
    accuracy = torch.full((T,), nan, dtype=torch.float64)
    has_logits = True
    cosines: list[dict[str, torch.Tensor]] = [{} for _ in range(T)]
    kernels: dict[str, list[torch.Tensor | None]] = {}
    strongest: dict[str, torch.Tensor | None] = {}
    start = time.perf_counter()
    report = progress if callable(progress) else None
    bar = tqdm(total=T, desc="evolution", unit="ckpt", leave=False,
               disable=True if report else (None if progress is None else not progress))
    prep = None
    chosen: list[str] = []
    weighted: list[str] = []
    try:
        for step, idx in enumerate(order):
            loaded = _load(items[idx], arch=arch, num_classes=num_classes, device=device, trust=trust)
            module = loaded.module
            if step == 0:
                prep = _preprocessor(loaded)
                state["signature"] = _signature(module)
                chosen = _choose_layers(module, layers)
                weighted = [n for n in chosen if isinstance(getattr(resolve_layer(module, n), "weight", None), torch.Tensor)]
                L = len(chosen)
                tables = {k: torch.full((T, L), nan, dtype=torch.float64)
                          for k in ("drift_previous", "drift_final", "filter_cosine", "cka", "cka_previous")}
            else:
                _check_same(state["signature"], _signature(module), names[idx], names[T - 1])
            weights = {n: resolve_layer(module, n).weight.detach().float().cpu().clone() for n in weighted}
            grams, top1 = _probe(module, chosen, images, prep, batch_size, max_images, features, grid, skipped,
                                 quiet=step > 0, state=state)
            del loaded, module
            if step == 0:
                state["final_weights"] = weights
                state["final_grams"] = grams
                state["final_top1"] = top1
                for n in weighted:
                    w = weights[n]
                    strongest[n] = None if w.ndim != 4 or w.shape[1] == 3 else w[:KEEP_FILTERS].flatten(2).norm(dim=2).argmax(1)
                    kernels[n] = [None] * T
            has_logits = has_logits and top1 is not None and state["final_top1"] is not None
            _measure(idx, weights, grams, top1, state, tables, cosines, chosen, weighted, agreement, accuracy, target_t,
                     kernels, strongest)
            if step > 0:
                prev = state.get("prev")
                if prev is not None and prev[0] == idx - 1:
                    _compare_previous(idx, prev[1], prev[2], weights, grams, tables, chosen, weighted)
                state["prev"] = (idx, weights, grams)
                if idx == T - 2:  # the final checkpoint's previous one is done: compare them
                    _compare_previous(T - 1, weights, grams, state["final_weights"], state["final_grams"], tables,
                                      chosen, weighted)
            done[idx] = True
            del weights, grams
            _free()
            bar.update(1)
            if report:
                report(step + 1, T)
    except KeyboardInterrupt:
        if not done[T - 1]:
            raise
        interrupted = True
    finally:
        bar.close()
    n_images = int(state.get("n", 0))
    kept = {n: torch.stack([k if k is not None else torch.full_like(kernels[n][T - 1], nan) for k in kernels[n]])
            for n in weighted}
    agreement_out = agreement if has_logits else None
    return Evolution(
        checkpoints=names, layers=chosen, drift_previous=tables["drift_previous"], drift_final=tables["drift_final"],
        filter_cosine=tables["filter_cosine"], filter_cosines=cosines, cka=tables["cka"], cka_previous=tables["cka_previous"],
        agreement=agreement_out, accuracy=accuracy if (target_t is not None and has_logits) else None,
        images=n_images, features=features, grid=grid, kernels=kept, strongest=strongest, done=done,
        interrupted=interrupted, seconds=time.perf_counter() - start, skipped=skipped,
    )


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


def _probe(module: nn.Module, layers: list[str], images: Any, prep: Preprocess, batch_size: int, max_images: int,
           features: str, grid: int, skipped: list, *, quiet: bool, state: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Centred n x n Gram matrices of every layer's features on the probe images, and the top-1 classes."""
    device = module_device(module)
    source = open_images(images, torch.device("cpu"))
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    top: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    classifier = True
    count = 0
    with warnings.catch_warnings():
        if quiet:  # the same unreadable files are skipped on every pass: warn once
            warnings.simplefilter("ignore", SkippedImagesWarning)
        batches = source.batches(prep, batch_size)
        try:
            with torch.no_grad(), Capture(module, layers) as cap:
                for batch in batches:
                    if not quiet:
                        skipped.extend(batch.skipped)
                    if batch.x is None:
                        continue
                    x = batch.x[: max_images - count].to(device)
                    out = forward_fast(module, x, cap.forward)
                    for n in layers:
                        act = cap.activations.get(n)
                        if act is None:
                            raise LayerKindError(f"layer {n!r} is never called in the model's forward pass")
                        rows[n].append(_features(act, features, grid, n).cpu())
                    try:
                        logits = output_logits(out)
                    except InputShapeError:  # no class scores in the output: no agreement to measure
                        logits = None
                    if logits is None or logits.ndim != 2:
                        classifier = False
                    else:
                        top.append(logits.argmax(1).cpu())
                    positions.append(batch.index[: x.shape[0]])
                    count += x.shape[0]
                    if count >= max_images:
                        break
        finally:
            batches.close()
    if count < 2:
        raise EvolutionError(f"CKA needs at least 2 readable probe images, got {count}")
    pos = torch.cat(positions)
    if "positions" not in state:
        state["positions"], state["n"] = pos, count
    elif not torch.equal(state["positions"], pos):
        raise EvolutionError("the probe images differ between checkpoints (files changed during the run?)")
    grams = {}
    for n in layers:
        feats = torch.cat(rows[n])
        rows[n] = []
        grams[n] = centered_gram(feats)
    return grams, (torch.cat(top) if classifier and top else None)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    d = float((a.double() - ref.double()).norm())
    r = float(ref.double().norm())
    return d / r if r > 0 else (0.0 if d == 0 else float("inf"))


def _filter_cosine(w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a, b = w.double().flatten(1) if w.ndim > 1 else w.double()[:, None], ref.double().flatten(1) if ref.ndim > 1 else ref.double()[:, None]
    denom = (a.norm(dim=1) * b.norm(dim=1))
    cos = (a * b).sum(1) / denom.clamp_min(1e-300)
    return torch.where(denom > 0, cos, torch.zeros_like(cos))


def _measure(idx: int, weights: dict, grams: dict, top1: torch.Tensor | None, state: dict, tables: dict, cosines: list,
             layers: list[str], weighted: list[str], agreement: torch.Tensor, accuracy: torch.Tensor,
             targets: torch.Tensor | None, kernels: dict, strongest: dict) -> None:
    """Everything that compares checkpoint ``idx`` with the final one."""
    for j, n in enumerate(layers):
        tables["cka"][idx, j] = gram_cka(grams[n], state["final_grams"][n])
        if n not in weights:
            continue
        w, ref = weights[n], state["final_weights"][n]
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
    final_top = state.get("final_top1")
    if top1 is not None and final_top is not None:
        agreement[idx] = float((top1 == final_top).double().mean())
        if targets is not None:
            if targets.numel() < state["positions"].max() + 1:
                raise EvolutionError(f"{targets.numel()} targets for at least {int(state['positions'].max()) + 1} probe images")
            accuracy[idx] = float((top1 == targets[state["positions"]]).double().mean())


def _compare_previous(idx: int, prev_w: dict, prev_g: dict, weights: dict, grams: dict, tables: dict,
                      layers: list[str], weighted: list[str]) -> None:
    for j, n in enumerate(layers):
        tables["cka_previous"][idx, j] = gram_cka(grams[n], prev_g[n])
        if n in weighted:
            tables["drift_previous"][idx, j] = _rel(weights[n], prev_w[n])
