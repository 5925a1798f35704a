"""Filter health from the weights alone: dead filters and aliasing-prone (high-frequency) filters.

Zeiler & Fergus (ECCV 2014, fig. 6) found two faults by looking at a network's first layer: filters that
never learned anything (dead) and filters dominated by high frequencies, a symptom of aliasing in a
layer with a large stride (11x11 stride 4, fixed by 7x7 stride 2). :func:`filter_health` measures both
for every filter of a ``Conv2d``:

- ``norms``: the L2 norm over (in, kh, kw). A filter is **dead** when it is all zero or its norm is at most
  ``dead_fraction`` times the layer's median norm: it cannot respond to anything.
- ``aliasing``: the share of the filter's spectral energy above half the Nyquist frequency. Each input
  slice of the kernel is zero-padded to ``fft_size`` x ``fft_size`` and Fourier-transformed; the power
  is summed over input slices; a frequency counts as high when |fy| > 1/4 or |fx| > 1/4 cycles per pixel
  (either axis: a stride-2 subsampling folds back every component above 1/4 cycle along its axis). A
  smooth (Gaussian) filter scores near 0 (0.02 for a 5x5 of sigma 1), a checkerboard near 1 (0.99);
  random 3x3 or 5x5 noise about 0.69 (the high band is three quarters of the frequency plane, less the
  leakage of the small window). 1x1 kernels have no spatial frequencies
  and score NaN. A filter is **aliased** when its score exceeds ``alias_threshold`` and (by default) the
  layer has a stride above 1, where subsampling can alias; stride-1 layers are scored but not flagged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import LayerKindError, ViewOptionError, suggestion
from ..models import Model, as_model
from ..render import grid, matrix_grid, titled
from ..render.picture import Pictured
from .filters import ConvWeights, FilterSet, conv_layer, conv_layers, dead_filters

#: Layers drawn by :meth:`ModelHealth.to_image` (the first ones that have flagged filters).
PICTURE_LAYERS = 4


def aliasing_scores(weight: torch.Tensor, fft_size: int = 16, chunk: int = 1 << 16) -> torch.Tensor:
    """Share of each filter's spectral energy with |fy| or |fx| above 1/4 cycle per pixel (O,).

    ``weight`` (O, I, kh, kw); each (kh, kw) slice is zero-padded to ``fft_size`` x ``fft_size``; powers add
    over the I slices. NaN for 1x1 kernels and all-zero filters. Vectorised, in chunks of about ``chunk``
    slices to bound memory.
    """
    kh, kw = weight.shape[2:]
    if (kh, kw) != (1, 1) and fft_size < max(kh, kw):
        raise ViewOptionError(f"fft_size {fft_size} is smaller than the {kh}x{kw} kernel")
    return _aliasing_scores_of([weight], fft_size, chunk)[0]


def _aliasing_scores_of(weights: Sequence[torch.Tensor], fft_size: int, chunk: int = 1 << 16) -> list[torch.Tensor]:
    """:func:`aliasing_scores` of several weights (each padded to at least its kernel size). Kernels of one
    size are transformed together: a few large FFTs instead of one small one per layer, which is what a
    model with dozens of convolutions costs otherwise (small ops are slow on a busy multi-threaded CPU)."""
    scores: list[torch.Tensor] = [torch.full((int(w.shape[0]),), float("nan")) for w in weights]
    groups: dict[tuple[int, int], list[int]] = {}
    for j, w in enumerate(weights):
        if tuple(w.shape[2:]) != (1, 1):
            groups.setdefault((int(w.shape[2]), int(w.shape[3])), []).append(j)
    for (kh, kw), members in groups.items():
        n = max(fft_size, kh, kw)
        slices = torch.cat([weights[j].detach().to(torch.float64).cpu().reshape(-1, kh, kw) for j in members])
        sizes = [int(weights[j].shape[0]) for j in members]
        # the filter (counted over the whole group) each (kh, kw) slice belongs to
        owner = torch.cat([torch.arange(o).repeat_interleave(int(weights[j].shape[1])) + start
                           for j, o, start in zip(members, sizes, [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]])])
        fy = torch.fft.fftfreq(n, dtype=torch.float64).abs().view(-1, 1)
        fx = torch.fft.rfftfreq(n, dtype=torch.float64).view(1, -1)
        high = ((fy > 0.25) | (fx > 0.25)).to(torch.float64)
        # rfft keeps one of each conjugate pair: columns strictly inside (0, Nyquist) stand for two frequencies
        count = torch.full((1, fx.shape[1]), 2.0, dtype=torch.float64)
        count[0, 0] = 1.0
        if n % 2 == 0:
            count[0, -1] = 1.0
        total_slice = torch.empty(len(slices), dtype=torch.float64)
        upper_slice = torch.empty(len(slices), dtype=torch.float64)
        for s in range(0, len(slices), chunk):
            spec = torch.fft.rfft2(slices[s : s + chunk], s=(n, n))
            power = (spec.real**2 + spec.imag**2) * count  # (slices, n, n//2+1)
            total_slice[s : s + chunk] = power.sum((1, 2))
            upper_slice[s : s + chunk] = (power * high).sum((1, 2))
        total = torch.zeros(sum(sizes), dtype=torch.float64).index_add_(0, owner, total_slice)
        upper = torch.zeros(sum(sizes), dtype=torch.float64).index_add_(0, owner, upper_slice)
        score = torch.where(total > 0, upper / total, torch.full_like(total, float("nan"))).float()
        for j, part in zip(members, score.split(sizes)):
            scores[j] = part
    return scores


@dataclass(eq=False)
class FilterHealth(ConvWeights, Pictured):
    """Dead and aliasing-prone filters of one ``Conv2d`` (see the module docstring for the measures).

    ``norms`` / ``aliasing`` (O,): per filter; ``dead`` / ``aliased``: flagged filter indices;
    ``median_norm``: the layer's median L2 norm; ``stride``, ``kernel_size``, ``groups``: the layer's.
    ``weight``: a CPU copy of the kernel (for the picture of the flagged filters).
    """

    layer: str
    layer_type: str
    weight: torch.Tensor
    stride: tuple[int, int]
    groups: int
    norms: torch.Tensor
    aliasing: torch.Tensor
    dead: list[int]
    aliased: list[int]
    median_norm: float
    dead_fraction: float
    alias_threshold: float
    strided_only: bool
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def flagged(self) -> list[int]:
        """Dead or aliased filters, in index order."""
        return sorted(set(self.dead) | set(self.aliased))

    def table(self) -> list[dict[str, Any]]:
        """One row per filter: index, L2 norm, aliasing score (None for 1x1), dead, aliased."""
        dead, aliased = set(self.dead), set(self.aliased)
        return [{"filter": j, "norm": float(n), "aliasing": None if math.isnan(a) else float(a),
                 "dead": j in dead, "aliased": j in aliased}
                for j, (n, a) in enumerate(zip(self.norms.tolist(), self.aliasing.tolist()))]

    def summary(self) -> dict[str, Any]:
        """The layer's one summary row (what :class:`ModelHealth` lists per layer)."""
        a = self.aliasing[~torch.isnan(self.aliasing)]
        kh, kw = self.kernel_size
        return {"layer": self.layer, "type": self.layer_type, "filters": self.out_channels, "kernel": f"{kh}x{kw}",
                "stride": f"{self.stride[0]}x{self.stride[1]}", "groups": self.groups, "dead": len(self.dead),
                "aliased": len(self.aliased), "median_norm": self.median_norm,
                "mean_aliasing": float(a.mean()) if len(a) else None, "max_aliasing": float(a.max()) if len(a) else None}

    def to_dict(self) -> dict[str, Any]:
        """Summary, thresholds and the per-filter table as JSON-ready data."""
        return {**self.summary(), "dead_fraction": self.dead_fraction, "alias_threshold": self.alias_threshold,
                "strided_only": self.strided_only, "dead_filters": self.dead, "aliased_filters": self.aliased,
                "table": self.table()}

    def to_image(self, *, cell: int | None = None, title: bool = True) -> Image.Image:
        """The flagged filters (grey = 0), labelled with their index and why (``dead``, or the aliasing score)."""
        flagged = self.flagged
        caption = (f"{self.layer}: {len(self.dead)} dead, {len(self.aliased)} aliased of {self.out_channels} filters "
                   f"{self.kernel_size[0]}x{self.kernel_size[1]} stride {self.stride[0]}")
        if not flagged:
            picture = Image.new("RGB", (240, 24), (255, 255, 255))
            return titled(picture, caption + ": none flagged") if title else picture
        w = self.weight[flagged]
        norms = self.norms[flagged]
        fs = FilterSet(layer=self.layer, weight=w, groups=self.groups, in_channels=int(w.shape[1]) * self.groups,
                       stride=self.stride, norms=norms, rms=norms / math.sqrt(max(w[0].numel(), 1)), dead=[],
                       dead_fraction=0.0, max_filters=None, max_channels=16, layer_type=self.layer_type)
        labels = [f"{j} dead" if j in self.dead else f"{j} {float(self.aliasing[j]):.2f}" for j in flagged]
        kh, kw = self.kernel_size
        if fs.kind in ("rgb", "depthwise"):
            picture = grid(fs.tiles(), labels=labels, cell=cell or max(40, min(64, 8 * max(kh, kw))), columns=min(len(flagged), 8))
            return titled(picture, caption) if title else picture
        return matrix_grid(fs.channel_tiles(), row_labels=labels, column_labels=[str(j) for j in range(fs.shown_channels)],
                           cell=cell or max(12, min(48, 6 * max(kh, kw))), title=caption if title else None)

    def __str__(self) -> str:
        s = self.summary()
        return (f"{self.layer} ({s['type']} {s['kernel']} stride {s['stride']}): {s['filters']} filters, "
                f"{s['dead']} dead, {s['aliased']} aliased, median norm {self.median_norm:.4g}")


@dataclass(eq=False)
class ModelHealth(Pictured):
    """:class:`FilterHealth` of every ``Conv2d`` of a model, in ``named_modules()`` order (``layers``)."""

    layers: list[FilterHealth]
    seconds: float
    _image: Image.Image | None = field(default=None, repr=False)

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per conv layer."""
        return [h.summary() for h in self.layers]

    def layer(self, name: str) -> FilterHealth:
        for h in self.layers:
            if h.layer == name:
                return h
        raise LayerKindError(f"no conv layer {name!r} in this result{suggestion(name, [h.layer for h in self.layers])}")

    @property
    def dead(self) -> int:
        return sum(len(h.dead) for h in self.layers)

    @property
    def aliased(self) -> int:
        return sum(len(h.aliased) for h in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.rows(), "dead": self.dead, "aliased": self.aliased, "seconds": round(self.seconds, 4)}

    def to_image(self) -> Image.Image:
        """The flagged filters of the first :data:`PICTURE_LAYERS` layers that have any, stacked."""
        shown = [h.to_image() for h in self.layers if h.flagged][:PICTURE_LAYERS]
        if not shown:
            return titled(Image.new("RGB", (240, 24), (255, 255, 255)), f"no dead or aliased filters in {len(self.layers)} conv layers")
        width = max(p.size[0] for p in shown)
        canvas = Image.new("RGB", (width, sum(p.size[1] + 8 for p in shown)), (255, 255, 255))
        top = 0
        for p in shown:
            canvas.paste(p, (0, top))
            top += p.size[1] + 8
        return canvas

    def __str__(self) -> str:
        return f"{len(self.layers)} conv layers: {self.dead} dead and {self.aliased} aliased filters"


def filter_health(
    model: Model | nn.Module,
    layer: str | None = None,
    *,
    dead_fraction: float = 1e-3,
    alias_threshold: float = 0.75,
    strided_only: bool = True,
    fft_size: int = 16,
) -> FilterHealth | ModelHealth:
    """Dead and aliasing-prone filters of one ``Conv2d`` (``layer``), or of every one (``layer=None``).

    A filter is dead when all zero or its L2 norm is at most ``dead_fraction`` x the layer's median. The
    aliasing score is the share of spectral energy above half Nyquist (module docstring); a filter is
    aliased above ``alias_threshold`` (default 0.75: more high frequency than random
    noise, which scores about 0.69), only in layers with stride > 1 unless ``strided_only=False``.
    ``model``: a :class:`~convscope.Model` or a plain module (:func:`~convscope.models.as_model`). Reads weights
    only (no forward pass); the model is not changed. Returns :class:`FilterHealth` for one layer,
    :class:`ModelHealth` (one summary row per conv layer) for ``layer=None``.
    """
    if not dead_fraction >= 0:
        raise ViewOptionError(f"dead_fraction must be >= 0, got {dead_fraction}")
    if not 0 <= alias_threshold <= 1:
        raise ViewOptionError(f"alias_threshold is a share of energy in [0, 1], got {alias_threshold}")
    if fft_size < 2:
        raise ViewOptionError(f"fft_size must be at least 2, got {fft_size}")
    model = as_model(model)
    options = (dead_fraction, alias_threshold, strided_only, fft_size)
    if layer is not None:
        return _layer_health(*conv_layer(model, layer), *options)
    start = time.perf_counter()
    named = dict(model.module.named_modules())
    names = conv_layers(model)
    if not names:
        raise LayerKindError("the model has no Conv2d layer")
    scores = _aliasing_scores_of([named[n].weight for n in names], fft_size)
    layers = [_layer_health(n, named[n], *options, scores=a) for n, a in zip(names, scores)]
    return ModelHealth(layers, time.perf_counter() - start)


def _layer_health(name: str, conv: nn.Conv2d, dead_fraction: float, alias_threshold: float, strided_only: bool,
                  fft_size: int, scores: torch.Tensor | None = None) -> FilterHealth:
    w = conv.weight.detach().float().cpu().clone()
    norms = w.flatten(1).norm(dim=1)
    median = float(norms.median()) if len(norms) else 0.0
    dead_mask = dead_filters(w, dead_fraction)
    if scores is None:
        scores = _aliasing_scores_of([w], fft_size)[0]
    stride = (int(conv.stride[0]), int(conv.stride[1]))
    may_alias = max(stride) > 1 or not strided_only
    alias_mask = (scores > alias_threshold) & ~dead_mask if may_alias else torch.zeros_like(dead_mask)
    return FilterHealth(layer=name, layer_type=type(conv).__name__, weight=w, stride=stride, groups=int(conv.groups),
                        norms=norms, aliasing=scores, dead=torch.nonzero(dead_mask).flatten().tolist(),
                        aliased=torch.nonzero(alias_mask).flatten().tolist(), median_norm=median,
                        dead_fraction=dead_fraction, alias_threshold=alias_threshold, strided_only=strided_only)
