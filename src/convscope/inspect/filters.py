"""Convolution filters as pictures, with per-filter norms and a dead-filter count (Zeiler & Fergus 2014)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import LayerKindError, ViewOptionError, suggestion
from ..models import Model, as_model, default_layer
from ..probe import name_of, resolve_layer
from ..render import grid, matrix_grid, titled
from ..render.picture import Pictured

SCALES = ("symmetric", "minmax")


class ConvWeights:
    """Shape facts of a result that holds a convolution's ``weight`` (out, in / groups, kh, kw)."""

    weight: torch.Tensor

    @property
    def out_channels(self) -> int:
        """Number of filters (output channels) of the layer."""
        return int(self.weight.shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """(kh, kw) in input pixels of this layer."""
        return int(self.weight.shape[2]), int(self.weight.shape[3])


@dataclass(eq=False)
class FilterSet(ConvWeights, Pictured):
    """The weights of one ``Conv2d`` layer and how to look at them.

    ``weight``: a CPU float copy of the kernel, shape (out_channels, in_channels / groups, kh, kw).
    ``norms``: L2 norm of every output filter over (in, kh, kw), shape (out_channels,); ``rms`` the
    root mean square of its weights (Zeiler & Fergus renormalised first-layer filters whose RMS exceeded
    0.1). ``dead``: indices of dead filters (:func:`dead_filters`: all zero, or a norm at most ``dead_fraction``
    times the layer's median; such filters cannot respond to anything).

    Pictures (:meth:`to_image`, ``.image``): ``kind == "rgb"`` (a layer reading 3 input channels, the
    first layer) shows each filter as one RGB tile; otherwise a grid with one row per output filter and
    one column per input channel of its group, each kernel a grey tile (``kind == "depthwise"``: one
    tile per channel, since each filter reads one channel). ``scale="symmetric"`` (default) maps each
    filter's weights by w / (2 max|w|) + 0.5, so mid-grey is 0, brighter positive, darker negative, and
    the tiles of one filter share one scale; ``scale="minmax"`` stretches each filter to [0, 1].
    Dead filters (:attr:`dead`) are not stretched (their ~1e-9 weights would look like real patterns):
    they are drawn flat grey crossed by a thin red X (:func:`dead_tile`), labelled "N X",
    and the caption counts them.
    """

    layer: str
    weight: torch.Tensor
    groups: int
    in_channels: int
    stride: tuple[int, int]
    norms: torch.Tensor
    rms: torch.Tensor
    dead: list[int]
    dead_fraction: float
    scale: str = "symmetric"
    max_filters: int | None = 64
    max_channels: int | None = 16
    layer_type: str = "Conv2d"
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """``"rgb"`` (reads 3 channels, one group), ``"depthwise"`` (each filter reads one channel: depthwise
        convolutions, or a layer with a single input channel such as a grayscale first layer) or ``"channels"``."""
        if self.groups == 1 and self.weight.shape[1] == 3:
            return "rgb"
        if self.weight.shape[1] == 1:
            return "depthwise"
        return "channels"

    @property
    def shown_filters(self) -> int:
        """How many filters the picture shows (``max_filters`` caps it)."""
        return self.out_channels if self.max_filters is None else min(self.out_channels, self.max_filters)

    @property
    def shown_channels(self) -> int:
        """How many input channels per filter the picture shows (``max_channels`` caps it)."""
        n = int(self.weight.shape[1])
        return n if self.max_channels is None else min(n, self.max_channels)

    def scaled(self) -> torch.Tensor:
        """The weights mapped to [0, 1] for display, per output filter, as :attr:`scale` says."""
        w = self.weight.double()
        flat = w.flatten(1)
        if self.scale == "symmetric":
            m = flat.abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            return (w / (2 * m) + 0.5).float()
        lo = flat.amin(1).view(-1, 1, 1, 1)
        span = (flat.amax(1).view(-1, 1, 1, 1) - lo).clamp_min(1e-12)
        return ((w - lo) / span).float()

    def tiles(self) -> list[Image.Image]:
        """One picture per shown output filter: RGB for ``kind == "rgb"``, grey for ``"depthwise"``.

        For ``kind == "channels"`` a filter has one tile per input channel: use :meth:`channel_tiles`.
        """
        s = self.scaled()[: self.shown_filters]
        if self.kind == "rgb":
            arrays = s.permute(0, 2, 3, 1).numpy()
        else:
            arrays = s[:, 0].numpy()
        dead = set(self.dead)
        return [dead_tile(*a.shape[:2]) if i in dead else Image.fromarray((a * 255 + 0.5).astype(np.uint8))
                for i, a in enumerate(arrays)]

    def channel_tiles(self) -> list[list[Image.Image]]:
        """``tiles[filter][input channel]``: each kernel slice as a grey picture (shown filters/channels only;
        a dead filter's slices as :func:`dead_tile`)."""
        s = self.scaled()[: self.shown_filters, : self.shown_channels].numpy()
        dead = set(self.dead)
        return [[dead_tile(*k.shape) if i in dead else Image.fromarray((k * 255 + 0.5).astype(np.uint8)) for k in row]
                for i, row in enumerate(s)]

    def _labels(self, count: int) -> list[str]:
        dead = set(self.dead)
        return [f"{i} X" if i in dead else str(i) for i in range(count)]

    def to_image(self, *, cell: int | None = None, title: bool = True) -> Image.Image:
        """The filters as one picture (see the class docstring for the layout and the scale)."""
        kh, kw = self.kernel_size
        caption = self.caption() if title else None
        if self.kind in ("rgb", "depthwise"):
            tiles = self.tiles()
            cell = cell or max(32, min(64, 8 * max(kh, kw)))
            picture = grid(tiles, labels=self._labels(len(tiles)), cell=cell, columns=min(len(tiles), 8))
            return titled(picture, caption) if caption else picture
        tiles2 = self.channel_tiles()
        cell = cell or max(12, min(48, 6 * max(kh, kw)))
        group = int(self.weight.shape[1])
        col_labels = [str(j) for j in range(len(tiles2[0]))]
        if self.groups > 1:
            caption = (caption or "") + f" (columns: input {group} of each group)"
        return matrix_grid(tiles2, row_labels=self._labels(len(tiles2)), column_labels=col_labels, cell=cell, title=caption)

    def caption(self) -> str:
        """One line saying what the picture shows (layer, counts, kernel size, scale)."""
        kh, kw = self.kernel_size
        shown = f"{self.shown_filters} of {self.out_channels}" if self.shown_filters < self.out_channels else f"{self.out_channels}"
        text = f"{self.layer}: {shown} filters {kh}x{kw}"
        if self.kind == "channels":
            n = int(self.weight.shape[1])
            text += f" x {self.shown_channels} of {n} inputs" if self.shown_channels < n else f" x {n} inputs"
        text += ", grey = 0" if self.scale == "symmetric" else ", min-max per filter"
        return text + (f"; red X = dead ({len(self.dead)})" if self.dead else "")

    def __str__(self) -> str:
        n = self.norms
        kh, kw = self.kernel_size
        return (
            f"{self.layer} ({self.layer_type}): {self.out_channels} filters of {int(self.weight.shape[1])}x{kh}x{kw}, "
            f"groups {self.groups}, stride {self.stride[0]}x{self.stride[1]}; L2 norm min {n.min():.4g}, "
            f"median {n.median():.4g}, max {n.max():.4g}; dead filters: {len(self.dead)}"
        )


#: Colours of a dead filter's tile: flat grey crossed by red.
DEAD_GREY = (128, 128, 128)
DEAD_MARK = (220, 40, 40)


def dead_tile(height: int, width: int, scale: int = 8) -> Image.Image:
    """The picture of a dead filter with a ``height`` x ``width`` kernel: flat grey, ``scale`` times the
    kernel's size (so the mark stays thin when the grid enlarges it), crossed by a thin red X: it cannot
    pass for a pattern of the kernel."""
    h, w = height * scale, width * scale
    tile = np.empty((h, w, 3), np.uint8)
    tile[:] = DEAD_GREY
    for y in range(h):
        x = round(y * (w - 1) / max(h - 1, 1))
        tile[y, x] = tile[y, w - 1 - x] = DEAD_MARK
    return Image.fromarray(tile)


#: A filter whose norm is at most this share of its layer's median norm is dead (and any all-zero filter).
DEAD_FRACTION = 1e-3


def dead_filters(weight: torch.Tensor, fraction: float = DEAD_FRACTION) -> torch.Tensor:
    """Which output filters of a convolution kernel (O, I, kh, kw) are dead, as a bool mask (O,): all zero, or an
    L2 norm at most ``fraction`` times the layer's median norm. The one definition of a dead filter, used by the
    filter pictures, :func:`~convscope.inspect.filter_health`, the report and the atlas. The median, not the
    largest norm, is the reference: one outsized filter must not make ordinary ones look dead."""
    w = weight.detach().float().flatten(1)
    norms = w.norm(dim=1)
    median = float(norms.median()) if len(norms) else 0.0
    return (w.abs().amax(1) == 0) | (norms <= fraction * median)


def conv_layers(model: Model | nn.Module) -> list[str]:
    """Names of every ``Conv2d`` (subclasses included) in ``named_modules()`` order."""
    return [n for n, m in as_model(model).module.named_modules() if n and isinstance(m, nn.Conv2d)]


def conv_layer(model: Model, layer: str | nn.Module, why: str = "") -> tuple[str, nn.Conv2d]:
    """``(name, module)`` of the ``Conv2d`` called ``layer``. Unknown names raise
    :class:`~convscope.errors.LayerNotFoundError`; a layer that is not a convolution raises
    :class:`LayerKindError` naming close convolutions (``why``: what the caller needed it for)."""
    conv = resolve_layer(model.module, layer)
    name = layer if isinstance(layer, str) else name_of(model.module, conv)
    if not isinstance(conv, nn.Conv2d):
        convs = conv_layers(model)
        hint = suggestion(name, convs) or (f"; convolutions include {', '.join(convs[:5])}" if convs else "; the model has no Conv2d")
        raise LayerKindError(f"layer {name!r} is a {type(conv).__name__}, not a Conv2d{why}{hint}")
    return name, conv


def filters(
    model: Model | nn.Module,
    layer: str | None = None,
    *,
    max_filters: int | None = 64,
    max_channels: int | None = 16,
    scale: str = "symmetric",
    dead_fraction: float = 1e-3,
) -> FilterSet:
    """The kernels of a ``Conv2d`` layer (default: the first convolution) with norms and a picture.

    ``model``: a :class:`~convscope.Model` or a plain module (:func:`~convscope.models.as_model`).
    ``max_filters`` / ``max_channels`` (``None``: all) limit what the picture shows (the first ones by
    index); the weights are always complete. ``scale``: ``"symmetric"`` (grey = 0) or ``"minmax"``.
    A filter is dead when :func:`dead_filters` says so (all zero, or an L2 norm at most ``dead_fraction`` x the
    layer's median: the one definition :func:`~convscope.inspect.filter_health` uses too).
    A layer that is not a ``Conv2d`` raises :class:`LayerKindError` naming close convolutions.
    """
    model = as_model(model)
    if scale not in SCALES:
        raise ViewOptionError(f"unknown filter scale {scale!r}; choose {' or '.join(SCALES)}")
    for option, value in (("max_filters", max_filters), ("max_channels", max_channels)):
        if value is not None and value < 1:
            raise ViewOptionError(f"{option} must be at least 1, got {value}")
    name, conv = conv_layer(model, layer if layer is not None else default_layer(model, "first_conv"), ", so it has no filters")
    w = conv.weight.detach().float().cpu().clone()
    norms = w.flatten(1).norm(dim=1)
    rms = norms / math.sqrt(w[0].numel())
    dead = dead_filters(w, dead_fraction).nonzero().flatten().tolist()
    return FilterSet(
        layer=name,
        weight=w,
        groups=int(conv.groups),
        in_channels=int(conv.in_channels),
        stride=(int(conv.stride[0]), int(conv.stride[1])),
        norms=norms,
        rms=rms,
        dead=dead,
        dead_fraction=dead_fraction,
        scale=scale,
        max_filters=max_filters,
        max_channels=max_channels,
        layer_type=type(conv).__name__,
    )
