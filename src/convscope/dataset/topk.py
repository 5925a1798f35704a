"""Top activating images and patches per channel: what a unit responds to across a dataset.

Zeiler & Fergus (ECCV 2014, "Visualizing and Understanding Convolutional Networks", fig. 2) show, for
each unit, the dataset images (and the image patches) that excite it most. :func:`top_activations`
streams a folder or any list of images through the model once, stopping each forward pass right after
the layer, and keeps for every chosen channel the ``k`` images with the largest response:

- ``reduce="max"``: the largest value of the channel's map, and where (``y``, ``x`` in the layer's grid)
  it was; the input patch behind that unit is its receptive field (``probe.layer_table``), clipped to
  the image;
- ``reduce="mean"``: the mean over the map (no position).

Memory is bounded by channels x k whatever the dataset size: after each batch the running top-k of
every channel is merged with the batch's scores by one stable sort over ``[kept; new]`` (vectorised
across channels), so ties go to the earlier image and the result equals a full sort of all responses.
With ``state=PATH`` the running top-k, the list of inputs and the progress are saved atomically every
``save_every`` batches, on Ctrl-C and at the end; the same call again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..models import Model, as_model
from ..options import Option
from ..probe import ReceptiveField
from ..render import matrix_grid
from ..render.picture import Pictured
from .engine import Forward, Reducer, Remapped, RunInfo, feature_maps
from .engine import run as run_engine
from .folder import (
    BATCH_SIZE,
    SAVE_EVERY,
    DatasetError,
    tensor_picture,
)
from .projection import BATCH_SIZE as PROJECT_BATCH_SIZE
from .projection import DEFAULT_METHOD, METHODS, SCALES, Projections, effective_box, method_note, project_hits

REDUCES = ("max", "mean")
STATE_FORMAT = "convscope-topk/1"
#: Channels drawn by ``TopK.image`` / ``TopK.grid()`` when none are named.
DEFAULT_ROWS = 16
#: Images kept per channel: memory grows with channels x min(k, images seen), so k is bounded.
K = Option(int, 9, "images kept per channel", minimum=1, maximum=100_000)


class TopKError(DatasetError):
    """A top-k option that cannot be used (k < 1, an unknown reduce, a channel out of range...)."""


# ============================================================================ result


@dataclass(frozen=True)
class Hit:
    """One of a channel's top images: ``rank`` (1 = strongest), ``image`` (position in the inputs),
    ``source`` (its file, ``None`` for in-memory inputs), ``value`` (the response), ``y``/``x`` (where in
    the layer's grid, ``None`` for ``reduce="mean"``), ``box`` (top, left, bottom, right) of the input
    patch behind that unit in the network's input picture, clipped, end exclusive; ``None`` for mean)."""

    rank: int
    image: int
    source: str | None
    value: float
    y: int | None
    x: int | None
    box: tuple[int, int, int, int] | None


@dataclass(eq=False)
class TopK(Pictured):
    """The ``k`` images that most activate each chosen channel of ``layer``.

    ``channels``: the channel numbers, one row each. ``values`` (R, K): responses, strongest first (in the
    layer's own units: the map's maximum or mean). ``indices`` (R, K): positions of those images in the
    inputs. ``positions`` (R, K, 2): (y, x) of the maximum in the layer's h x w grid (-1 for ``"mean"``).
    K = min(k, images scored). ``sources``: the file of every input (``None`` for in-memory ones).
    ``processed``: inputs done (skipped ones included), ``total``: inputs in all (``None`` if unknown),
    ``skipped``: ``(position, reason)`` of unreadable files. ``input_size``: (H, W) fed to the network,
    ``map_size``: the layer's (h, w). ``receptive_field``: the layer's (``None`` where undefined).
    ``interrupted``: stopped by Ctrl-C before the end (rerun with the same state to continue).
    """

    layer: str
    reduce: str
    k: int
    channels: list[int]
    values: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    sources: list[str | None] | None
    processed: int
    total: int | None
    skipped: list[tuple[int, str]]
    input_size: tuple[int, int]
    map_size: tuple[int, int]
    receptive_field: ReceptiveField | None
    interrupted: bool = False
    seconds: float = 0.0
    model: Any = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ data
    @property
    def complete(self) -> bool:
        """Whether every input was processed."""
        return self.total is not None and self.processed >= self.total

    def row(self, channel: int) -> int:
        """The row of ``channel`` in :attr:`values` (channels are numbers of the layer, rows their order here)."""
        try:
            return self.channels.index(int(channel))
        except ValueError:
            raise TopKError(f"channel {channel} was not part of this run (channels: {channel_ranges(self.channels)})") from None

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """Input box (top, left, bottom, right) seen by unit (y, x), clipped to the input picture."""
        rf = self.receptive_field
        if rf is None:
            raise TopKError(f"layer {self.layer!r} has no defined receptive field (a resampling op), so no patch")
        return rf.box(int(y), int(x), clip=self.input_size)

    def hits(self, channel: int) -> list[Hit]:
        """The top images of ``channel``, strongest first."""
        r = self.row(channel)
        out = []
        for rank, (v, i, (y, x)) in enumerate(zip(self.values[r].tolist(), self.indices[r].tolist(), self.positions[r].tolist()), 1):
            if i < 0:
                break
            where = (None, None) if self.reduce == "mean" else (y, x)
            box = None if self.reduce == "mean" or self.receptive_field is None else self.box(y, x)
            source = self.sources[i] if self.sources is not None and i < len(self.sources) else None
            out.append(Hit(rank, int(i), source, float(v), where[0], where[1], box))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready data (files, values, positions, boxes per channel)."""
        rf = self.receptive_field
        return {
            "layer": self.layer,
            "reduce": self.reduce,
            "k": self.k,
            "processed": self.processed,
            "total": self.total,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "input_size": list(self.input_size),
            "map_size": list(self.map_size),
            "receptive_field": None if rf is None else {"size": None if rf.size is None else list(rf.size),
                                                        "stride": list(rf.stride), "start": list(rf.start)},
            "skipped": [{"image": i, "source": self._source(i), "reason": r} for i, r in self.skipped],
            "channels": [
                {"channel": c, "top": [{"rank": h.rank, "image": h.image, "source": h.source, "value": h.value,
                                        "y": h.y, "x": h.x, "box": None if h.box is None else list(h.box)}
                                       for h in self.hits(c)]}
                for c in self.channels
            ],
        }

    def _source(self, i: int) -> str | None:
        return self.sources[i] if self.sources is not None and 0 <= i < len(self.sources) else None

    # ------------------------------------------------------------------ pictures
    def picture(self, image: int, images: Sequence[Any] | torch.Tensor | None = None) -> Image.Image:
        """Input ``image`` as the network saw it (resized and cropped), read back from its file.

        In-memory inputs are not kept (only their positions are): pass the same ``images`` again
        (the list of PIL images, or the tensors) to draw them.
        """
        if images is not None:
            item = images[image]
            if isinstance(item, torch.Tensor):
                return tensor_picture(self.model, item)
            return self._transform(item)
        source = self._source(image)
        if source is None:
            raise TopKError(f"input {image} was an in-memory image, which is not kept; pass images=<the same inputs> to draw it")
        return self._transform(source)

    def _transform(self, item: Any) -> Image.Image:
        if self.model is None:
            raise TopKError("reading images back needs the convscope Model (result.model) that made this result")
        return self.model.transform_image(item)

    def patches(self, channel: int, images: Sequence[Any] | torch.Tensor | None = None) -> list[Image.Image]:
        """The input patches behind ``channel``'s top responses, strongest first (PIL crops).

        For ``reduce="max"`` each patch is the receptive field of the maximal unit, clipped to the image;
        for ``"mean"`` (or a layer without a defined receptive field) it is the whole picture. Files are
        read again; in-memory inputs need ``images`` (see :meth:`picture`).
        """
        out = []
        for h in self.hits(channel):
            pic = self.picture(h.image, images)
            out.append(pic.crop((h.box[1], h.box[0], h.box[3], h.box[2])) if h.box is not None else pic)
        return out

    def grid(self, channels: Sequence[int] | None = None, *, mode: str | None = None,
             images: Sequence[Any] | torch.Tensor | None = None, cell: int | None = None, title: bool = True,
             projections: Projections | None = None, scale: str = "signed") -> Image.Image:
        """Rows = channels, columns = their top-k images, strongest on the left.

        ``mode="patch"`` (default for ``reduce="max"``): each tile is the unit's receptive field, the part
        outside the image left grey so patches keep their place; ``mode="image"`` (default for ``"mean"``):
        whole pictures, with the patch box drawn in red for ``"max"``; ``mode="projection"``: each patch
        followed by the unit's projection into it, from ``projections`` (the result of an explicit
        :meth:`projected` call: drawing never runs the network), drawn with ``scale``; both cropped to the
        projections' effective box, see :func:`~convscope.dataset.projection.effective_box`. ``channels``: which
        rows (default: the first :data:`DEFAULT_ROWS` of the run; with ``projections``, its channels).
        """
        mode = mode or ("patch" if self.reduce == "max" and self.receptive_field is not None else "image")
        if mode not in ("patch", "image", "projection"):
            raise TopKError(f"unknown mode {mode!r}; choose patch, image or projection")
        if mode in ("patch", "projection") and (self.reduce != "max" or self.receptive_field is None):
            raise TopKError(f"{mode} mode needs reduce='max' and a layer with a receptive field; use mode='image'")
        if mode == "projection" and projections is None:
            raise TopKError("mode='projection' draws projections computed by an explicit call: "
                            "p = r.projected(model, channels); r.grid(mode='projection', projections=p)")
        default = (list(dict.fromkeys(projections.channels)) if projections is not None and mode == "projection"
                   else self.channels[:DEFAULT_ROWS])
        chosen = list(channels) if channels is not None else default
        if not chosen:
            raise TopKError("no channels to draw")
        if mode == "projection":
            missing = [c for c in chosen if c not in projections.channels]
            if missing:
                raise TopKError(f"channel {missing[0]} has no projections in the result given; project it with "
                                f"r.projected(model, {chosen})")
            return self._projection_grid(chosen, images, cell, title, scale, projections)
        cache: dict[int, Image.Image] = {}

        def pic(i: int) -> Image.Image:
            if i not in cache:
                cache[i] = self.picture(i, images)
            return cache[i]

        rows = []
        for c in chosen:
            tiles = []
            for h in self.hits(c):
                p = pic(h.image)
                tiles.append(_padded_patch(p, self._unclipped(h)) if mode == "patch" else _boxed(p, h.box))
            rows.append(tiles)
        text = None
        if title:
            text = f"{self.layer}: top {self.k} of {self.processed - len(self.skipped)} images by {self.reduce} response"
            text += "" if self.complete or self.total is None else f" ({self.processed}/{self.total} done)"
        return _channel_grid(rows, chosen, cell, text, lambda j: str(j + 1))

    def _projection_grid(self, chosen: list[int], images: Any, cell: int | None, title: bool, scale: str,
                         proj: Projections) -> Image.Image:
        if scale not in SCALES:
            raise TopKError(f"unknown projection scale {scale!r}; choose {' or '.join(SCALES)}")
        method = proj.method
        cache: dict[int, Image.Image] = {}
        rows = []
        for c in chosen:
            rows.append([tile for pair in self.projection_pairs(c, proj, images=images, scale=scale, cache=cache)
                         for tile in pair])
        text = None
        if title:
            text = (f"{self.layer}: top {self.k} patches, each followed by its {method} projection "
                    f"({'grey = 0' if scale == 'signed' else '|x|, black = 0'}; effective field)")
            text += " (interrupted)" if proj.interrupted else ""
            text += " - no max-pooling: the same for every image" if proj.note else ""
        return _channel_grid(rows, chosen, cell, text, lambda j: str(j // 2 + 1) if j % 2 == 0 else "")

    def projection_pairs(self, channel: int, projections: Projections, *, images: Sequence[Any] | torch.Tensor | None = None,
                         scale: str = "signed", cache: dict[int, Image.Image] | None = None
                         ) -> list[tuple[Image.Image, Image.Image]]:
        """``channel``'s hits as (patch, projection) pictures, strongest first, both cropped to the projections'
        effective box (the patch's part outside the image grey), the projection with its own contrast stretch.
        ``projections``: from :meth:`projected` (no network pass here); ``cache``: pictures by image, reused."""
        cache = {} if cache is None else cache
        out = []
        for m, h in zip(projections.rows(channel), self.hits(channel)):
            if h.image not in cache:
                cache[h.image] = self.picture(h.image, images)
            patch = _padded_patch(cache[h.image], self._unclipped(h))
            if projections.effective is not None:
                t, left, b, r = projections.effective
                patch = patch.crop((left, t, r, b))
            out.append((patch, projections.picture(m, scale)))
        return out

    # ------------------------------------------------------------------ projections and dead units
    def projected(self, model: Any = None, channels: Sequence[int] | None = None, *, method: str = DEFAULT_METHOD,
                  images: Sequence[Any] | torch.Tensor | None = None, batch_size: int = 16,
                  progress: bool | None = None) -> Any:
        """Every hit of ``channels`` projected back to pixel space (Zeiler & Fergus 2014, fig. 2), as data.

        For hit (image i, unit (y, x) of channel c) the layer's gradient is a one-hot at (c, y, x) and is sent
        down to the input with ``method``'s backward rule for ReLU/ReLU6: ``"guided"`` (guided backpropagation,
        default: it depends on the image on every architecture), ``"deconvnet"`` (Zeiler & Fergus; on a model
        without max-pooling it has no switches and gives the same pattern for every image: the result's
        ``note`` says so and a :class:`~convscope.probe.NoSwitchesWarning` is issued) or
        ``"gradient"``. The result is cropped to the unit's receptive-field box, the same box as the patch;
        ``effective`` is the centred part of the box holding 90% of the projections' mass, which pictures show. All hits of all channels are batched: each batch of
        ``batch_size`` hits costs one forward pass (stopped at the layer) and one backward pass.

        ``model``: the convscope Model (or plain module) that made this run (default: :attr:`model`); ``images``:
        the same in-memory inputs, when the run was not made from files (see :meth:`picture`). ``channels``
        default to every channel of the run. Returns a :class:`~convscope.dataset.projection.Projections`.
        """
        if method not in METHODS:
            raise TopKError(f"unknown projection method {method!r}; choose {', '.join(METHODS)}")
        if self.reduce != "max" or self.receptive_field is None:
            raise TopKError("projections need reduce='max' (a unit position per hit) and a layer with a receptive field")
        PROJECT_BATCH_SIZE.check("batch_size", batch_size)
        model = as_model(model) if model is not None else self.model
        if model is None:
            raise TopKError("projections need the model: pass the module this run was made with")
        chosen = list(channels) if channels is not None else list(self.channels)
        hits = [(c, h.image, h) for c in chosen for h in self.hits(c)]
        note = method_note(model.module, method)
        start = time.perf_counter()
        crops, values, batches, interrupted = project_hits(
            model, self.layer, hits, lambda idx: self._inputs(model, idx, images),
            lambda y, x: self.receptive_field.box(y, x), method=method, batch_size=batch_size, progress=progress)
        return Projections(layer=self.layer, method=method, channels=[h[0] for h in hits], ranks=[h[2].rank for h in hits],
                           images=[h[1] for h in hits], units=[(h[2].y, h[2].x) for h in hits],
                           boxes=[self.receptive_field.box(h[2].y, h[2].x) for h in hits], crops=crops, values=values,
                           forward_passes=batches, backward_passes=batches, seconds=time.perf_counter() - start,
                           interrupted=interrupted, std=tuple(model.std), effective=effective_box(crops), note=note)

    def projections(self, model: Any, channel: int, method: str = DEFAULT_METHOD,
                    images: Sequence[Any] | torch.Tensor | None = None, *, scale: str = "signed",
                    batch_size: int = 16) -> list[Image.Image]:
        """``channel``'s top-k projections as pictures, strongest first, each cropped to the effective box.

        See :meth:`projected` for the method; ``scale="signed"`` shows 0.5 + x / (2 max|x|) per picture
        (Zeiler & Fergus's grey = 0 display, in colour), ``"abs"`` the largest |x| over colours, black = 0.
        """
        if scale not in SCALES:
            raise TopKError(f"unknown projection scale {scale!r}; choose {' or '.join(SCALES)}")
        self.row(channel)
        return self.projected(model, [channel], method=method, images=images, batch_size=batch_size).pictures(channel, scale)

    def _inputs(self, model: Model, idx: list[int], images: Sequence[Any] | torch.Tensor | None) -> torch.Tensor:
        """Preprocessed inputs (N, C, H, W) of positions ``idx``, on the model's device."""
        if images is not None:
            items = [images[i] for i in idx]
            if all(isinstance(t, torch.Tensor) for t in items):
                return torch.stack([t[0] if t.ndim == 4 else t for t in items]).to(model.device)
            return model.preprocess(list(items))
        missing = [i for i in idx if self._source(i) is None]
        if missing:
            raise TopKError(f"input {missing[0]} was an in-memory image, which is not kept; pass images=<the same inputs>")
        return model.preprocess([self._source(i) for i in idx])

    def dead(self, threshold: float = 0.0) -> list[int]:
        """Channels whose largest response over every image scored is at most ``threshold`` (never fire).

        Needs ``reduce="max"``: the strongest hit of a channel is then its maximum over the whole dataset,
        so for a layer after a ReLU a channel listed here is exactly zero everywhere on these images. Only
        the images processed so far count (see :attr:`complete`).
        """
        if self.reduce != "max":
            raise TopKError("dead units need reduce='max' (the largest response over the dataset)")
        if self.values.numel() == 0:
            return []
        top = self.values[:, 0]
        return [c for c, v in zip(self.channels, top.tolist()) if not v > threshold]

    def _unclipped(self, h: Hit) -> tuple[int, int, int, int]:
        rf = self.receptive_field
        assert rf is not None and h.y is not None and h.x is not None
        if rf.size is None:
            return (0, 0, *self.input_size)
        return rf.box(h.y, h.x)

    def to_image(self) -> Image.Image:
        """:meth:`grid` with its defaults."""
        return self.grid()

    def __str__(self) -> str:
        state = "complete" if self.complete else (f"{self.processed}/{self.total}" if self.total else f"{self.processed} done")
        return (f"{self.layer}: top {self.k} by {self.reduce} for {len(self.channels)} channels over "
                f"{self.processed - len(self.skipped)} images ({state}, {len(self.skipped)} skipped)")


def _channel_grid(rows: list[list[Image.Image]], channels: list[int], cell: int | None, title: str | None,
                  column_label: Callable[[int], str]) -> Image.Image:
    """One row of tiles per channel (an empty row gets a white dot); ``cell``: tile size (default: the largest
    tile, 48..96 px); ``column_label(j)``: the label of column ``j``."""
    rows = [tiles or [Image.new("RGB", (1, 1), (255, 255, 255))] for tiles in rows]
    if cell is None:
        cell = max(48, min(96, max(max(t.size) for r in rows for t in r)))
    width = max(len(r) for r in rows)
    return matrix_grid(rows, row_labels=[f"ch {c}" for c in channels], column_labels=[column_label(j) for j in range(width)],
                       cell=cell, pad=2, title=title)


def _padded_patch(picture: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The box (top, left, bottom, right), possibly reaching outside ``picture``; outside is grey."""
    top, left, bottom, right = box
    tile = Image.new("RGB", (right - left, bottom - top), (128, 128, 128))
    w, h = picture.size
    ct, cl, cb, cr = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    if cb > ct and cr > cl:
        tile.paste(picture.crop((cl, ct, cr, cb)), (cl - left, ct - top))
    return tile


def _boxed(picture: Image.Image, box: tuple[int, int, int, int] | None) -> Image.Image:
    if box is None:
        return picture
    out = picture.copy()
    width = max(1, round(max(picture.size) / 100))
    top, left, bottom, right = box
    ImageDraw.Draw(out).rectangle((left, top, right - 1, bottom - 1), outline=(255, 0, 0), width=width)
    return out


def channel_ranges(channels: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (the ``--channels`` syntax)."""
    parts, i = [], 0
    while i < len(channels):
        j = i
        while j + 1 < len(channels) and channels[j + 1] == channels[j] + 1:
            j += 1
        parts.append(str(channels[i]) if i == j else f"{channels[i]}-{channels[j]}")
        i = j + 1
    return ",".join(parts)


# ============================================================================ running top-k


def batch_scores(act: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: the response (B, C) and where it is (flat index into h x w; -1 for mean).

    ``"max"`` takes the first maximal position; NaN responses count as ``-inf``.
    """
    flat = act.flatten(2).float()
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, -math.inf), flat)
    if reduce == "max":
        values, where = flat.max(dim=2)
        return values, where
    return flat.mean(dim=2), torch.full(flat.shape[:2], -1, dtype=torch.long, device=flat.device)


def merge_topk(values: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor | None,
               new_values: torch.Tensor, new_indices: torch.Tensor, new_positions: torch.Tensor | None, k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge kept (R, m) with a batch (R, B) into the top ``k`` per row, largest first. ``positions``: what goes
    with each entry, (R, m, ...) and (R, B, ...) (flat map positions, or whole maps), reordered alike; ``None``:
    none are tracked, and None comes back.

    One stable descending sort over ``[kept; new]`` per row, all rows at once: kept entries come first
    and both parts are in image order, so equal values keep the earlier image (the same order a stable
    sort over all images would give).
    """
    v = torch.cat([values, new_values], dim=1)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    kept_positions = None
    if positions is not None:
        both = torch.cat([positions, new_positions.to(positions.device)], dim=1)
        kept_positions = both.gather(1, order.view(*order.shape, *[1] * (both.ndim - 2)).expand(-1, -1, *both.shape[2:]))
    return v.gather(1, order), torch.cat([indices, new_indices], dim=1).gather(1, order), kept_positions


# ============================================================================ the reducer


class TopKReducer(Reducer):
    """The running top-``k`` of every chosen channel of ``layer`` (see the module docstring), as a reducer of the
    dataset engine (:func:`convscope.dataset.engine.run`): several share one forward pass with other analyses.

    State: ``values``/``indices``/``positions`` (R, m <= k) and the rows (channels) and map size, all replaced, never
    changed in place. :meth:`merge_states` of a run over earlier inputs with one over later inputs equals the run
    over both (ties go to the earlier image in both)."""

    def __init__(self, layer: str, *, k: int = 9, channels: Sequence[int] | None = None, reduce: str = "max",
                 name: str | None = None):
        super().__init__()
        K.check("k", k)
        if reduce not in REDUCES:
            raise TopKError(f"unknown reduce {reduce!r}; choose {' or '.join(REDUCES)}")
        wanted = None if channels is None else [int(c) for c in channels]
        if wanted is not None:
            if not wanted:
                raise TopKError("channels is empty")
            if len(set(wanted)) != len(wanted):
                raise TopKError("channels holds duplicates")
            if min(wanted) < 0:
                raise TopKError(f"channel {min(wanted)} is negative")
        self.layer, self.k, self.reduce, self.channels = layer, k, reduce, wanted
        self.layers = (layer,)
        self.name = name or f"topk:{layer}"

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "k": self.k, "reduce": self.reduce, "channels": self.channels}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        act = feature_maps(batch.activations[self.layer], self.layer)
        c = int(act.shape[1])
        if self.channels is not None and max(self.channels) >= c:
            raise TopKError(f"channel {max(self.channels)} out of range: layer {self.layer!r} has {c} channels (0..{c - 1})")
        rows = self.channels if self.channels is not None else list(range(c))
        v, p = batch_scores(act.index_select(1, torch.as_tensor(rows, device=act.device)), self.reduce)
        idx = batch.index.to(v.device).unsqueeze(0).expand(v.shape[1], -1)
        part = {"values": v.T.contiguous(), "indices": idx.contiguous(), "positions": p.T.contiguous(), "rows": rows,
                "map_size": [int(s) for s in act.shape[-2:]]}
        return self.merge_states(state, part)

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or b is None:
            return _trim(b if a is None else a, self.k)
        if a["map_size"] != b["map_size"]:
            raise TopKError(f"layer {self.layer!r} gave maps of {tuple(b['map_size'])} after {tuple(a['map_size'])}; "
                            "every input must have the same size")
        values, indices, positions = merge_topk(a["values"], a["indices"], a["positions"], b["values"].to(a["values"].device),
                                                b["indices"].to(a["values"].device), b["positions"].to(a["values"].device), self.k)
        return {"values": values, "indices": indices, "positions": positions, "rows": a["rows"], "map_size": a["map_size"]}

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> TopK:
        model = run.model
        if state is None:  # nothing scored (every file skipped, or interrupted at once)
            empty = torch.zeros((0, 0))
            return TopK(self.layer, self.reduce, self.k, [], empty, empty.long(), empty.long().view(0, 0, 2), run.paths,
                        run.processed, run.total, list(run.skipped), (0, 0), (0, 0), None, run.interrupted, run.seconds, model)
        values, indices, flat = state["values"].cpu(), state["indices"].cpu(), state["positions"].cpu()
        w = int(state["map_size"][1])
        positions = torch.stack([torch.where(flat >= 0, flat // w, -1), torch.where(flat >= 0, flat % w, -1)], dim=-1)
        input_size = tuple(int(s) for s in (run.input_size or (0, 0)))
        rf = _receptive_field(model, self.layer, input_size) if self.reduce == "max" and model is not None else None
        return TopK(layer=self.layer, reduce=self.reduce, k=self.k, channels=[int(c) for c in state["rows"]], values=values,
                    indices=indices, positions=positions, sources=run.paths, processed=run.processed, total=run.total,
                    skipped=list(run.skipped), input_size=input_size, map_size=tuple(int(s) for s in state["map_size"]),
                    receptive_field=rf, interrupted=run.interrupted, seconds=run.seconds, model=model)


def _trim(state: dict[str, Any] | None, k: int) -> dict[str, Any] | None:
    """A state with more than ``k`` columns (one batch's scores) cut to its top ``k``, stably."""
    if state is None or state["values"].shape[1] <= k:
        return state
    order = torch.sort(state["values"], dim=1, descending=True, stable=True).indices[:, :k]
    return {**state, "values": state["values"].gather(1, order), "indices": state["indices"].gather(1, order),
            "positions": state["positions"].gather(1, order)}


def sidecar_path(state: str | os.PathLike) -> Path:
    """The JSON manifest written next to a state file (``PATH.json``)."""
    return Path(str(state) + ".json")


# ============================================================================ the run


def top_activations(
    model: Any,
    images: Any,
    layer: str,
    *,
    k: int = 9,
    channels: Sequence[int] | None = None,
    reduce: str = "max",
    batch_size: int = 32,
    state: str | os.PathLike | None = None,
    save_every: int = 20,
    progress: bool | None | Callable[[int, int | None], None] = None,
    workers: int | None = None,
    amp: str | None = None,
    engine: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
    rescore: bool = True,
) -> TopK:
    """The ``k`` inputs with the largest response of each channel of ``layer`` (Zeiler & Fergus 2014).

    ``images``: a folder (listed recursively, sorted by relative path), a list of paths / ``sample:NAME``
    / PIL images, a tensor (N, 3, H, W), an iterable of preprocessed tensors or a torch Dataset. ``channels``:
    channel numbers to rank (default: all). ``reduce``: ``"max"`` (spatial maximum, with its position) or
    ``"mean"`` (spatial mean). ``batch_size``: images per forward pass; each pass stops right after
    ``layer``. Unreadable files are skipped and counted (:attr:`TopK.skipped`).

    ``state``: a file to save to (see :class:`convscope.dataset.engine.StateStore`: plain tensors loaded with
    ``weights_only=True``, plus a JSON manifest ``PATH.json`` with the list of inputs): written atomically every
    ``save_every`` batches, at the end, on Ctrl-C and on errors. If it exists, the run continues from it; a
    state saved for other inputs, layer, k, channels, reduce or weights raises :class:`StateMismatchError`.
    In-memory inputs can be checked only by their count. ``progress``: a tqdm bar (``None``: only on a
    terminal), or a callable ``(processed, total)`` called after every batch. ``workers``, ``amp``, ``engine``,
    ``address``, ``num_gpus``: see :func:`convscope.dataset.engine.run` (decode threads, autocast, Ray). Under
    autocast (``amp``) low precision reorders near-ties (bf16 keeps 8 bits of mantissa): with ``rescore`` (default)
    the run keeps :data:`RESCORE_MARGIN` x k candidates per channel, then reads the candidate images again in
    float32 and ranks them by exact values (one extra pass over at most channels x 3k images); ``rescore=False``
    returns the autocast ranking.

    ``model``: a :class:`~convscope.Model`, or a plain module (:func:`convscope.as_model`: files are then
    read with the documented plain-module preprocessing). A run whose every file is unreadable raises
    :class:`~convscope.dataset.folder.UnreadableImagesError`; some unreadable files are listed, not fatal.
    Memory: channels x min(k, images) values; ``k`` is at most :data:`K`'s maximum. To compute channel
    statistics or embeddings in the same pass, give :func:`~convscope.dataset.engine.run` several reducers.

    Ctrl-C stops the run and returns what is done (``interrupted=True``). Returns a :class:`TopK`.
    """
    reducer = TopKReducer(layer, k=k, channels=channels, reduce=reduce)
    BATCH_SIZE.check("batch_size", batch_size)
    SAVE_EVERY.check("save_every", save_every)
    if amp is not None and rescore:
        # under autocast, keep a margin of candidates, then rank them again by exact float32 values
        reducer = TopKReducer(layer, k=min(K.maximum, RESCORE_MARGIN * k), channels=channels, reduce=reduce)
    found = run_engine(model, images, [reducer], what="top-k", batch_size=batch_size, state=state, save_every=save_every,
                       progress=progress, desc=f"top-k {layer}", workers=workers, amp=amp, engine=engine, address=address,
                       num_gpus=num_gpus)
    result = found.results[0]
    if amp is None or not rescore or result.interrupted or not result.channels:
        return result
    return _rescored(as_model(model), found.info, result, layer, k, channels, reduce, batch_size, workers)


#: Under autocast, top_activations keeps this many times k candidates per channel and ranks them again in float32.
RESCORE_MARGIN = 3


def _rescored(model: Model, info: RunInfo, found: TopK, layer: str, k: int, channels: Sequence[int] | None, reduce: str,
              batch_size: int, workers: int | None) -> TopK:
    """``found`` (an autocast run's top candidates) ranked again by float32 values of the candidate images only."""
    source = found.sources
    candidates = sorted({int(i) for i in found.indices.flatten().tolist() if i >= 0})
    if source is None or any(source[i] is None for i in candidates):
        return dataclasses.replace(found, k=k, values=found.values[:, :k], indices=found.indices[:, :k],
                                   positions=found.positions[:, :k])  # in-memory inputs are not kept: no second look
    exact = TopKReducer(layer, k=k, channels=channels, reduce=reduce)
    state = run_engine(model, [source[i] for i in candidates], [Remapped(exact, candidates)], what="top-k rescore",
                       batch_size=batch_size, progress=False, workers=workers).results[0]
    again = exact.finish(state, dataclasses.replace(info, interrupted=False))
    return dataclasses.replace(found, k=k, values=again.values, indices=again.indices, positions=again.positions)


def _receptive_field(model: Model, layer: str, input_size: tuple[int, int]) -> ReceptiveField | None:
    return next((r.receptive_field for r in model.layers(input_size) if r.name == layer), None)
