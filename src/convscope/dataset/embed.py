"""Feature embeddings: one pooled feature vector per image, nearest neighbours and 2-D maps of a dataset.

:func:`embed` streams a folder (or a list of images, or tensors) through the model in batches and keeps
one vector per image: the global average (or max) pool of a layer's feature maps, the layer's vector for
a non-spatial layer, or, by default, the model's *penultimate* features (what its classifier sees). The
result, an :class:`Embedding`, answers two questions about what the network "thinks is similar":

- :meth:`Embedding.neighbours`: the images whose features are closest to a query (an image of the set,
  a new image embedded the same way, or a vector), by cosine or euclidean distance (an exact FAISS index);
- :meth:`Embedding.project`: a 2-D map of the whole set by PCA, t-SNE (van der Maaten & Hinton, JMLR 2008,
  "Visualizing Data using t-SNE", FFT-accelerated by openTSNE) or UMAP (McInnes et al. 2018, umap-learn);
  :meth:`Embedding.map_image` draws it with thumbnails.

The neighbour indexes (exact and approximate, :func:`~convscope.dataset.maps.knn` for all rows at once)
and the map methods live in :mod:`.maps` and are re-exported here. Memory: the features are N x C float32
(100,000 images x 1,280 channels = 512 MB), written to disk batch by batch as they are computed
(:class:`EmbeddingReducer`, a ``.npy`` row file) and memory-mapped on the CPU, never gathered in the Python
heap; a run resumes from its state file like every dataset analysis, and shares its forward passes with
top-k and channel statistics when run with them (:func:`convscope.dataset.engine.run`). t-SNE and UMAP are
capped at a million points by default (:func:`~convscope.dataset.maps.check_map_size`, ``max_points``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..errors import LayerKindError
from ..files import check_output_path, write_text
from ..images import load_image
from ..models import as_model, check_input, output_logits
from ..options import Option
from ..probe import Capture, forward_fast, guard, name_of, resolve_layer
from ..render import font, grid
from ..render.picture import Pictured
from .engine import Forward, Reducer, RunInfo
from .engine import run as run_engine
from .folder import BATCH_SIZE, SAVE_EVERY, check_state_path, save_tensors, tensor_picture
from .maps import INDEXES as INDEXES  # re-exported: the projections and neighbour indexes live in .maps
from .maps import ITERATIONS as ITERATIONS
from .maps import MAX_POINTS as MAX_POINTS
from .maps import METHODS as METHODS
from .maps import METRICS as METRICS
from .maps import TSNE_MAX_POINTS as TSNE_MAX_POINTS
from .maps import UMAP_MAX_POINTS as UMAP_MAX_POINTS
from .maps import EmbeddingError as EmbeddingError
from .maps import NeighbourIndex as NeighbourIndex
from .maps import build_index as build_index
from .maps import check_map_size as check_map_size
from .maps import knn as knn
from .maps import pca as pca
from .maps import tsne as tsne
from .maps import umap_projection as umap_projection
from .rowfile import COPY_ROWS, RowFile, Temporary, keep_alive

POOLS = ("avg", "max")
FORMAT = "convscope-embedding/1"
#: Neighbours returned by :meth:`Embedding.neighbours`.
NEIGHBOURS = Option(int, 8, "neighbours to find", minimum=1, maximum=100_000)
#: Side of :meth:`Embedding.map_image`'s square canvas, and of each thumbnail, in pixels.
MAP_SIZE = Option(int, 1200, "map width and height in pixels", minimum=64, maximum=8192)
THUMB = Option(int, 48, "thumbnail size in pixels", minimum=2, maximum=512)

# ============================================================================ result


class Neighbour(NamedTuple):
    """One nearest neighbour: ``rank`` (1 = closest), ``index`` (row of the embedding), ``source`` (its file,
    ``None`` for in-memory inputs) and ``distance`` (cosine: 1 - cos, in [0, 2]; euclidean: feature units)."""

    rank: int
    index: int
    source: str | None
    distance: float


@dataclass(eq=False)
class Embedding(Pictured):
    """One pooled feature vector per image of a dataset.

    ``features`` (N, C) float32 on the CPU, one row per image that could be read (from :func:`embed`: a
    copy-on-write memory map of the features file :attr:`store`, not a copy in memory). ``positions`` (N,): the
    position of each row in the inputs (differs from the row when unreadable files were skipped).
    ``sources``: the file of each row (``None`` for in-memory inputs). ``layer``: the layer whose output
    was pooled, or ``None`` for the penultimate features, which are the input of ``head`` (the last
    ``nn.Linear``). ``pool``: ``"avg"`` or ``"max"`` over the spatial positions (unused for vectors).
    ``predictions`` (N,) / ``probabilities`` (N,): the top class and its softmax probability from the
    same forward pass, ``None`` when the passes stopped at the layer. ``labels``: the model's class names.
    ``total``: inputs in all; ``skipped``: ``(position, reason)`` of unreadable files; ``interrupted``:
    stopped by Ctrl-C (the rows are those done). ``coords``/``method``: the last :meth:`project` result.
    """

    layer: str | None
    head: str | None
    pool: str
    features: torch.Tensor
    positions: torch.Tensor
    sources: list[str | None]
    predictions: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None
    labels: list[str] | None = None
    total: int | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    #: the features file (a ``.npy`` row file, row i = input i) the features map; ``None``: a temporary one or memory
    store: str | None = None
    coords: torch.Tensor | None = None
    method: str | None = None
    model: Any = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dims(self) -> int:
        """C, the length of each feature vector."""
        return int(self.features.shape[1])

    @property
    def where(self) -> str:
        """Which features these are, in words (``"relu2 (avg pool)"``, ``"input of classifier"``)."""
        if self.layer is None:
            return f"input of {self.head}" if self.head else "penultimate features"
        return f"{self.layer} ({self.pool} pool)"

    def label(self, row: int) -> str | None:
        """The predicted class name of row ``row`` (``None`` without predictions)."""
        if self.predictions is None:
            return None
        c = int(self.predictions[row])
        return self.labels[c] if self.labels and 0 <= c < len(self.labels) else f"class {c}"

    # ------------------------------------------------------------------ neighbours
    def vector(self, query: Any) -> torch.Tensor:
        """The feature vector (C,) of ``query``: a row index, a vector, or an image embedded like the set.

        Images (a path, ``sample:NAME``, a PIL image, an array or a preprocessed tensor (3, H, W) /
        (1, 3, H, W)) go through the same model, layer and pooling, so they need :attr:`model`.
        """
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            i = int(query)
            if not -len(self) <= i < len(self):
                raise EmbeddingError(f"index {i} out of range: the embedding has {len(self)} images (0..{len(self) - 1})")
            return self.features[i]
        if isinstance(query, (torch.Tensor, np.ndarray)) and np.ndim(query) == 1:
            v = torch.as_tensor(np.asarray(query) if isinstance(query, np.ndarray) else query).detach().float().cpu()
            if v.shape[0] != self.dims:
                raise EmbeddingError(f"a query vector needs {self.dims} values (the feature size), got {v.shape[0]}")
            return v
        if self.model is None:
            raise EmbeddingError("embedding an image needs the model that made this embedding "
                                 "(embedding.model, or load_embedding(path, model=...))")
        if isinstance(query, torch.Tensor):
            x = check_input(query, device=self.model.device, channels=self.model.channels)
        else:
            x = self.model.preprocess(query)
        with torch.no_grad():
            feats, _ = _run(self.model.module, x, self.layer, self.head, self.pool, predict=False)
        return feats[0]

    def distances(self, query: Any, metric: str = "cosine") -> torch.Tensor:
        """Distance (N,) from ``query`` (see :meth:`vector`) to every row: cosine (1 - cos) or euclidean."""
        return feature_distances(self.features, self.vector(query), metric)

    def neighbours(self, query: Any, k: int = 8, metric: str = "cosine") -> list[Neighbour]:
        """The ``k`` rows closest to ``query``, closest first (ties: lower row first).

        ``query``: a row index (the row itself comes first, at distance 0), an image (embedded with the same
        model, layer and pooling) or a feature vector (C,). ``metric``: ``"cosine"`` (1 - cosine similarity;
        a zero vector is at distance 1 from everything) or ``"euclidean"``.
        """
        NEIGHBOURS.check("k", k)
        if metric not in METRICS:
            raise EmbeddingError(f"unknown metric {metric!r}; choose {' or '.join(METRICS)}")
        v = self.vector(query)
        # an exact FAISS index (flat): the same order as sorting every distance; for all rows at once see knn()
        d, rows = build_index(self.features, metric, "flat").search(v[None], min(k, len(self)))
        return [Neighbour(r, i, self.sources[i], dist) for r, (i, dist) in enumerate(zip(rows[0].tolist(), d[0].tolist()), 1)]

    # ------------------------------------------------------------------ 2-D maps
    def project(self, method: str = "tsne", dims: int = 2, seed: int = 0, perplexity: float = 30.0, *,
                iterations: int = ITERATIONS.default, learning_rate: float | str = "auto", init: str = "pca",
                max_points: int | None = None, index: str = "auto", device: str | torch.device | None = None,
                progress: bool | None = None, **umap_options: Any) -> torch.Tensor:
        """Coordinates (N, dims) of every image on a map where near means similar features.

        ``"pca"``: the first ``dims`` principal components (exact, no randomness; :func:`pca`).
        ``"tsne"``: openTSNE's FFT-accelerated t-SNE (:func:`tsne`: PCA to 50 dimensions, an exact FAISS kNN
        graph up to 200,000 points (``index``), ``perplexity``, ``iterations``, ``learning_rate``, ``init``,
        ``seed``). ``"umap"``: umap-learn (``seed`` -> ``random_state``, extra keywords such as
        ``n_neighbors`` and ``min_dist`` go to ``umap.UMAP``). ``max_points``: the most points the method
        takes (default :data:`~convscope.dataset.maps.MAX_POINTS`: a million for t-SNE and UMAP, checked
        first by :func:`check_map_size`). PCA runs on ``device`` (default: the model's device), t-SNE and
        UMAP on the CPU. The result is also kept in :attr:`coords` (for :meth:`map_image` and :meth:`save`).
        """
        check_map_size(method, len(self), dims, max_points=max_points, features=self.dims)
        if device is None:
            device = self.model.device if self.model is not None else self.features.device
        if method == "pca":
            coords = pca(self.features, dims, device=device)
        elif method == "tsne":
            coords = tsne(self.features, dims, perplexity=perplexity, iterations=iterations, learning_rate=learning_rate,
                          init=init, seed=seed, max_points=max_points, index=index, device=device, progress=progress)
        else:
            coords = umap_projection(self.features, dims, seed=seed, max_points=max_points, **umap_options)
        self.coords, self.method, self._image = coords, method, None
        return coords

    # ------------------------------------------------------------------ pictures
    def picture(self, row: int, images: Sequence[Any] | torch.Tensor | None = None) -> Image.Image:
        """Row ``row``'s image as the network saw it (resized, cropped), read back from its file.

        In-memory inputs are not kept: pass the same ``images`` as to :func:`embed` (indexed by input position).
        """
        pos = int(self.positions[row])
        if images is not None:
            item = images[pos]
            return tensor_picture(self.model, item) if isinstance(item, torch.Tensor) else self._transform(item)
        source = self.sources[row]
        if source is None:
            raise EmbeddingError(f"image {row} was an in-memory input, which is not kept; pass images=<the same inputs>")
        return self._transform(source)

    def _transform(self, item: Any) -> Image.Image:
        if self.model is not None:
            return self.model.transform_image(item)
        return load_image(item)

    def _thumbnails_available(self, images: Any) -> bool:
        return images is not None or all(s is not None for s in self.sources)

    def map_image(self, coords: torch.Tensor | None = None, size: int = 1200, thumb: int = 48, *,
                  images: Sequence[Any] | torch.Tensor | None = None, thumbnails: bool | None = None,
                  title: bool = True) -> Image.Image:
        """The 2-D map as a picture: every image as a ``thumb``-pixel thumbnail at its place, framed in the
        colour of its predicted class, or a coloured dot when thumbnails are unavailable (in-memory inputs
        without ``images=``) or ``thumbnails=False``. ``coords``: (N, 2) (default: the last :meth:`project`,
        else PCA). A legend names the most frequent predicted classes. ``size``: the square canvas in pixels.
        """
        if coords is None:
            coords = self.coords if self.coords is not None and self.coords.shape[1] == 2 else self.project("pca")
        coords = torch.as_tensor(coords).detach().float().cpu()
        if coords.ndim != 2 or coords.shape != (len(self), 2):
            raise EmbeddingError(f"coords must be ({len(self)}, 2), got {tuple(coords.shape)}")
        MAP_SIZE.check("size", size)
        THUMB.check("thumb", thumb)
        if thumbnails is None:
            thumbnails = self._thumbnails_available(images)
        elif thumbnails and not self._thumbnails_available(images):
            raise EmbeddingError("thumbnails of in-memory inputs need images=<the same inputs>")
        colours, legend = self._class_colours()
        band = 26 if title else 0
        legend_h = 16 * min(len(legend), 10) + (8 if legend else 0)
        canvas = Image.new("RGB", (size, size + band + legend_h), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        margin = (thumb if thumbnails else 8) // 2 + 4
        lo, hi = coords.min(0).values, coords.max(0).values
        span = torch.clamp(hi - lo, min=1e-12)
        scale = float((size - 2 * margin) / span.max())
        offset = (size - 2 * margin - span * scale) / 2  # centre the shorter axis, keep the aspect ratio
        xy = ((coords - lo) * scale + margin + offset).round().long()
        xy[:, 1] = size - 1 - xy[:, 1] + band  # y up
        if thumbnails:
            for row in torch.argsort(-coords[:, 1], stable=True).tolist():  # top first, lower ones drawn over
                tile = self.picture(row, images).copy()
                tile.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
                x, y = int(xy[row, 0]) - tile.size[0] // 2, int(xy[row, 1]) - tile.size[1] // 2
                draw.rectangle((x - 2, y - 2, x + tile.size[0] + 1, y + tile.size[1] + 1), fill=colours[row])
                canvas.paste(tile, (x, y))
        else:
            r = max(2, min(6, size // 200))
            for (x, y), c in zip(xy.tolist(), colours):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=c, outline=(40, 40, 40))
        if title:
            what = f"{self.method or 'map'} of {len(self)} images, features: {self.where}"
            draw.text((6, 5), what, fill=(0, 0, 0), font=font(15))
        small = font(12)
        for j, (name, count, c) in enumerate(legend[:10]):
            y = size + band + 4 + 16 * j
            draw.rectangle((8, y + 2, 20, y + 13), fill=c)
            draw.text((26, y), f"{name} ({count})", fill=(0, 0, 0), font=small)
        return canvas

    def _class_colours(self) -> tuple[list[tuple[int, int, int]], list[tuple[str, int, tuple[int, int, int]]]]:
        """A colour per row (by predicted class, the 20 most frequent classes get distinct colours) and the legend."""
        grey = (150, 150, 150)
        if self.predictions is None:
            return [grey] * len(self), []
        from matplotlib import colormaps  # heavy: imported when a map is drawn

        cmap = colormaps["tab20"]
        classes, counts = torch.unique(self.predictions, return_counts=True)
        order = torch.argsort(-counts, stable=True)
        palette: dict[int, tuple[int, int, int]] = {}
        legend = []
        for j, i in enumerate(order.tolist()):
            c = int(classes[i])
            rgb = tuple(int(v * 255) for v in cmap(j % 20)[:3]) if j < 20 else grey
            palette[c] = rgb  # type: ignore[assignment]
            name = self.labels[c] if self.labels and 0 <= c < len(self.labels) else f"class {c}"
            legend.append((name, int(counts[i]), rgb))
        return [palette[int(p)] for p in self.predictions.tolist()], legend  # type: ignore[return-value]

    def neighbours_image(self, query: Any, k: int = 8, metric: str = "cosine", *,
                         images: Sequence[Any] | torch.Tensor | None = None, cell: int = 128) -> Image.Image:
        """The query and its ``k`` nearest neighbours in a row, each labelled with its rank and distance."""
        found = self.neighbours(query, k, metric)
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            first = self.picture(int(query), images)
        elif isinstance(query, torch.Tensor) and query.ndim == 1 or isinstance(query, np.ndarray) and query.ndim == 1:
            first = Image.new("RGB", (cell, cell), (235, 235, 235))  # a vector has no picture
        elif isinstance(query, torch.Tensor):
            first = tensor_picture(self.model, query)
        else:
            first = self._transform(query)
        tiles = [first] + [self.picture(n.index, images) for n in found]
        names = ["query"] + [f"d={n.distance:.3f} {_short(n.source, n.index)}" for n in found]
        return grid(tiles, labels=names, columns=len(tiles), cell=cell,
                    title=f"{k} nearest by {metric} distance, features: {self.where}")

    def to_image(self) -> Image.Image:
        """:meth:`map_image` of the last projection (PCA when none was made)."""
        return self.map_image()

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict[str, Any]:
        """Everything but the features as plain JSON-ready data (one entry per image, with its map place)."""
        points = []
        for i in range(len(self)):
            p: dict[str, Any] = {"index": i, "position": int(self.positions[i]), "source": self.sources[i]}
            if self.predictions is not None:
                p.update(prediction=int(self.predictions[i]), label=self.label(i), probability=float(self.probabilities[i]))
            if self.coords is not None:
                p["coords"] = [float(v) for v in self.coords[i]]
            points.append(p)
        return {"layer": self.layer, "head": self.head, "pool": self.pool, "features": self.where, "count": len(self),
                "dims": self.dims, "total": self.total, "interrupted": self.interrupted, "seconds": round(self.seconds, 3),
                "method": self.method, "skipped": [{"position": i, "reason": r} for i, r in self.skipped], "points": points}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tensors with ``torch.save`` (plain tensors only) and a JSON sidecar ``PATH.json`` with the
        sources and settings; both atomically. Read back with :func:`load_embedding` (memory-mapped). Features
        that map a row file (:attr:`store`) are streamed from it into the file, not copied into memory first."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {"features": self.features.cpu(), "positions": self.positions.cpu()}
        if self.predictions is not None:
            tensors.update(predictions=self.predictions.cpu(), probabilities=self.probabilities.cpu())
        if self.coords is not None:
            tensors["coords"] = self.coords.cpu()
        save_tensors(tensors, path)
        used = sorted({int(c) for c in self.predictions.tolist()}) if self.predictions is not None else []
        meta = {"format": FORMAT, "tensors": path.name, "layer": self.layer, "head": self.head, "pool": self.pool,
                "count": len(self), "dims": self.dims, "total": self.total, "interrupted": self.interrupted,
                "seconds": self.seconds, "method": self.method, "skipped": [list(s) for s in self.skipped],
                "model": getattr(self.model, "name", None),
                "class_names": {str(c): (self.labels[c] if self.labels and c < len(self.labels) else f"class {c}") for c in used},
                "sources": self.sources}
        write_text(json.dumps(meta, indent=1), sidecar_path(path))
        return path

    def __str__(self) -> str:
        state = "" if not self.interrupted else f", interrupted at {len(self)}/{self.total}"
        return f"embedding of {len(self)} images x {self.dims} features ({self.where}{state}, {len(self.skipped)} skipped)"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file written next to a saved embedding (``PATH.json``)."""
    return Path(str(path) + ".json")


def load_embedding(path: str | os.PathLike, model: Any = None) -> Embedding:
    """Read an :meth:`Embedding.save` file (``torch.load(weights_only=True, mmap=True)``: the features are a
    memory map of the file, not a copy in memory) and its JSON sidecar.

    ``model``: the model that made it, needed only to embed new query images and to draw thumbnails
    exactly as the network saw them (a plain module is wrapped by :func:`convscope.as_model`).
    """
    model = as_model(model) if model is not None else None
    path = Path(path)
    try:
        # memory-mapped: the features of a large embedding are read from the file as they are used
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EmbeddingError(f"{exc.filename}: no such file (an embedding is PATH plus PATH.json)") from None
    except Exception as exc:
        raise EmbeddingError(f"{path}: not a readable embedding ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(tensors, dict) or "features" not in tensors:
        raise EmbeddingError(f"{path}: not a convscope embedding (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    names = meta.get("class_names") or {}
    labels = list(model.labels) if model is not None else []
    if not labels and names:
        top = max(int(c) for c in names) + 1
        labels = [names.get(str(c), f"class {c}") for c in range(top)]
    return Embedding(layer=meta["layer"], head=meta["head"], pool=meta["pool"], features=tensors["features"],
                     positions=tensors["positions"], sources=list(meta["sources"]), predictions=tensors.get("predictions"),
                     probabilities=tensors.get("probabilities"), labels=labels or None, total=meta.get("total"),
                     skipped=[(int(i), str(r)) for i, r in meta.get("skipped", [])], interrupted=bool(meta.get("interrupted")),
                     seconds=float(meta.get("seconds", 0.0)), coords=tensors.get("coords"), method=meta.get("method"), model=model)


def _short(source: str | None, index: int) -> str:
    if not source:
        return f"#{index}"
    return source.split(":", 1)[1] if source.startswith("sample:") else os.path.basename(source)


# ============================================================================ distances


def feature_distances(features: torch.Tensor, query: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Distances (N,) from ``query`` (C,) to every row of ``features`` (N, C), one batched matrix product.

    ``"cosine"``: 1 - cos(angle), in [0, 2], zero vectors count as orthogonal (distance 1);
    ``"euclidean"``: the L2 norm of the difference.
    """
    if metric not in METRICS:
        raise EmbeddingError(f"unknown metric {metric!r}; choose {' or '.join(METRICS)}")
    f = features.float()
    q = query.to(f.device, torch.float32)
    if metric == "euclidean":
        return (f - q).norm(dim=1)
    sims = (f @ q) / (f.norm(dim=1) * q.norm()).clamp_min(1e-12)
    return (1 - sims).clamp(0, 2)


# ============================================================================ streaming


def _head(module: nn.Module) -> str:
    """The name of the last ``nn.Linear`` (in ``named_modules`` order): the classifier whose input is the
    penultimate feature vector."""
    linears = [name for name, m in module.named_modules() if name and isinstance(m, nn.Linear)]
    if not linears:
        raise LayerKindError("the model has no nn.Linear classifier, so there are no penultimate features; "
                             "name a layer (see `convscope summary`)")
    return linears[-1]


def _pooled(act: torch.Tensor, pool: str, where: str) -> torch.Tensor:
    if act.ndim == 4:
        flat = act.flatten(2).float()
        return flat.mean(2) if pool == "avg" else flat.amax(2)
    if act.ndim == 2:
        return act.float()
    raise LayerKindError(f"{where} outputs shape {tuple(act.shape)}; embeddings need feature maps (N, C, H, W) "
                         "or vectors (N, C)")


def _vectors(v: torch.Tensor) -> torch.Tensor:
    """A classifier's input as one vector per image: a Linear over tokens or positions (it acts on the last
    axis) gets their average."""
    if v.ndim > 2:
        v = v.flatten(1, -2).mean(1)
    return v.float()


def _run(module: nn.Module, x: torch.Tensor, layer: str | None, head: str | None, pool: str, *,
         predict: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled features (B, C) and the logits (``None`` when the pass stopped at the layer) for one batch
    (an image embedded like the set: :meth:`Embedding.vector`).

    ``layer=None``: a forward pre-hook on ``head`` reads its input, inside :class:`~convscope.probe.guard`
    (eval mode, no in-place activations, hook removed in ``finally``); the full pass gives the logits too.
    Otherwise :class:`~convscope.probe.Capture` records the layer, stopping there unless ``predict``.
    The same values as :class:`EmbeddingReducer`'s rows (the same pooling, :func:`_pooled` / :func:`_vectors`).
    """
    if layer is None:
        assert head is not None
        seen: dict[str, torch.Tensor] = {}

        def pre_hook(_m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen["x"] = args[0].detach()

        target = resolve_layer(module, head)
        with guard(module, eval=True, freeze=True, no_inplace=True):
            handle = target.register_forward_pre_hook(pre_hook)
            try:
                out = forward_fast(module, x)
            finally:
                handle.remove()
        if "x" not in seen:
            raise LayerKindError(f"the classifier {head!r} is never called in the model's forward pass; name a layer")
        return _vectors(seen["x"]), output_logits(out)
    with Capture(module, [layer], stop=not predict) as cap:
        out = forward_fast(module, x, cap.forward)
        act = cap.activations.get(layer)
    if act is None:
        raise LayerKindError(f"layer {layer!r} is never called in the model's forward pass")
    return _pooled(act, pool, f"layer {layer!r}"), (output_logits(out) if predict else None)


def features_path(state: str | os.PathLike) -> Path:
    """Where :func:`embed` writes the features of a resumable run by default: ``STATE.features.npy``."""
    return Path(str(state) + ".features.npy")


def predictions_path(store: str | os.PathLike) -> Path:
    """The row file beside a features file ``X.npy`` holding each input's top class and its probability
    (two float32 columns; classes are exact below 2**24): ``X.predictions.npy``."""
    store = Path(store)
    return store.with_suffix(".predictions.npy") if store.suffix == ".npy" else Path(str(store) + ".predictions.npy")


def _runs(positions: np.ndarray) -> list[list[int]]:
    """Increasing positions as runs ``[[lo, hi], ...]`` of consecutive ones (one run when nothing was skipped)."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return [[int(positions[lo]), int(positions[hi - 1]) + 1] for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(positions)])]


def _join_runs(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """``a``'s runs then ``b``'s (every position of ``a`` precedes ``b``'s), adjacent runs joined; new lists."""
    if a and b and a[-1][1] == b[0][0]:
        return [list(r) for r in a[:-1]] + [[a[-1][0], b[0][1]]] + [list(r) for r in b[1:]]
    return [list(r) for r in a] + [list(r) for r in b]


def _positions(runs: list[list[int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in runs])


class EmbeddingReducer(Reducer):
    """Embeddings as a reducer of the dataset engine (:func:`convscope.dataset.engine.run`): one feature vector
    per image, written to disk as the batches go, so the pass can be shared with top-k, channel statistics...

    ``layer=None``: the penultimate features, the input of the model's last ``nn.Linear`` (``head``; found from
    ``model=`` when not named), recorded with the engine's forward pre-hook (:attr:`inputs`); tokens or positions
    are averaged. A named ``layer``: its output pooled over the positions (``pool="avg"`` or ``"max"``), a vector
    output as it is. ``predict``: also keep each image's top class and its softmax probability (the logits of
    the same pass); default: yes for the penultimate features, no for a named layer (the passes then stop there).

    **On disk, never all in memory.** Rows go into ``store``, a float32 ``.npy`` row file
    (:class:`~convscope.dataset.rowfile.RowFile`; ``numpy.load(store, mmap_mode="r")`` reads it) at their input
    positions (row i = input i; rows of unreadable images are zeros), and the predictions into
    :func:`predictions_path` beside it. ``store=None``: a temporary file (in ``TMPDIR``: give ``store=`` where
    ``/tmp`` is held in memory), deleted when the features of the result are no longer used; a resumable run
    needs a real path (:func:`embed` puts it beside its state file,
    :func:`features_path`). The result's :attr:`Embedding.features` are a copy-on-write memory map of the file (a
    compact temporary copy when images were skipped), so even the result is not held in the Python heap; a later
    run writing the same ``store`` changes what earlier results read (``.clone()`` to keep them).

    **State.** Plain data only: the file, the feature size and the positions done as runs ``[[lo, hi], ...]`` (one
    run unless images were skipped); it does not grow with the dataset. :meth:`step` writes the batch's rows, then
    returns a new state naming them: writing a row is idempotent (the same values at the same place), so a batch
    written but never committed (an interruption between the two) is written again on resume and the engine's
    one-assignment commit stays atomic. A resumed state whose file is missing or shorter than the rows it names
    raises :class:`~convscope.dataset.folder.StateFileError`.

    **Partial states (the Ray engine).** A pickled copy of the reducer (what Ray actors receive) never writes: it
    has no access to the driver's file, so its states keep their rows in memory (``features`` (m, C),
    ``predictions``, ``probabilities`` tensors beside ``runs``). :meth:`merge_states` in the driver writes such rows
    into the file of ``a`` (or into ``store`` when ``a`` is ``None``) and returns a state without them; merging two
    states written to different files copies ``b``'s rows, a bounded block at a time. Results equal the local run.
    """

    def __init__(self, layer: str | None = None, *, pool: str = "avg", predict: bool | None = None,
                 store: str | os.PathLike | None = None, head: str | None = None, model: Any = None,
                 name: str | None = None):
        super().__init__()
        if pool not in POOLS:
            raise EmbeddingError(f"unknown pool {pool!r}; choose {' or '.join(POOLS)}")
        if isinstance(layer, nn.Module):
            if model is None:
                raise EmbeddingError("a layer given as a module needs model=... to find its name; or give its name")
            layer = name_of(as_model(model).module, layer)
        if layer is None and head is None:
            if model is None:
                raise EmbeddingError("the penultimate features (layer=None) are the input of the model's classifier: "
                                     "give model=... (its last nn.Linear is used) or head=NAME")
            head = _head(as_model(model).module)
        self.layer, self.pool = layer, pool
        self.head = head if layer is None else None
        self.predict = (layer is None) if predict is None else bool(predict)
        self.store = None if store is None else os.path.abspath(check_output_path(store, what="features file"))
        self.layers = (layer,) if layer is not None else ()
        self.inputs = (self.head,) if layer is None else ()
        self.needs_output = self.predict
        self.name = name or f"embed:{layer or 'penultimate'}"
        self._detached = False  # True in a pickled copy (a Ray actor): rows stay in memory
        self._temp: Temporary | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(_detached=True, _temp=None)
        return d

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "pool": self.pool, "predict": self.predict, "store": self.store}

    # ---- files
    def _path(self) -> str:
        """The file a new run writes to: ``store``, or this reducer's temporary file (made once)."""
        if self.store is not None:
            return self.store
        if self._temp is None:
            self._temp = Temporary(prefix="convscope-embedding-")
            self._temp.also(str(predictions_path(self._temp.path)))
        return self._temp.path

    def _files(self, path: str) -> tuple[RowFile, RowFile | None]:
        return RowFile(path), (RowFile(predictions_path(path)) if self.predict else None)

    # ---- the reducer
    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        if self.layer is None:
            f = _vectors(batch.inputs[self.head])
        else:
            f = _pooled(batch.activations[self.layer], self.pool, f"layer {self.layer!r}")
        index = batch.index.detach().cpu().numpy().astype(np.int64)
        part: dict[str, Any] = {"store": None, "dims": int(f.shape[1]), "runs": _runs(index),
                                "features": f.detach().float().cpu()}
        if self.predict:
            if batch.output is None:
                raise EmbeddingError("internal: predictions need the model's output")
            probability, top = batch.output.float().softmax(1).max(1)
            part.update(predictions=top.detach().cpu(), probabilities=probability.detach().cpu())
        return self.merge_states(state, part)

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        parts = [s for s in (a, b) if s is not None]
        if not parts:
            return None
        dims = parts[0]["dims"]
        if len(parts) == 2 and b["dims"] != dims:
            raise EmbeddingError(f"input {b['runs'][0][0] if b['runs'] else '?'} gives {b['dims']} features, earlier "
                                 f"inputs gave {dims}; every input must have the same size")
        runs = _join_runs(a["runs"], b["runs"]) if len(parts) == 2 else parts[0]["runs"]
        if self._detached:  # a copy in a Ray actor: the rows travel to the driver in the state
            if len(parts) == 1:
                return parts[0]
            out = {"store": None, "dims": dims, "runs": runs, "features": torch.cat([_held(a, "features"), _held(b, "features")])}
            if self.predict:
                out.update(predictions=torch.cat([_held(a, "predictions"), _held(b, "predictions")]),
                           probabilities=torch.cat([_held(a, "probabilities"), _held(b, "probabilities")]))
            return out
        if a is not None and a.get("store"):  # a committed state (maybe resumed from a file): its rows are in a["store"]
            features, preds = self._files(a["store"])
            done = a["runs"][-1][1] if a["runs"] else 0
            features.check(dims, done)
            if preds is not None:
                preds.check(2, done, "predictions")
        else:
            features, preds = self._files(self._path())
            features.ensure(dims)
            if preds is not None:
                preds.ensure(2)
        for s in parts:
            self._put(s, features, preds)
        return {"store": str(features.path), "dims": dims, "runs": runs}

    def _put(self, s: dict[str, Any], features: RowFile, preds: RowFile | None) -> None:
        """Write the rows of state ``s`` into ``features`` (and ``preds``) unless they are already there."""
        positions = _positions(s["runs"])
        if s.get("features") is not None:
            features.write(positions, s["features"].detach().cpu().float().numpy())
            if preds is not None:
                preds.write(positions, np.stack([s["predictions"].detach().cpu().numpy().astype(np.float32),
                                                 s["probabilities"].detach().cpu().float().numpy()], axis=1))
            return
        if s.get("store") and os.path.abspath(s["store"]) != os.path.abspath(features.path):
            pairs = [(RowFile(s["store"]), features)]
            if preds is not None:
                pairs.append((RowFile(predictions_path(s["store"])), preds))
            for src, dst in pairs:
                got = src.shape()
                rows = src.map(got[0] if got is not None else 0)
                for lo in range(0, len(positions), COPY_ROWS):
                    block = positions[lo:lo + COPY_ROWS]
                    dst.write(block, np.asarray(rows[block]))

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> Embedding:
        model = run.model
        labels = list(model.labels) if self.predict and model is not None else None
        common = {"layer": self.layer, "head": self.head, "pool": self.pool, "labels": labels, "total": run.total,
                  "skipped": list(run.skipped), "interrupted": run.interrupted, "seconds": run.seconds, "model": model}
        if state is None:  # nothing scored
            empty = torch.zeros(0, dtype=torch.long)
            return Embedding(features=torch.zeros((0, 0)), positions=empty, sources=[],
                             predictions=empty if self.predict else None,
                             probabilities=torch.zeros(0) if self.predict else None, **common)
        positions = _positions(state["runs"])
        paths = run.paths
        sources = [paths[i] for i in positions.tolist()] if paths is not None else [None] * len(positions)
        predictions = probabilities = None
        if state.get("features") is not None:  # a partial state (rows in memory): nothing was written
            features = state["features"].detach().cpu().float()
            if self.predict:
                predictions, probabilities = state["predictions"].cpu(), state["probabilities"].cpu().float()
            return Embedding(features=features, positions=torch.from_numpy(positions), sources=sources,
                             predictions=predictions, probabilities=probabilities, **common)
        files, preds = self._files(state["store"])
        rows = int(positions[-1]) + 1 if len(positions) else 0
        files.check(state["dims"], rows)
        if preds is not None:
            preds.check(2, rows, "predictions")
        if run.complete and run.total is not None:  # row i = input i for every input; skipped ones are zeros
            for f in (files, preds):
                if f is not None:
                    f.resize(run.total)
                    f.zero(np.array([i for i, _ in run.skipped], dtype=np.int64))
            rows = run.total
        temp = self._temp if self._temp is not None and state["store"] == self._temp.path else None
        if temp is not None:
            self._temp = None  # the result owns it now; a new run of this reducer writes a new file
        if len(positions) == rows:  # positions 0..rows-1: the file itself, mapped
            features = keep_alive(files.map(rows), temp)
        else:
            features = files.gather(positions)
        if preds is not None:
            both = np.asarray(preds.map(rows)[positions])
            predictions = torch.from_numpy(both[:, 0].astype(np.int64))
            probabilities = torch.from_numpy(both[:, 1].copy())
        return Embedding(features=torch.from_numpy(features), positions=torch.from_numpy(positions), sources=sources,
                         predictions=predictions, probabilities=probabilities, store=None if temp else state["store"],
                         **common)


def _held(state: dict[str, Any], key: str) -> torch.Tensor:
    """The in-memory rows ``key`` of a partial state (a detached reducer's states never name a file)."""
    if state.get(key) is None:
        raise EmbeddingError("internal: a copied (Ray actor) embedding reducer can only merge states it made itself")
    return state[key].detach().cpu()


def embed(model: Any, images: Any, layer: str | None = None, *, pool: str = "avg", batch_size: int = 32,
          predict: bool | None = None, progress: bool | None | Callable[[int, int | None], None] = None,
          state: str | os.PathLike | None = None, store: str | os.PathLike | None = None, save_every: int = 20,
          workers: int | None = None, amp: str | None = None, engine: str = "local", address: str | None = None,
          num_gpus: float | None = None) -> Embedding:
    """One feature vector per image of ``images``: the dataset's embedding at ``layer``.

    ``images``: a folder (listed recursively, sorted by relative path), a list of paths / ``sample:NAME`` /
    PIL images, a tensor (N, 3, H, W), an iterable of preprocessed tensors or a torch Dataset. ``layer``: a
    layer name; its feature maps are pooled over all positions (``pool="avg"``: global average, ``"max"``:
    global maximum), a vector output is taken as it is. ``layer=None`` (default): the penultimate features,
    i.e. the input of the model's last ``nn.Linear`` (the classifier), read with a forward pre-hook: that
    tensor is often made by functional code (``torch.flatten``, a functional dropout) and is then no module's
    output, which is all :class:`~convscope.probe.Capture` records.

    ``predict``: also keep the top class of every image from the same forward pass. Default: yes for the
    penultimate features (only the classifier is left to run), no for a named layer, whose passes then
    stop right after it. ``batch_size``: images per pass. Unreadable files are skipped, counted and listed
    (:attr:`Embedding.skipped`); a run whose every file is unreadable raises
    :class:`~convscope.dataset.folder.UnreadableImagesError`.

    Memory: the rows are written to disk as the batches go (:class:`EmbeddingReducer`): ``store`` (a ``.npy``
    file, row i = input i) or, by default, :func:`features_path` beside ``state``, else a temporary file
    deleted with the result. :attr:`Embedding.features` is a memory map of it, so only a batch of images and
    its rows are ever in the Python heap. ``state``: a file to save progress to (see
    :class:`convscope.dataset.engine.StateStore`), every ``save_every`` batches, at the end, on Ctrl-C and on
    errors; the same call again resumes it (the rows already written are not recomputed); a state saved for
    another model, inputs, layer, pool, prediction or features file raises
    :class:`~convscope.dataset.folder.StateMismatchError`. ``workers``, ``amp``, ``engine``, ``address``,
    ``num_gpus``: see :func:`convscope.dataset.engine.run` (decode threads, autocast, Ray). To compute top-k
    or channel statistics in the same pass, give :func:`~convscope.dataset.engine.run` several reducers.

    ``progress``: a tqdm bar (``None``: only on a terminal) or a callable ``(done, total)``. Ctrl-C stops and
    returns the rows done (``interrupted``). ``model``: a :class:`~convscope.Model` or a plain module
    (:func:`convscope.as_model`).
    """
    model = as_model(model)
    if pool not in POOLS:
        raise EmbeddingError(f"unknown pool {pool!r}; choose {' or '.join(POOLS)}")
    BATCH_SIZE.check("batch_size", batch_size)
    SAVE_EVERY.check("save_every", save_every)
    if isinstance(layer, nn.Module):
        layer = name_of(model.module, layer)
    if layer is not None:
        resolve_layer(model.module, layer)
    if state is not None:
        check_state_path(state)
        if store is None:
            store = features_path(state)
    reducer = EmbeddingReducer(layer, pool=pool, predict=predict, store=store, model=model)
    done = run_engine(model, images, [reducer], what="embedding", batch_size=batch_size, state=state, save_every=save_every,
                      progress=progress, desc=f"embed {layer or 'penultimate'}", workers=workers, amp=amp, engine=engine,
                      address=address, num_gpus=num_gpus)
    e = done.results[0]
    if len(e) == 0:
        if done.info.interrupted:
            raise KeyboardInterrupt
        raise EmbeddingError("no image to embed")
    return e
