"""Building an atlas: every unit of the chosen layers, their dataset examples, and each layer's activation atlas.

:func:`build_atlas` fills an atlas folder (:class:`~convscope.atlas.store.AtlasStore`) in stages, each skipped when
the folder already holds it for the same model and options, so a build is resumable and incremental:

1. **data** (one streaming pass of the dataset engine for all layers): per layer the running top-``k`` images
   (:class:`~convscope.dataset.topk.TopKReducer`), channel statistics (:class:`~convscope.dataset.engine.ChannelStats`)
   and a sample of spatial activation vectors for the activation atlas (:class:`ActivationSample`: ``samples``
   random positions per image, away from the border, as Carter et al. do, with each image's predicted class).
   The reducers' states are kept in ``ATLAS/state``; images added later (a folder that grew) are streamed alone
   and merged into those states (:meth:`~convscope.dataset.engine.Reducer.merge_states`; the atlas numbers images
   in the order it first saw them, so earlier images keep their numbers and ties keep their order), and a layer
   added later gets a pass over every image for that layer only;
2. **units**: statistics, never-firing flags, the most frequent predicted class among each unit's top images,
   neighbouring units (the most correlated channels over the activation sample), the top-``k`` patches cut to
   the unit's receptive field and their guided-backpropagation projections (computed by an explicit call,
   batched), filter weights and health for convolution layers;
3. **visualisations** (data-independent: reused when images are added): per unit the channel objective, its
   negative, and ``diversity`` samples pushed apart by a Gram-matrix diversity term, rendered in batches through
   the decorrelated Fourier parameterisation (Olah et al. 2017; Microscope's unit page);
4. **activation atlas** (Carter et al. 2019): the sampled vectors laid out in 2-D by UMAP (cosine, n_neighbors
   20, min_dist 0.01 as the article), each axis clipped to its 1st-99th percentile with a 10% margin, binned into a
   ``grid`` x ``grid`` grid (each edge in one cell only); cells with at least ``min_count`` samples get their mean
   activation vector's icon (objective dot(h, v) * max(cos(h, v), 0.1)^2 at the centre position, rendered in one
   batch), their count, top predicted classes and the units most present in the mean vector;
5. **concepts** (with ``concepts=BRODEN_DIR``): Network Dissection of each layer, each unit's best concept and IoU;
6. **flows**: for the first ``flows`` images, every layer's feature maps as one sprite (the TensorSpace-like view).

Pages read the store only; nothing on a page recomputes what the store holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import __version__ as VERSION
from ..dataset.engine import ChannelStats, Forward, Reducer, Remapped, RunInfo, feature_maps, pack, unpack
from ..dataset.engine import run as run_engine
from ..dataset.folder import save_tensors
from ..dataset.maps import umap_projection
from ..dataset.topk import TopKReducer
from ..images import list_images
from ..models import Model, as_model, model_fingerprint
from ..options import Option
from ..probe import Capture, forward_fast, resolve_layer
from ..progress import tqdm
from ..render import colorize
from ..synthesis.objectives import Objective, channel
from ..synthesis.render import render
from .store import AtlasError, AtlasStore, slug

K = Option(int, 9, "dataset examples kept per unit", minimum=1, maximum=100)
VIS_SIZE = Option(int, 96, "feature visualisation size in pixels", minimum=16, maximum=512)
VIS_STEPS = Option(int, 128, "optimisation steps per feature visualisation", minimum=1, maximum=4096)
DIVERSITY = Option(int, 4, "diverse samples per unit (0: none)", minimum=0, maximum=16)
SAMPLES = Option(int, 4, "activation vectors sampled per image for the layer atlas", minimum=1, maximum=64)
GRID = Option(int, None, "layer atlas grid side (default: from the sample count, at most 20)", minimum=2, maximum=160)
MIN_COUNT = Option(int, None, "samples a grid cell needs to get an icon (default: from the sample count)", minimum=1)
ICON_SIZE = Option(int, 64, "layer atlas icon size in pixels", minimum=16, maximum=512)
FLOWS = Option(int, 3, "dataset images shown flowing through the layers", minimum=0, maximum=64)
#: Images rendered together in one optimisation (memory grows with it).
RENDER_BATCH = 32
#: Diversity term weight, relative to the layer's typical channel activation (its 99th percentile of channel maxima).
DIVERSITY_WEIGHT = 1.0
#: Side of each feature-map tile in the layer view (pixels), and the largest sprite width (tiles per row).
FLOW_TILE, FLOW_COLUMNS = 24, 32
THUMB = 160
PATCH = 96


class BuildError(AtlasError):
    """An atlas build that cannot run: no layers, a layer without feature maps, an unreadable image set."""


# ============================================================================ the activation sample


class ActivationSample(Reducer):
    """``samples`` spatial activation vectors per image of ``layer`` (away from the border where the map allows),
    with the image number and the model's predicted class. Positions depend only on (``seed``, image number), so a
    run resumed, merged from shards or extended with new images samples the same vectors."""

    needs_output = True

    def __init__(self, layer: str, samples: int = 4, seed: int = 0):
        super().__init__()
        self.layer, self.samples, self.seed = layer, int(samples), int(seed)
        self.layers = (layer,)
        self.name = f"sample:{layer}"

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "samples": self.samples, "seed": self.seed}

    def positions(self, image: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(image)])
        y0, y1 = (1, h - 1) if h > 2 else (0, h)
        x0, x1 = (1, w - 1) if w > 2 else (0, w)
        return rng.integers(y0, y1, self.samples), rng.integers(x0, x1, self.samples)

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        act = feature_maps(batch.activations[self.layer], self.layer).float()
        n, c, h, w = act.shape
        ys, xs, owners = [], [], []
        for i, image in enumerate(batch.index.tolist()):
            y, x = self.positions(image, h, w)
            ys.append(y)
            xs.append(x)
            owners += [i] * self.samples
        yy = torch.as_tensor(np.concatenate(ys), device=act.device)
        xx = torch.as_tensor(np.concatenate(xs), device=act.device)
        own = torch.as_tensor(owners, device=act.device)
        vectors = act[own, :, yy, xx].cpu()
        preds = torch.full((n,), -1, dtype=torch.long)
        if batch.output is not None and batch.output.ndim == 2 and batch.output.shape[1] > 1:
            preds = batch.output.argmax(1).cpu()
        part = {"vectors": vectors, "images": batch.index.cpu()[own.cpu()], "classes": preds[own.cpu()]}
        return self.merge_states(state, part)

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or b is None:
            return b if a is None else a
        return {k: torch.cat([a[k], b[k]]) for k in ("vectors", "images", "classes")}


# ============================================================================ objectives for the atlas


def grouped_diversity(layer: str, group: int) -> Objective:
    """Per image, minus the mean cosine similarity of its Gram matrix to the other images of its group of ``group``
    consecutive images (Olah et al. 2017's diversity term, applied within each unit's samples)."""

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = acts[layer]
        n = a.shape[0]
        f = a.flatten(2)
        g = torch.bmm(f, f.transpose(1, 2)).flatten(1)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = g.view(n // group, group, -1)
        sim = torch.bmm(g, g.transpose(1, 2))
        off = sim.sum(2) - sim.diagonal(dim1=1, dim2=2)
        return (-off / max(group - 1, 1)).flatten()

    return Objective(fn, [layer], name=f"diversity({layer}, groups of {group})")


def icon_objective(layer: str, vectors: torch.Tensor, power: float = 2.0, floor: float = 0.1) -> Objective:
    """Image i: dot(h, v_i) * max(cos(h, v_i), ``floor``)^``power`` at the centre position of ``layer``
    (Activation Atlas's icon objective; ``vectors`` (N, C))."""
    v = vectors.float()

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = acts[layer]
        h = a[:, :, a.shape[2] // 2, a.shape[3] // 2]
        vv = v.to(h.device, h.dtype)
        dot = (h * vv).sum(1)
        cos = dot / (h.norm(dim=1) * vv.norm(dim=1)).clamp_min(1e-8)
        return dot * cos.clamp_min(floor) ** power

    return Objective(fn, [layer], name=f"icon({layer})")


# ============================================================================ the build


def build_atlas(
    model: Any,
    images: Any,
    layers: Sequence[str] | str,
    out: str | os.PathLike,
    *,
    concepts: str | os.PathLike | None = None,
    k: int = 9,
    vis_size: int = 96,
    vis_steps: int = 128,
    diversity: int = 4,
    negative: bool = True,
    samples: int = 4,
    grid: int | None = None,
    min_count: int | None = None,
    icon_size: int = 64,
    icon_steps: int | None = None,
    flows: int = 3,
    batch_size: int = 32,
    workers: int | None = None,
    amp: str | None = None,
    engine: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> AtlasStore:
    """Build (or extend) the atlas at ``out`` for ``layers`` of ``model`` over ``images`` (see the module docstring).

    ``images``: a folder (recursively, sorted) or a list of image files. ``layers``: names (or ``"L1,L2"``) of layers
    with feature maps. ``concepts``: a Broden-format folder for Network Dissection. ``k``: dataset examples per unit.
    ``vis_size``/``vis_steps``: feature visualisations; ``diversity``: samples per unit (0: none); ``negative``: the
    negative visualisation too. ``samples``: activation vectors per image for the layer atlas; ``grid``/``min_count``:
    its grid side and the samples a cell needs (defaults from the sample count); ``icon_size``/``icon_steps``.
    ``flows``: dataset images shown flowing through the layers. ``batch_size``, ``workers``, ``amp``, ``engine``,
    ``address``, ``num_gpus``: the dataset engine's (:func:`convscope.dataset.engine.run`). Returns the store.
    """
    model = as_model(model)
    names = [s.strip() for s in (layers.split(",") if isinstance(layers, str) else layers) if s and s.strip()]
    if not names:
        raise BuildError("no layers given; name one or more layers with feature maps (see `convscope summary`)")
    names = list(dict.fromkeys(names))
    for name in names:
        resolve_layer(model.module, name)
    for opt, name, value in ((K, "k", k), (VIS_SIZE, "vis_size", vis_size), (VIS_STEPS, "vis_steps", vis_steps),
                             (DIVERSITY, "diversity", diversity), (SAMPLES, "samples", samples), (GRID, "grid", grid),
                             (MIN_COUNT, "min_count", min_count), (ICON_SIZE, "icon_size", icon_size), (FLOWS, "flows", flows)):
        opt.check(name, value)
    files = _image_files(images)
    table = {r.name: r for r in model.layers()}
    for name in names:  # checked before anything is written
        shape = table[name].output_shape if name in table else None
        if shape is None or len(shape) != 4:
            raise BuildError(f"layer {name!r} outputs {shape}; an atlas needs layers with feature maps (N, C, H, W)")
    fp = model_fingerprint(model.module)
    model_key = _digest(fp)
    if (Path(out) / "atlas.sqlite").is_file():
        old_model = AtlasStore(out).meta("model_key")
        if old_model is not None and old_model != model_key:
            raise BuildError(f"{out}: an atlas of another model ({AtlasStore(out).meta('model', {}).get('name')}); "
                             "build into a new folder")
    store = AtlasStore(out, create=True)
    report = progress
    bar = tqdm(total=6, desc="atlas", unit="stage", leave=False, disable=None if report is None else not report)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    last = [start]

    def tick(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - last[0], 2)
        last[0] = now
        bar.update(1)

    store.set_meta(model={"name": model.name, "source": model.source, "input_size": list(model.input_size),
                          "fingerprint": fp}, model_key=model_key, labels_count=len(model.labels),
                   labels=list(model.labels))
    _register_images(store, files)
    all_files = [s["source"] for s in store.images()]
    for position, name in enumerate(_ordered(model, names)):
        row = table.get(name)
        _put_layer(store, name, row, list(table).index(name) if name in table else position)
    bar.set_postfix_str("dataset pass")
    states = _data_pass(store, model, names, all_files, k=k, samples=samples, seed=seed, batch_size=batch_size,
                        workers=workers, amp=amp, engine=engine, address=address, num_gpus=num_gpus, progress=report)
    tick("data")
    info = RunInfo(names=all_files, paths=all_files, processed=len(all_files), total=len(all_files), model=model,
                   scored=len(all_files), input_size=tuple(model.input_size))
    labels = list(model.labels)
    for name in names:
        topk_state, stats_state, sample_state = states[name]
        topk = TopKReducer(name, k=k).finish(topk_state, info)
        stats = ChannelStats(name).finish(stats_state, info)
        _store_units(store, model, name, topk, stats, sample_state, labels, progress=report)
    tick("units")
    bar.set_postfix_str("visualisations")
    for name in names:
        _visualise(store, model, name, size=vis_size, steps=vis_steps, diversity=diversity, negative=negative, seed=seed,
                   stats_max=states[name][1]["max"] if states[name][1] is not None else None, progress=report)
    tick("visualisations")
    bar.set_postfix_str("layer atlases")
    for name in names:
        _layer_atlas(store, model, name, states[name][2], labels, grid=grid, min_count=min_count, size=icon_size,
                     steps=icon_steps or vis_steps, seed=seed, progress=report)
    tick("layer atlases")
    if concepts is not None:
        bar.set_postfix_str("concepts")
        _concepts(store, model, names, concepts, batch_size=batch_size, progress=report)
    tick("concepts")
    _flows(store, model, names, all_files[:flows])
    tick("flows")
    bar.close()
    for name in names:
        store.mark_built(name)
    store.set_meta(provenance={"convscope": VERSION, "images": len(all_files),
                               "root": str(Path(images).resolve()) if isinstance(images, (str, os.PathLike)) else None,
                               "layers": store.layers(), "options": {"k": k, "vis_size": vis_size, "vis_steps": vis_steps,
                                                                     "diversity": diversity, "samples": samples, "seed": seed},
                               "concepts": None if concepts is None else str(concepts),
                               "built": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.perf_counter() - start, 1),
                               "stage_seconds": timings})
    return store


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _image_files(images: Any) -> list[str]:
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if not path.is_dir():
            raise BuildError(f"{path}: not a folder of images")
        files = [str(p) for p in list_images(path)]
    elif isinstance(images, Sequence) and all(isinstance(s, (str, os.PathLike)) for s in images):
        files = [str(s) for s in images]
    else:
        raise BuildError("an atlas is built from a folder or a list of image files (the pages show them again)")
    if not files:
        raise BuildError(f"{images}: no image files")
    return files


def _register_images(store: AtlasStore, files: list[str]) -> dict[str, int]:
    """Image numbers: those already in the atlas keep theirs, new files are appended in the order given."""
    known = {s["source"]: s["id"] for s in store.images()}
    rows = []
    nxt = max(known.values(), default=-1) + 1
    for f in files:
        if f not in known:
            known[f] = nxt
            rows.append((nxt, f, None, None))
            nxt += 1
    if rows:
        store.add_images(rows)
    return known


def _ordered(model: Model, names: list[str]) -> list[str]:
    """All layers of the atlas (already built ones too) in the model's order."""
    order = [r.name for r in model.layers()]
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def _put_layer(store: AtlasStore, name: str, row: Any, position: int) -> None:
    existing = {r["name"]: r for r in store.model()["layers"]}
    if name in existing:
        return
    shape = tuple(row.output_shape) if row is not None and row.output_shape is not None else ()
    if len(shape) != 4 and len(shape) != 3:
        raise BuildError(f"layer {name!r} outputs {shape}; an atlas needs layers with feature maps (N, C, H, W)")
    c, h, w = shape[-3:]
    rf = row.receptive_field
    size = None if rf is None or rf.size is None else int(rf.size[0])
    stride = None if rf is None else int(rf.stride[0])
    store.put_layer(name, position, kind=row.type, channels=int(c), height=int(h), width=int(w), rf_size=size,
                    rf_stride=stride, fingerprint="")


# ---------------------------------------------------------------------------- stage 1: data


def _data_pass(store: AtlasStore, model: Model, names: list[str], files: list[str], *, k: int, samples: int, seed: int,
               batch_size: int, workers: int | None, amp: str | None, engine: str, address: str | None,
               num_gpus: float | None, progress: bool | None) -> dict[str, tuple[Any, Any, Any]]:
    """Per layer the (top-k, statistics, sample) states over every image, reusing saved states."""
    out: dict[str, tuple[Any, Any, Any]] = {}
    todo: dict[int, list[str]] = {}  # first image to stream -> layers
    saved: dict[str, tuple[list[Any], int]] = {}
    for name in names:
        path = store.root / "state" / f"{slug(name)}.data.pt"
        reducers = _reducers(name, k, samples, seed)
        count = 0
        if path.exists():
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta"])
            if meta.get("options") == [r.options() for r in reducers]:
                count = int(meta["count"])
                saved[name] = ([unpack(meta["plain"][i], {kk[len(f'{i}/'):]: v for kk, v in payload.items()
                                                         if isinstance(v, torch.Tensor) and kk.startswith(f"{i}/")})
                                for i in range(len(reducers))], count)
        if count < len(files):
            todo.setdefault(count, []).append(name)
        else:
            out[name] = tuple(saved[name][0])
    for first, group in sorted(todo.items()):
        reducers: list[Reducer] = []
        for name in group:
            reducers += [Remapped(r, range(first, len(files))) for r in _reducers(name, k, samples, seed)]
        pass_state = store.root / "state" / f"pass-{_digest([group, first, len(files), k, samples, seed])}.state"
        result = run_engine(model, files[first:], reducers, what="atlas data", batch_size=batch_size, state=pass_state,
                            progress=progress, desc=f"atlas data ({len(files) - first} images, {len(group)} layers)",
                            workers=workers, amp=amp, engine=engine, address=address, num_gpus=num_gpus)
        if result.info.interrupted:
            raise KeyboardInterrupt
        for j, name in enumerate(group):
            new = result.results[3 * j: 3 * j + 3]
            base = _reducers(name, k, samples, seed)
            if name in saved and saved[name][1] == first:
                merged = [r.merge_states(a, b) for r, a, b in zip(base, saved[name][0], new)]
            else:
                merged = list(new)
            _save_layer_states(store, name, base, merged, len(files))
            out[name] = tuple(merged)
        pass_state.unlink(missing_ok=True)
        Path(str(pass_state) + ".json").unlink(missing_ok=True)
    return out


def _reducers(name: str, k: int, samples: int, seed: int) -> list[Reducer]:
    return [TopKReducer(name, k=k), ChannelStats(name), ActivationSample(name, samples, seed)]


def _save_layer_states(store: AtlasStore, name: str, reducers: list[Reducer], states: list[Any], count: int) -> None:
    plains, tensors = [], {}
    for i, s in enumerate(states):
        plain, ts = pack(s)
        plains.append(plain)
        tensors.update({f"{i}/{kk}": v for kk, v in ts.items()})
    meta = {"count": count, "options": [r.options() for r in reducers], "plain": plains}
    save_tensors({"meta": json.dumps(meta), **tensors}, store.root / "state" / f"{slug(name)}.data.pt")


# ---------------------------------------------------------------------------- stage 2: units


def _store_units(store: AtlasStore, model: Model, name: str, topk: Any, stats: Any, sample: dict[str, Any] | None,
                 labels: list[str], *, progress: bool | None) -> None:
    c = len(stats.mean)
    sid = slug(name)
    image_class: dict[int, int] = {}
    if sample is not None:
        for img, cls in zip(sample["images"].tolist(), sample["classes"].tolist()):
            image_class[img] = cls
    neighbours = _neighbour_units(sample["vectors"] if sample is not None else None, c)
    rows = []
    for u in range(c):
        hits = topk.hits(u) if u in topk.channels else []
        classes = Counter(image_class.get(h.image, -1) for h in hits)
        classes.pop(-1, None)
        top_class = labels[classes.most_common(1)[0][0]] if classes and labels else None
        rows.append({"unit": u, "mean": float(stats.mean[u]), "std": float(stats.std[u]), "max": float(stats.max[u]),
                     "sparsity": float(stats.sparsity[u]), "fires": float(stats.fires[u]), "dead": bool(stats.fires[u] == 0),
                     "top_class": top_class, "neighbours": neighbours[u]})
    _filters(store, model, name, rows)
    store.put_units(name, rows)
    # dataset examples: patches (the receptive field) and their guided-backpropagation projections; a unit whose
    # top images and positions did not change (images added that do not beat them) keeps its pictures
    old = _stored_hits(store, name)
    same = {u for u in topk.channels if old.get(u) is not None
            and [(h.image, h.y, h.x) for h in topk.hits(u)] == [(r["image"], r["y"], r["x"]) for r in old[u]]
            and all(r["patch"] is None or (store.root / r["patch"]).is_file() for r in old[u])}
    changed = [u for u in topk.channels if u not in same]
    proj = None
    if topk.receptive_field is not None and changed:
        proj = topk.projected(model, changed, method="guided", progress=progress)
    thumbs: dict[int, str] = {}
    hit_rows = [r for u in sorted(same) for r in old[u]]
    cache: dict[int, Image.Image] = {}
    for u in changed:
        hits = topk.hits(u)
        pairs = topk.projection_pairs(u, proj, cache=cache) if proj is not None else [None] * len(hits)
        for h, pair in zip(hits, pairs):
            if h.image not in cache:
                cache[h.image] = topk.picture(h.image)
            pic = cache[h.image]
            if h.image not in thumbs:
                tpath, trel = store.file("images", f"{h.image}.jpg")
                pic.copy().resize((THUMB, THUMB * pic.height // max(pic.width, 1))).save(tpath, quality=88)
                thumbs[h.image] = trel
            patch_rel = projection_rel = None
            if pair is not None:  # both cropped to the projections' effective box, as the top-k grid shows them
                ppath, patch_rel = store.file(sid, f"u{u:04d}-top{h.rank}-patch.png")
                _fit(pair[0], PATCH).save(ppath)
                qpath, projection_rel = store.file(sid, f"u{u:04d}-top{h.rank}-projection.png")
                _fit(pair[1], PATCH).save(qpath)
            elif h.box is not None:
                t, left, b, r = h.box
                ppath, patch_rel = store.file(sid, f"u{u:04d}-top{h.rank}-patch.png")
                _fit(pic.crop((left, t, r, b)), PATCH).save(ppath)
            hit_rows.append({"unit": u, "rank": h.rank, "image": h.image, "value": h.value, "y": h.y, "x": h.x,
                             "box": None if h.box is None else list(h.box), "patch": patch_rel, "projection": projection_rel})
    store.put_hits(name, hit_rows)
    with store.connect() as db:
        db.executemany("UPDATE images SET thumb=? WHERE id=?", [(rel, i) for i, rel in thumbs.items()])


def _stored_hits(store: AtlasStore, layer: str) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    with store.connect() as db:
        for r in db.execute("SELECT * FROM hits WHERE layer=? ORDER BY unit, rank", (layer,)):
            out.setdefault(r["unit"], []).append({"unit": r["unit"], "rank": r["rank"], "image": r["image"], "value": r["value"],
                                                  "y": r["y"], "x": r["x"], "box": json.loads(r["box"]) if r["box"] else None,
                                                  "patch": r["patch"], "projection": r["projection"]})
    return out


def _fit(picture: Image.Image, side: int) -> Image.Image:
    """``picture`` scaled (nearest for small crops, so pixels stay visible) to ``side`` on its longer edge."""
    w, h = picture.size
    scale = side / max(w, h, 1)
    mode = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    return picture.resize((max(1, round(w * scale)), max(1, round(h * scale))), mode)


def _neighbour_units(vectors: torch.Tensor | None, c: int, n: int = 6) -> list[list[list[float]]]:
    """Per unit the ``n`` most correlated other units over the activation sample: ``[[unit, correlation], ...]``."""
    if vectors is None or vectors.shape[0] < 3:
        return [[] for _ in range(c)]
    x = vectors.double()
    x = x - x.mean(0)
    x = x / x.norm(dim=0).clamp_min(1e-12)
    corr = x.T @ x
    corr.fill_diagonal_(-2)
    vals, idx = corr.topk(min(n, c - 1), dim=1)
    return [[[int(j), round(float(v), 4)] for v, j in zip(vals[u].tolist(), idx[u].tolist()) if v > -2] for u in range(c)]


def _filters(store: AtlasStore, model: Model, name: str, rows: list[dict[str, Any]]) -> None:
    """Filter pictures and health for a Conv2d layer (or the last Conv2d inside a block): weights only."""
    module = resolve_layer(model.module, name)
    conv_name = name if isinstance(module, nn.Conv2d) else None
    if conv_name is None:
        inner = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
        if not inner:
            return
        conv_name = f"{name}.{inner[-1]}"
    conv = resolve_layer(model.module, conv_name)
    if conv.out_channels != len(rows):
        return
    pictures = tuple(conv.kernel_size) != (1, 1)  # a 1x1 kernel is one number per input channel: no picture
    from ..inspect import filter_health, filters

    health = filter_health(model, conv_name)
    fs = filters(model, conv_name, max_filters=None, max_channels=None)
    tiles = fs.tiles() if fs.kind != "channels" else [t[0] for t in fs.channel_tiles()]
    for u, row in enumerate(rows):
        row["filter_norm"] = float(health.norms[u])
        row["filter_health"] = "dead" if u in health.dead else ("aliased" if u in health.aliased else "ok")
        if pictures and u < len(tiles):
            path, rel = store.file(slug(name), f"u{u:04d}-filter.png")
            _fit(tiles[u], 48).save(path)
            row["filter"] = rel
    info = {"filter_layer": conv_name, "filter_kind": fs.kind}
    with store.connect() as db:
        old = db.execute("SELECT info FROM layers WHERE name=?", (name,)).fetchone()
        merged = {**json.loads(old["info"] or "{}"), **info}
        db.execute("UPDATE layers SET info=? WHERE name=?", (json.dumps(merged), name))


# ---------------------------------------------------------------------------- stage 3: visualisations


def _visualise(store: AtlasStore, model: Model, name: str, *, size: int, steps: int, diversity: int, negative: bool,
               seed: int, stats_max: torch.Tensor | None, progress: bool | None) -> None:
    key = f"vis:{name}"
    options = {"size": size, "steps": steps, "diversity": diversity, "negative": negative, "seed": seed}
    c = store.layer(name)["channels"]
    done = store.meta(key)
    if done == options and all(u["vis"] for u in store.layer(name)["units"]):
        return
    sid = slug(name)
    units = list(range(c))
    rows: dict[int, dict[str, Any]] = {u: {"unit": u} for u in units}
    common = {"size": size, "steps": steps, "seed": seed, "progress": False}
    bar = tqdm(total=c * (1 + int(negative) + diversity), desc=f"visualise {name}", unit="img", leave=False,
               disable=None if progress is None else not progress)
    try:
        for lo in range(0, c, RENDER_BATCH):
            chunk = units[lo:lo + RENDER_BATCH]
            for sign, suffix, field_name in ((1.0, "vis", "vis"), (-1.0, "neg", "negative"))[: 2 if negative else 1]:
                r = render(model, sign * channel(name, chunk), batch=len(chunk), **common)
                for u, img in zip(chunk, r.images):
                    path, rel = store.file(sid, f"u{u:04d}-{suffix}.png")
                    img.save(path)
                    rows[u][field_name] = rel
                bar.update(len(chunk))
        if diversity:
            scale = float(torch.quantile(stats_max.float(), 0.99)) if stats_max is not None and stats_max.numel() else 1.0
            weight = DIVERSITY_WEIGHT * max(scale, 1e-3)
            per = max(1, RENDER_BATCH // diversity)
            for lo in range(0, c, per):
                chunk = units[lo:lo + per]
                wanted = [u for u in chunk for _ in range(diversity)]
                obj = channel(name, wanted) + weight * grouped_diversity(name, diversity) if diversity > 1 else channel(name, wanted)
                r = render(model, obj, batch=len(wanted), **{**common, "seed": seed + 1})
                for j, u in enumerate(chunk):
                    rels = []
                    for s in range(diversity):
                        path, rel = store.file(sid, f"u{u:04d}-div{s}.png")
                        r.images[j * diversity + s].save(path)
                        rels.append(rel)
                    rows[u]["diversity"] = rels
                bar.update(len(wanted))
    finally:
        bar.close()
        store.put_units(name, list(rows.values()))
    store.set_meta(**{key: options})


# ---------------------------------------------------------------------------- stage 4: the layer atlas


def _layer_atlas(store: AtlasStore, model: Model, name: str, sample: dict[str, Any] | None, labels: list[str], *,
                 grid: int | None, min_count: int | None, size: int, steps: int, seed: int, progress: bool | None) -> None:
    if sample is None or sample["vectors"].shape[0] < 10:
        return
    vectors = sample["vectors"].float()
    n = vectors.shape[0]
    key = f"atlas:{name}"
    options = {"samples": n, "grid": grid, "min_count": min_count, "size": size, "steps": steps, "seed": seed}
    saved = store.meta(key)
    if saved is not None and saved.get("options") == options:
        return
    side = grid or int(max(4, min(20, round(math.sqrt(n / 8)))))
    need = min_count or max(2, min(8, n // (side * side * 2) + 1))
    coords = _umap(vectors, seed)
    lo = np.percentile(coords, 1, axis=0)
    hi = np.percentile(coords, 99, axis=0)
    margin = (hi - lo) * 0.1
    lo, hi = lo - margin, hi + margin
    unit_xy = np.clip((coords - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    cell = np.minimum((unit_xy * side).astype(int), side - 1)  # each edge in one cell: [i/side, (i+1)/side)
    gy = side - 1 - cell[:, 1]  # rows top to bottom, so the canvas is not y-flipped
    gx = cell[:, 0]
    flat = gy * side + gx
    classes = sample["classes"].numpy()
    cells = []
    means = []
    for f in np.unique(flat):
        members = np.nonzero(flat == f)[0]
        if len(members) < need:
            continue
        mean = vectors[torch.as_tensor(members)].mean(0)
        counts = Counter(int(c) for c in classes[members] if c >= 0)
        cells.append({"gx": int(f % side), "gy": int(f // side), "count": int(len(members)),
                      "classes": [[labels[c] if c < len(labels) else str(c), m] for c, m in counts.most_common(3)],
                      "units": [int(u) for u in torch.topk(mean, min(5, mean.numel())).indices.tolist()]})
        means.append(mean)
    if means:
        v = torch.stack(means)
        sid = slug(name)
        bar = tqdm(total=len(cells), desc=f"atlas icons {name}", unit="icon", leave=False,
                   disable=None if progress is None else not progress)
        try:
            for lo_i in range(0, len(cells), RENDER_BATCH):
                part = slice(lo_i, lo_i + RENDER_BATCH)
                r = render(model, icon_objective(name, v[part]), batch=v[part].shape[0], size=size, steps=steps, seed=seed,
                           progress=False)
                for cell_row, img in zip(cells[part], r.images):
                    path, rel = store.file(sid, "atlas", f"{cell_row['gx']:03d}-{cell_row['gy']:03d}.png")
                    img.save(path)
                    cell_row["icon"] = rel
                bar.update(len(r.images))
        finally:
            bar.close()
    store.put_cells(name, cells)
    store.set_meta(**{key: {"options": options, "grid": side, "samples": n, "min_count": need,
                            "method": "UMAP (cosine, n_neighbors 20, min_dist 0.01) of sampled activation vectors"}})


def _umap(vectors: torch.Tensor, seed: int) -> np.ndarray:
    """The 2-D layout of the activation sample: UMAP with the article's settings (cosine, 20 neighbours, min_dist 0.01)."""
    n = vectors.shape[0]
    return umap_projection(vectors, 2, seed=seed, n_neighbors=int(min(20, n - 1)), min_dist=0.01, metric="cosine").numpy()


# ---------------------------------------------------------------------------- stage 5: concepts


def _concepts(store: AtlasStore, model: Model, names: list[str], concepts: str | os.PathLike, *, batch_size: int,
              progress: bool | None) -> None:
    from ..dataset.dissect import dissect

    for name in names:
        key = f"concepts:{name}"
        if store.meta(key) == str(concepts):
            continue
        d = dissect(model, concepts, name, batch_size=batch_size, progress=progress,
                    state=store.root / "state" / f"{slug(name)}.dissect.state")
        rows = []
        for unit in d.units():
            rows.append({"unit": unit.unit, "concept": unit.name if unit.detector else None,
                         "concept_category": unit.category if unit.detector else None, "iou": float(unit.iou)})
        store.put_units(name, rows)
        store.set_meta(**{key: str(concepts)})


# ---------------------------------------------------------------------------- stage 6: flows


def _flows(store: AtlasStore, model: Model, names: list[str], files: list[str]) -> None:
    if not files:
        return
    ids = {s["source"]: s["id"] for s in store.images()}
    layers = store.layers()
    x = model.preprocess(files)
    with torch.no_grad(), Capture(model.module, layers) as cap:
        forward_fast(model.module, x, cap.forward)
    rows = []
    for name in layers:
        act = cap.activations[name].float().cpu()
        if act.ndim != 4:
            continue
        c = act.shape[1]
        cols = min(FLOW_COLUMNS, c)
        rows_n = math.ceil(c / cols)
        flat = act.flatten(2)
        lo, hi = flat.amin(2)[..., None, None], flat.amax(2)[..., None, None]
        norm = ((act - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)  # each map min-max normalised
        tiles = torch.nn.functional.interpolate(norm, size=(FLOW_TILE, FLOW_TILE), mode="nearest")
        tiles = torch.nn.functional.pad(tiles, (0, 0, 0, 0, 0, rows_n * cols - c))  # empty tiles after the last unit
        # (n, rows * cols, T, T) -> one sprite per image: tile u at row u // cols, column u % cols
        sprites = tiles.view(len(files), rows_n, cols, FLOW_TILE, FLOW_TILE).permute(0, 1, 3, 2, 4)
        sprites = sprites.reshape(len(files), rows_n * FLOW_TILE, cols * FLOW_TILE)
        for f, sprite in zip(files, sprites):
            path, rel = store.file(slug(name), "flow", f"image{ids[f]}.png")
            colorize(sprite, "viridis").save(path)
            rows.append({"image": ids[f], "layer": name, "sprite": rel, "columns": cols, "tile": FLOW_TILE, "units": c})
    store.put_flows(rows)
    thumbs = []
    for f in files:  # the flow page shows the image too
        tpath, trel = store.file("images", f"{ids[f]}.jpg")
        if not tpath.exists():
            pic = model.transform_image(f)
            pic.resize((THUMB, THUMB * pic.height // max(pic.width, 1))).save(tpath, quality=88)
        thumbs.append((trel, ids[f]))
    with store.connect() as db:
        db.executemany("UPDATE images SET thumb=? WHERE id=?", thumbs)


__all__ = ["ActivationSample", "BuildError", "build_atlas", "grouped_diversity", "icon_objective"]
