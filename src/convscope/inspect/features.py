"""Feature maps: what one layer outputs for one image, as a tensor and as a labelled grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import InputShapeError, LayerKindError, ViewOptionError
from ..models import Model, as_model, default_layer
from ..probe import Capture
from ..render import colorize, grid, normalize, titled
from ..render.picture import Pictured

SORTS = ("index", "mean", "max")


def model_input(model: Model | torch.nn.Module, x: Any) -> tuple[Model, torch.Tensor]:
    """The :class:`~convscope.Model` (:func:`~convscope.models.as_model`) and ``x`` as a validated float
    tensor (N, C, H, W) on its device.

    Images (path, PIL, array, ``sample:NAME``) go through the model's preprocessing (a plain module gets
    :data:`~convscope.models.PLAIN_MODULE_DEFAULTS`); a tensor is taken as already preprocessed, and a
    plain module is then read at the tensor's own size.
    """
    m = as_model(model, input_size=tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) else None)
    return m, m.as_input(x)


def layer_output(model: Model | torch.nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The activation (N, C, h, w) of ``layer`` for input ``x``, detached.

    One forward pass that stops right after the layer (``Capture(stop=True)``); the model is restored
    afterwards. Layers whose output is not a 4-D tensor raise :class:`LayerKindError`.
    """
    with torch.no_grad(), Capture(model, [layer], stop=True) as cap:
        cap.forward(x)
    act = cap.activations.get(layer)
    if act is None:
        raise LayerKindError(f"layer {layer!r} is never called in the model's forward pass")
    if act.ndim != 4:
        raise LayerKindError(
            f"layer {layer!r} outputs shape {tuple(act.shape)}, not feature maps (N, C, H, W); "
            "choose a convolutional layer (see `convscope summary`)"
        )
    return act.detach()


@dataclass(eq=False)
class FeatureMaps(Pictured):
    """The feature maps of one layer for one image.

    ``activations``: (C, h, w), the layer's output exactly as the network computed it (same device and
    dtype). ``picture``: the image as the network saw it (for overlays), when known. The grid picture
    (:meth:`to_image`, ``.image``) shows ``max_channels`` maps labelled with their channel numbers,
    ordered by ``sort`` (``"index"``, or ``"mean"``/``"max"`` activation, largest first), each map
    scaled to its own min..max (``scale="channel"``) or to the layer's (``scale="layer"``, which keeps
    quiet channels dark), coloured with ``cmap``.
    """

    layer: str
    activations: torch.Tensor
    picture: Image.Image | None = field(default=None, repr=False)
    max_channels: int | None = 64
    sort: str = "index"
    channels: list[int] | None = None
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the activations."""
        c, h, w = self.activations.shape
        return int(c), int(h), int(w)

    @property
    def means(self) -> torch.Tensor:
        """Mean activation of each channel over its spatial positions, shape (C,)."""
        return self.activations.float().mean(dim=(1, 2))

    def order(self, sort: str | None = None, max_channels: int | None = -1, channels: Sequence[int] | None = None) -> list[int]:
        """Channel indices shown, in display order (arguments default to the instance's settings)."""
        sort = self.sort if sort is None else sort
        max_channels = self.max_channels if max_channels == -1 else max_channels
        chosen = list(channels) if channels is not None else (self.channels if self.channels is not None else None)
        c = self.shape[0]
        if chosen is not None:
            bad = [i for i in chosen if not 0 <= int(i) < c]
            if bad:
                raise ViewOptionError(f"channel {bad[0]} out of range: layer {self.layer!r} has {c} channels (0..{c - 1})")
            return [int(i) for i in chosen]
        if sort == "index":
            idx = list(range(c))
        elif sort in ("mean", "max"):
            a = self.activations.float().flatten(1)
            score = a.mean(1) if sort == "mean" else a.amax(1)
            idx = torch.argsort(score, descending=True, stable=True).tolist()
        else:
            raise ViewOptionError(f"unknown sort {sort!r}; choose {', '.join(SORTS)}")
        return idx if max_channels is None else idx[:max_channels]

    def to_image(
        self,
        *,
        sort: str | None = None,
        max_channels: int | None = -1,
        channels: Sequence[int] | None = None,
        cell: int | None = None,
        columns: int | None = None,
        cmap: str = "viridis",
        scale: str = "channel",
        title: bool = True,
    ) -> Image.Image:
        """The chosen feature maps as a labelled grid (labels are channel numbers)."""
        if scale not in ("channel", "layer"):
            raise ViewOptionError(f"unknown scale {scale!r}; choose channel or layer")
        idx = self.order(sort, max_channels, channels)
        if not idx:
            raise ViewOptionError("no channels to show")
        a = self.activations.detach().float().cpu()
        lo, hi = float(a.min()), float(a.max())
        tiles = []
        for i in idx:
            m = a[i]
            if scale == "channel":
                tiles.append(colorize(normalize(m), cmap))
            else:
                tiles.append(colorize(((m - lo) / (hi - lo)).numpy() if hi > lo else torch.zeros_like(m).numpy(), cmap))
        c, h, w = self.shape
        cell = cell or max(48, min(96, max(h, w)))
        text = None
        if title:
            order = {"index": "by channel index", "mean": "by mean activation", "max": "by peak activation"}
            how = "chosen channels" if (channels is not None or self.channels is not None) else order.get(sort or self.sort, "")
            text = f"{self.layer}: {len(idx)} of {c} channels, {h}x{w}, {how}"
        picture = grid(tiles, labels=[str(i) for i in idx], cell=cell, columns=columns or min(len(idx), 8))
        return titled(picture, text) if text else picture


def feature_maps(
    model: Model | torch.nn.Module,
    x: Any,
    layer: str,
    *,
    max_channels: int | None = 64,
    sort: str = "index",
    channels: Sequence[int] | None = None,
) -> FeatureMaps:
    """The output of ``layer`` for one image: activations (C, h, w) plus a grid picture of the maps.

    ``model``: a :class:`~convscope.Model` or a plain module (:func:`~convscope.models.as_model`).
    ``x``: an image (path, PIL, array, ``sample:NAME``) or a tensor (1, C, H, W) already preprocessed. Costs one forward pass, stopped after ``layer``. ``max_channels``,
    ``sort`` (``"index"``, ``"mean"``, ``"max"``) and ``channels`` (explicit indices) only choose what
    the picture shows; ``activations`` always holds every channel.
    """
    if sort not in SORTS:
        raise ViewOptionError(f"unknown sort {sort!r}; choose {', '.join(SORTS)}")
    if max_channels is not None and max_channels < 1:
        raise ViewOptionError(f"max_channels must be at least 1, got {max_channels}")
    model, t = model_input(model, x)
    if t.shape[0] != 1:
        raise InputShapeError(f"feature_maps shows one image, got a batch of {t.shape[0]}; pass x[i:i+1] (channel_means takes batches)")
    act = layer_output(model, t, layer)
    picture = model.deprocess(t) if t.shape[1] == 3 else None  # the image as the network saw it
    fm = FeatureMaps(layer=layer, activations=act[0], picture=picture, max_channels=max_channels, sort=sort,
                     channels=list(channels) if channels is not None else None)
    fm.order()  # validates explicit channels now rather than at display time
    return fm


def stage_layers(model: Model | torch.nn.Module, n: int = 3) -> list[str]:
    """``n`` layers at increasing depth for a tour of feature maps: the output of stages at spread resolutions.

    Spatial layers are grouped by output resolution (a stage ends where the resolution drops); each
    group is represented by its last module among the shallowest names (e.g. ``bn1``, ``blocks.2`` and
    ``bn2`` on EfficientNet-Lite0; ``features.3``, ``features.15``, ``features`` on VGG-16). The last one is the last spatial
    layer (``default_layer(model, "cam")``); the others are spread evenly over the stages before it.
    """
    model = as_model(model)
    rows = model.layers()
    spatial = [r for r in rows if r.is_spatial and r.output_shape is not None]
    groups: dict[tuple[int, ...], list[Any]] = {}
    for r in spatial:
        groups.setdefault(tuple(r.output_shape[2:]), []).append(r)
    last = default_layer(model, "cam")
    last_size = next((tuple(r.output_shape[2:]) for r in spatial if r.name == last), None)
    position = {r.name: i for i, r in enumerate(rows)}
    stages = []
    for size, members in groups.items():
        if size == last_size:
            continue
        kept = [r for r in members if "Pool" not in r.type] or members
        shallow = min(r.depth for r in kept)
        stages.append([r for r in kept if r.depth == shallow][-1].name)
    tour = [*sorted(stages, key=position.__getitem__), last]
    if n >= len(tour):
        return tour
    if n <= 1:
        return [last]
    picks = [tour[round(i * (len(tour) - 1) / (n - 1))] for i in range(n)]
    return list(dict.fromkeys(picks))
