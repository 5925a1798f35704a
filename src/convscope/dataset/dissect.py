"""Network Dissection: which units of a layer detect which human-labelled concepts.

Bau, Zhou, Khosla, Oliva and Torralba, "Network Dissection: Quantifying Interpretability of Deep Visual
Representations" (CVPR 2017). :func:`dissect` runs a model over a Broden-format concept dataset in two
streaming passes, stopping each forward pass right after the layer:

1. per unit u, the threshold T_u = the ``quantile`` (0.995) of u's activations over every position of every
   image, taken at the layer's own resolution (before upsampling);
2. per unit, its mask in each image = its activation map upsampled bilinearly (``align_corners=False``) to the
   mask resolution, strictly above T_u. For every (unit, concept) pair the run adds up

   - the intersection |M_u ∩ L_c| over all images,
   - the unit's mask area over the images that carry some label of c's category,
   - the concept's area |L_c| over all images,

   and IoU(u, c) = Σ intersection / Σ union, union = area_u(images with c's category) + area_c - intersection
   (a total over the dataset, not a mean of per-image IoUs). Whole-image labels (scene, texture) are masks that
   cover the whole image.

A unit is a *detector* when its best IoU exceeds ``iou_threshold`` (0.04); its concept is the label of that best
IoU. *Unique detectors*: per category, the distinct labels among units whose best IoU within that category
exceeds the threshold, summed over categories (so one unit may count in two categories, as in the paper's
published counts). Each label belongs to the one category where its coverage is largest (ties: the first listed).

Memory is bounded by units x labels (the counters) plus, for the threshold, a per-unit "top tail": the linear
interpolation quantile (``numpy.quantile``'s default, ``method="linear"``: position q (n - 1) in the sorted values)
only reads the values at ascending ranks floor(q (n - 1)) and the next one, i.e. among the largest
m = n - floor(q (n - 1)) ≈ 0.5 % of the n values. Keeping the m largest values per unit (float32) is therefore
exact and costs units x m x 4 bytes, with n = images x h x w known from the index before the run: for Broden
(63,305 images) at a 7 x 7 layer with 512 units that is 512 x 15,510 x 4 B ≈ 32 MB. When that exceeds
``quantile_memory`` (default 256 MiB; e.g. 64 units at 56 x 56 need 254 MB) a per-unit histogram of
:data:`HISTOGRAM_BINS` bins is used instead: its range starts at the first batch's min/max and doubles its bin
width (merging neighbours) whenever a larger value arrives, so the estimate is off by at most one bin width,
reported per unit in :attr:`Dissection.threshold_error` (0 in exact mode).

**On the dataset engine.** Both passes are reducers of :func:`convscope.dataset.engine.run`
(:class:`ThresholdReducer`, then :class:`IoUReducer`), which streams the images (decoded by worker threads, fed
whole: :data:`WHOLE`) and records the layer; the labels of a batch are read from the Broden index by the
positions of its images. A reducer's step is pure: it returns new tensors (the exact tail is the top m of
kept + new values, the histogram a grown copy, the IoU counters old + this batch's) and the engine commits a batch
to the state in one assignment. **State and resume**: with ``state=PATH`` both passes share one state file
(:class:`~convscope.dataset.engine.StateStore`, stages ``"thresholds"`` and ``"iou"``), saved atomically every
``save_every`` batches, at the end of each pass, on Ctrl-C and on errors; a batch interrupted anywhere (Ctrl-C
in the middle of an update, an error, ``kill -9``) counts once or not at all, so a resumed run gives exactly the
numbers of an uninterrupted one. The same call resumes: a finished pass 1 is read back from the file, pass 2
continues after its last committed batch. A state of another run (model weights, dataset, layer, quantile,
categories, ``top_k``, ``quantile_memory``...) raises :class:`~convscope.dataset.folder.StateMismatchError`
naming what differs, and so does a state file written before the engine (format ``convscope-dissect/1``:
delete it and run again). With ``engine="ray"`` the per-batch states are merged in input order with
:meth:`Reducer.merge_states`: exact for the tail and the IoU counters; merging two histograms re-bins the second
one's bins at their centres, and the error bound grows by half its bin width (:attr:`threshold_error` says so).

Broden format (Bau et al.'s ``broden1_224``/``broden1_227``): ``index.csv`` with columns ``image, split, ih, iw,
sh, sw, color, object, part, material, scene, texture``; images and mask PNGs live under ``images/`` (paths in the
index are relative to it). The first four label columns name mask PNGs (several separated by ``;``: parts stack);
each mask pixel holds a global label number R + 256 G at (sh, sw) resolution, 0 = unlabelled. ``scene`` and
``texture`` hold whole-image label numbers (``;``-separated). ``label.csv`` (number, name, category, ...) names the
labels; its category field reads like ``object(12);part(3)``; ``c_<category>.csv`` (code, number, name, frequency,
coverage) gives each label's coverage in that category, used when present. :func:`make_synthetic_broden` writes a
small dataset in this format (Broden itself is about 1 GB per resolution).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import load_image
from ..models import Model, as_model
from ..options import Option
from ..probe import resolve_layer
from ..render import matrix_grid
from ..render.picture import Pictured
from .engine import (
    Forward,
    Preprocessing,
    Reducer,
    RunInfo,
    StateStore,
    feature_maps,
    fingerprint,
    forward_batches,
)
from .engine import preprocess as engine_preprocess
from .engine import run as run_engine
from .folder import BATCH_SIZE, SAVE_EVERY, DatasetError, ImageSource, check_state_path
from .topk import merge_topk

#: Label columns of ``index.csv``: the first four name mask PNGs, the last two whole-image labels.
PIXEL_COLUMNS = ("color", "object", "part", "material")
IMAGE_COLUMNS = ("scene", "texture")
CATEGORIES = PIXEL_COLUMNS + IMAGE_COLUMNS
#: Bins per unit of the histogram used when the exact top tail would not fit in ``quantile_memory``.
HISTOGRAM_BINS = 4096
#: Broden images are fed whole: resized (bilinear) to the input size, never cropped, so the masks stay aligned.
WHOLE = Preprocessing(kind="whole", resample="bilinear")
#: Elements of a (images x units x mask pixels) block processed at once in pass 2.
CHUNK_ELEMENTS = 1 << 25


#: Images kept per unit for :meth:`Dissection.grid`.
TOP_K = Option(int, 4, "images kept per unit for the picture", minimum=1, maximum=1000)
#: Index rows used (the first N); ``None``: all.
MAX_IMAGES = Option(int, None, "use the first N images of the index", minimum=1)


class DissectError(DatasetError):
    """A dissection that cannot run: a malformed Broden dataset or a bad option. (A saved state of another run
    raises :class:`~convscope.dataset.folder.StateMismatchError`, as in every resumable analysis.)"""


# ============================================================================ the dataset


@dataclass
class Broden:
    """A parsed Broden-format dataset (see the module docstring for the format).

    ``rows``: the index entries kept (dicts of the CSV columns). ``names[number]``: each label's name (index =
    global label number, ``names[0] = "-"``). ``category_of[number]``: index in ``categories`` of the label's
    category (largest coverage), -1 for unused or dropped labels. ``mask_size``: (sh, sw) of the first row; masks
    of other sizes are resized (nearest) to it.
    """

    root: Path
    rows: list[dict[str, str]]
    names: list[str]
    categories: list[str]
    category_of: list[int]
    mask_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, i: int) -> Path:
        return self.root / "images" / self.rows[i]["image"]

    def labels(self, i: int) -> tuple[list[np.ndarray], list[int]]:
        """Row ``i``'s pixel label maps (each (sh, sw) int64, label numbers, 0 = none) and its whole-image labels."""
        row = self.rows[i]
        maps = []
        for col in PIXEL_COLUMNS:
            for name in _split(row.get(col, "")):
                maps.append(_read_mask(self.root / "images" / name, self.mask_size))
        whole = []
        for col in IMAGE_COLUMNS:
            for text in _split(row.get(col, "")):
                try:
                    whole.append(int(float(text)))
                except ValueError:
                    raise DissectError(f"index.csv row {i + 2}: {col} must hold label numbers, got {text!r}") from None
        return maps, whole


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(";") if t.strip()]


def _read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DissectError(f"{path}: cannot read the mask ({exc})") from None
    labels = a[..., 0].astype(np.int64) + 256 * a[..., 1].astype(np.int64)
    if labels.shape != size:
        rows = (np.arange(size[0]) * labels.shape[0]) // size[0]
        cols = (np.arange(size[1]) * labels.shape[1]) // size[1]
        labels = labels[rows][:, cols]
    return labels


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DissectError(f"{path}: missing; a Broden dataset needs index.csv and label.csv")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()} for r in reader]
            fields = [(k or "").strip() for k in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DissectError(f"{path}: not a readable CSV file ({exc})") from None
    if not fields:
        raise DissectError(f"{path}: empty file")
    return rows


_CATEGORY_ITEM = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\(\s*([-+0-9.eE]+)\s*\))?\s*$")


def open_broden(root: str | os.PathLike, categories: Sequence[str] | None = None, *, max_images: int | None = None) -> Broden:
    """Read and check a Broden dataset's ``index.csv``, ``label.csv`` and ``c_<category>.csv`` files.

    ``categories``: keep only these (default: every category that has labels); labels whose primary
    category is dropped are ignored. ``max_images``: keep the first N rows. Raises :class:`DissectError`
    with the file and line for anything malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DissectError(f"{root}: no such folder (a Broden dataset folder holds index.csv, label.csv and images/)")
    index = _read_csv(root / "index.csv")
    need = ("image", "sh", "sw")
    if index:
        missing = [c for c in need if c not in index[0]]
        if missing:
            raise DissectError(f"{root / 'index.csv'}: missing column(s) {', '.join(missing)}")
    if not index:
        raise DissectError(f"{root / 'index.csv'}: no images listed")
    if max_images is not None:
        MAX_IMAGES.check("max_images", max_images)
        index = index[:max_images]
    labels = _read_csv(root / "label.csv")
    names: dict[int, str] = {}
    coverage: dict[int, dict[str, float]] = {}
    order: list[str] = []
    for line, row in enumerate(labels, 2):
        try:
            number = int(float(row.get("number", "")))
        except ValueError:
            raise DissectError(f"{root / 'label.csv'} line {line}: label number {row.get('number')!r} is not a number") from None
        if number < 0:
            raise DissectError(f"{root / 'label.csv'} line {line}: negative label number {number}")
        names[number] = row.get("name", "") or str(number)
        cov: dict[str, float] = {}
        for item in _split(row.get("category", "")):
            m = _CATEGORY_ITEM.match(item)
            if not m:
                raise DissectError(f"{root / 'label.csv'} line {line}: cannot read category {item!r} "
                                   "(expected e.g. object(12);part(3))")
            cov[m.group(1)] = float(m.group(2)) if m.group(2) else 0.0
            if m.group(1) not in order:
                order.append(m.group(1))
        coverage[number] = cov
    if not names:
        raise DissectError(f"{root / 'label.csv'}: no labels")
    # c_<category>.csv coverage overrides the label.csv counts where present
    for cat in list(order):
        path = root / f"c_{cat}.csv"
        if not path.is_file():
            continue
        for line, row in enumerate(_read_csv(path), 2):
            try:
                number = int(float(row.get("number", "")))
                value = float(row.get("coverage") or row.get("frequency") or 0)
            except ValueError:
                raise DissectError(f"{path} line {line}: number and coverage must be numbers") from None
            if number in coverage and cat in coverage[number]:
                coverage[number][cat] = value
    ordered = [c for c in CATEGORIES if c in order] + [c for c in order if c not in CATEGORIES]
    if categories is not None:
        unknown = [c for c in categories if c not in ordered]
        if unknown:
            raise DissectError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                               f"this dataset has {', '.join(ordered)}")
        kept = [c for c in ordered if c in categories]
    else:
        kept = ordered
    size = max(names) + 1
    out_names = ["-"] * size
    category_of = [-1] * size
    for number, name in names.items():
        out_names[number] = name
        cov = coverage[number]
        if number == 0 or not cov:
            continue
        best = max(cov, key=lambda c: (cov[c], -order.index(c)))
        category_of[number] = kept.index(best) if best in kept else -1
    try:
        mask_size = (int(float(index[0]["sh"])), int(float(index[0]["sw"])))
    except ValueError:
        raise DissectError(f"{root / 'index.csv'} line 2: sh and sw must be numbers") from None
    if min(mask_size) < 1:
        raise DissectError(f"{root / 'index.csv'} line 2: mask size {mask_size} must be positive")
    return Broden(root, index, out_names, kept, category_of, mask_size)


# ============================================================================ synthetic data


def make_synthetic_broden(path: str | os.PathLike, n_images: int = 40, *, size: int = 32, square_every: int = 5,
                          seed: int = 0) -> Path:
    """Write a small Broden-format dataset to ``path`` (a folder, created) and return it.

    Every image (``size`` x ``size``, masks at half resolution like Broden) is dark noise (values <= 0.4) with a
    blue disk; every ``square_every``-th image also holds a bright red square of side ``size // 8`` (even,
    aligned to 2 pixels so it is exact at mask resolution). Labels: color ``black`` (background) and ``blue``
    (the disk); object ``square``, ``disk``; two stacked part masks (``top`` and ``left`` halves of the square,
    overlapping in one quarter); material ``metal`` (the disk; ``disk`` is also listed under material with less
    coverage, so it belongs to object); scene ``indoor`` / ``outdoor`` (alternating, some images both);
    texture ``striped`` (every third image). A unit that fires on red regions is a ``square`` detector.
    """
    root = Path(path)
    if size < 16 or size % 16:
        raise DissectError(f"size must be a multiple of 16 (>= 16), got {size}")
    if n_images < 1 or square_every < 1:
        raise DissectError("n_images and square_every must be at least 1")
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [  # number, name, category field, coverage by category
        (1, "black", "color(1)", {"color": 0.8}), (2, "blue", "color(1)", {"color": 0.1}),
        (3, "square", "object(1)", {"object": 0.02}), (4, "disk", "object(1);material(1)", {"object": 0.1, "material": 0.05}),
        (5, "top", "part(1)", {"part": 0.01}), (6, "left", "part(1)", {"part": 0.01}),
        (7, "metal", "material(1)", {"material": 0.1}), (8, "indoor", "scene(1)", {"scene": 0.5}),
        (9, "outdoor", "scene(1)", {"scene": 0.5}), (10, "striped", "texture(1)", {"texture": 0.3}),
    ]
    h = size // 2
    side = max(2, (size // 8) // 2 * 2)
    yy, xx = np.mgrid[0:size, 0:size]
    rows = []
    for i in range(n_images):
        img = rng.uniform(0, 0.4, (size, size, 3))
        color = np.ones((size, size), np.int64)
        obj = np.zeros((size, size), np.int64)
        material = np.zeros((size, size), np.int64)
        cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 8]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disk] = np.stack([rng.uniform(0, 0.2, disk.sum()), rng.uniform(0, 0.2, disk.sum()), rng.uniform(0.7, 1, disk.sum())], 1)
        color[disk], obj[disk], material[disk] = 2, 4, 7
        parts = []
        if i % square_every == 0:
            top = int(rng.integers(0, (size - side) // 2)) * 2
            left = int(rng.integers(0, (size - side) // 2)) * 2
            sq = np.zeros((size, size), bool)
            sq[top:top + side, left:left + side] = True
            img[sq] = np.stack([rng.uniform(0.8, 1, sq.sum()), rng.uniform(0, 0.1, sq.sum()), rng.uniform(0, 0.1, sq.sum())], 1)
            obj[sq], color[sq], material[sq] = 3, 0, 0
            p1 = np.zeros((size, size), np.int64)
            p1[top:top + side // 2, left:left + side] = 5
            p2 = np.zeros((size, size), np.int64)
            p2[top:top + side, left:left + side // 2] = 6
            parts = [p1, p2]
        Image.fromarray((img * 255).round().astype(np.uint8)).save(root / "images" / f"syn_{i:05d}.png")
        cols = {}
        for col, maps in (("color", [color]), ("object", [obj]), ("part", parts), ("material", [material])):
            files = []
            for j, m in enumerate(maps):
                if not m.any():
                    continue
                name = f"syn_{i:05d}_{col}_{j}.png"
                small = m[::2, ::2]
                rgb = np.stack([small % 256, small // 256, np.zeros_like(small)], -1).astype(np.uint8)
                Image.fromarray(rgb).save(root / "images" / name)
                files.append(name)
            cols[col] = ";".join(files)
        scene = "8" if i % 2 == 0 else "9"
        if i % 7 == 3:
            scene = "8;9"
        rows.append({"image": f"syn_{i:05d}.png", "split": "train", "ih": size, "iw": size, "sh": h, "sw": h, **cols,
                     "scene": scene, "texture": "10" if i % 3 == 0 else ""})
    with open(root / "index.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
        w.writeheader()
        w.writerows(rows)
    with open(root / "label.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        w.writerow([0, "-", "", 0, 0, ""])
        for number, name, cat, cov in labels:
            w.writerow([number, name, cat, 1, max(cov.values()), ""])
    with open(root / "category.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for cat in CATEGORIES:
            nums = [n for n, _, _, cov in labels if cat in cov]
            w.writerow([cat, min(nums), max(nums), len(nums), n_images])
    for cat in CATEGORIES:
        with open(root / f"c_{cat}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            for code, (number, name, _, cov) in enumerate([item for item in labels if cat in item[3]], 1):
                w.writerow([code, number, name, 1, cov[cat]])
    return root


# ============================================================================ result


@dataclass(frozen=True)
class Unit:
    """One unit's verdict: its best ``label`` (number) and ``name``, that label's ``category``, the ``iou`` and
    whether it is a ``detector`` (iou > the run's threshold); ``threshold`` is its activation threshold T_u."""

    unit: int
    label: int
    name: str
    category: str | None
    iou: float
    detector: bool
    threshold: float


@dataclass(eq=False)
class Dissection(Pictured):
    """Network Dissection of ``layer`` (Bau et al. 2017).

    ``iou`` (U, L) float64: IoU of every unit with every label (column = global label number; unused numbers
    and label 0 hold 0). ``intersection``, ``unit_area`` (U, K: the unit's mask area over images carrying a
    label of category k) and ``label_area`` (L,) are the raw totals (mask pixels). ``thresholds`` (U,): T_u;
    ``threshold_error`` (U,): bound on |T_u - exact quantile| (0 in exact mode). ``names``/``label_category``:
    per label number, its name and category (``None``: unused or dropped). ``top_images`` (U, k): dataset
    positions of each unit's images with the largest maximum activation (-1 = none); ``top_maps`` (U, k, h, w):
    the unit's activation maps on those images (pictures are drawn from them). ``processed``: index rows
    done in pass 2; ``interrupted``: stopped by Ctrl-C (``stage`` says in which pass).
    """

    layer: str
    quantile: float
    iou_threshold: float
    categories: list[str]
    names: list[str]
    label_category: list[str | None]
    thresholds: torch.Tensor
    threshold_error: torch.Tensor
    exact_threshold: bool
    iou: torch.Tensor
    intersection: torch.Tensor
    unit_area: torch.Tensor
    label_area: torch.Tensor
    top_images: torch.Tensor
    sources: list[str]
    mask_size: tuple[int, int]
    map_size: tuple[int, int]
    processed: int
    total: int
    skipped: list[tuple[int, str]]
    interrupted: bool = False
    stage: str = "done"
    seconds: float = 0.0
    root: str | None = None
    model: Any = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False)
    #: (U, k, h, w) the layer's maps of each unit's top images (what :meth:`grid` draws; ``None``: not kept)
    top_maps: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_units(self) -> int:
        return int(self.thresholds.shape[0])

    def units(self) -> list[Unit]:
        """Every unit's best label, in unit order."""
        best, arg = self.iou.max(dim=1) if self.iou.numel() else (torch.zeros(self.num_units), torch.zeros(self.num_units, dtype=torch.long))
        out = []
        for u, (v, lab) in enumerate(zip(best.tolist(), arg.tolist())):
            out.append(Unit(u, int(lab), self.names[lab] if lab < len(self.names) else str(lab),
                            self.label_category[lab] if lab < len(self.label_category) else None, float(v),
                            float(v) > self.iou_threshold, float(self.thresholds[u])))
        return out

    def detectors(self) -> dict[str, int]:
        """Per category: how many units are detectors whose best label is in that category."""
        out = {c: 0 for c in self.categories}
        for u in self.units():
            if u.detector and u.category is not None:
                out[u.category] += 1
        return out

    def unique_detectors(self) -> dict[str, list[str]]:
        """Per category: the distinct labels among units whose best IoU within that category exceeds the threshold."""
        out: dict[str, list[str]] = {}
        for cat in self.categories:
            cols = [i for i, c in enumerate(self.label_category) if c == cat]
            if not cols or not self.num_units:
                out[cat] = []
                continue
            sub = self.iou[:, cols]
            v, a = sub.max(dim=1)
            found = sorted({cols[j] for j, x in zip(a.tolist(), v.tolist()) if x > self.iou_threshold})
            out[cat] = [self.names[i] for i in found]
        return out

    def summary(self) -> dict[str, Any]:
        """Counts: units, detectors (all and per category), unique detectors (total and per category)."""
        det = self.detectors()
        uniq = self.unique_detectors()
        return {"units": self.num_units, "detectors": sum(det.values()), "unique_detectors": sum(len(v) for v in uniq.values()),
                "per_category": {c: {"detectors": det[c], "unique": len(uniq[c]), "labels": uniq[c]} for c in self.categories}}

    def table(self, top: int | None = None) -> str:
        """Plain-text table, units sorted by IoU (best first); ``top`` limits the rows."""
        units = sorted(self.units(), key=lambda u: (-u.iou, u.unit))[:top]
        s = self.summary()
        lines = [f"{self.layer}: {s['detectors']} detectors of {s['units']} units (IoU > {self.iou_threshold:g}), "
                 f"{s['unique_detectors']} unique concepts; {self.processed - len(self.skipped)} images"
                 + ("" if self.stage == "done" else f" (interrupted in {self.stage})"),
                 "  ".join(f"{c}: {v['detectors']}/{v['unique']}" for c, v in s["per_category"].items()) + "  (detectors/unique)",
                 f"{'unit':>5}  {'iou':>7}  {'threshold':>10}  {'category':<9} label"]
        for u in units:
            lines.append(f"{u.unit:>5}  {u.iou:>7.4f}  {u.threshold:>10.4g}  {u.category or '-':<9} {u.name}"
                         + ("" if u.detector else "  (not a detector)"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the full IoU matrix as JSON-ready data (per unit: best label, IoU, detector, threshold)."""
        return {
            "layer": self.layer, "quantile": self.quantile, "iou_threshold": self.iou_threshold,
            "exact_threshold": self.exact_threshold, "mask_size": list(self.mask_size), "map_size": list(self.map_size),
            "processed": self.processed, "total": self.total, "stage": self.stage, "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3), "root": self.root,
            "skipped": [{"image": i, "reason": r} for i, r in self.skipped],
            **self.summary(),
            "unit_results": [{"unit": u.unit, "label": u.name, "label_number": u.label, "category": u.category,
                              "iou": round(u.iou, 6), "detector": u.detector, "threshold": u.threshold,
                              "threshold_error": float(self.threshold_error[u.unit]),
                              "top_images": [self.sources[i] for i in self.top_images[u.unit].tolist() if i >= 0]}
                             for u in self.units()],
        }

    # ------------------------------------------------------------------ picture
    def to_image(self) -> Image.Image:
        return self.grid()

    def grid(self, units: Sequence[int] | None = None, *, rows: int = 8, model: Any = None, cell: int = 96) -> Image.Image:
        """Rows = units (default: the ``rows`` best by IoU), columns = their top images, each with the unit's
        mask (activation upsampled, > T_u) tinted and outlined; row label = unit, concept and IoU.

        Drawn from the result alone (:attr:`top_maps`, kept by pass 2): no forward pass. A result without maps (made
        by hand) is drawn by one forward pass over the images shown with ``model`` (default :attr:`model`).
        """
        all_units = self.units()
        chosen = list(units) if units is not None else [u.unit for u in sorted(all_units, key=lambda u: (-u.iou, u.unit))[:rows]]
        if not chosen:
            raise DissectError("no units to draw")
        wanted = sorted({i for u in chosen for i in self.top_images[u].tolist() if i >= 0})
        if not wanted:
            raise DissectError("no images were scored; nothing to draw")
        pictures = {i: load_image(self.sources[i]) for i in wanted}
        act = None
        if self.top_maps is None:
            model = as_model(model) if model is not None else self.model
            if model is None:
                raise DissectError("this result keeps no activation maps; drawing needs the model (pass model=...)")
            act = layer_activations(model, [pictures[i] for i in wanted], self.layer)
        position = {i: j for j, i in enumerate(wanted)}
        table = []
        for u in chosen:
            tiles = []
            for rank, i in enumerate(self.top_images[u].tolist()):
                if i < 0:
                    continue
                a = (self.top_maps[u, rank] if act is None else act[position[i], u])[None, None].float()
                pic = pictures[i].resize((cell, cell), Image.Resampling.BILINEAR)
                up = F.interpolate(a, size=self.mask_size, mode="bilinear", align_corners=False)[0, 0]
                mask = (up > float(self.thresholds[u])).cpu().numpy()
                tiles.append(_outlined(pic, mask))
            table.append(tiles or [Image.new("RGB", (cell, cell), (255, 255, 255))])
        labels = [f"unit {u.unit}: {u.name} ({u.category or '-'}) IoU {u.iou:.3f}" for u in (all_units[c] for c in chosen)]
        return matrix_grid(table, row_labels=labels, column_labels=[str(j + 1) for j in range(max(len(t) for t in table))],
                           cell=cell, pad=2, title=f"Network Dissection of {self.layer}: unit masks (activation above its {100 * self.quantile:g}th percentile)")


def _outlined(pic: Image.Image, mask: np.ndarray) -> Image.Image:
    """``pic`` with ``mask`` (any resolution, resized nearest) tinted yellow inside and outlined in red."""
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(pic.size, Image.Resampling.NEAREST)) > 0
    a = np.asarray(pic.convert("RGB"), dtype=np.float32)
    a = np.where(m[..., None], 0.6 * a + 0.4 * np.array([255, 230, 0], np.float32), 0.55 * a)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    a[edge] = (255, 0, 0)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


# ============================================================================ inputs and activations


def whole_image_input(model: Model, pictures: list[Image.Image]) -> torch.Tensor:
    """Broden images fed whole: resized (bilinear) to the model's input size, never cropped, so the masks stay
    aligned, then normalised with the model's mean/std: the network input the engine makes with :data:`WHOLE`
    (the same functions, so the same values), on the model's device."""
    return engine_preprocess(model, pictures, WHOLE)


def layer_maps(batch: Forward, layer: str) -> torch.Tensor:
    """The recorded feature maps (N, C, h, w) of ``layer`` in float32 (a clear error when they are not maps)."""
    return feature_maps(batch.activations[layer], layer).float()


def layer_activations(model: Model, pictures: list[Any], layer: str) -> torch.Tensor:
    """``layer``'s feature maps (float32) for a few pictures fed whole, in one forward pass stopped at the layer."""
    with contextlib.closing(forward_batches(model, ImageSource(pictures), len(pictures), preprocessing=WHOLE,
                                            layers=[layer], workers=0)) as batches:
        _, fwd = next(batches)
    return layer_maps(fwd, layer)


# ============================================================================ pass 1: thresholds


def tail_size(n: int, quantile: float) -> int:
    """How many of the largest of ``n`` values the linear-interpolation ``quantile`` reads: n - floor(q (n - 1))."""
    return int(n - math.floor(quantile * (n - 1))) if n > 0 else 0


def quantile_from_tail(tail: torch.Tensor, n: int, quantile: float) -> torch.Tensor:
    """Per row, ``numpy.quantile(values, quantile)`` (method "linear") from the row's largest values.

    ``tail`` (U, m): the m >= :func:`tail_size` largest of each row's ``n`` values, any order.
    """
    t = torch.sort(tail.double(), dim=1).values
    m = t.shape[1]
    pos = quantile * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = t[:, lo - (n - m)], t[:, hi - (n - m)]
    return a + frac * (b - a)


class _Histogram:
    """Per-unit fixed-size histograms whose range grows by doubling the bin width (merging neighbours).

    ``counts`` (U, bins) float64, ``lo`` (U,): the left edge, ``width`` (U,): the bin width, ``slack`` (U,): how
    far merged-in values may have moved (0 unless histograms were merged, see :meth:`merged`). Immutable: every
    operation returns a new histogram and leaves this one's tensors as they were.
    """

    def __init__(self, counts: torch.Tensor, lo: torch.Tensor, width: torch.Tensor, slack: torch.Tensor | None = None):
        self.bins = int(counts.shape[1])
        self.counts, self.lo, self.width = counts, lo, width
        self.slack = torch.zeros_like(width) if slack is None else slack

    @classmethod
    def of(cls, values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> _Histogram:
        """A histogram of ``values`` (U, n) whose range starts at their min/max (the max at half the bins)."""
        lo = values.amin(dim=1).double()
        hi = values.amax(dim=1).double()
        width = ((hi - lo) / (bins / 2)).clamp_min(1e-12)
        return cls(torch.zeros(values.shape[0], bins, dtype=torch.float64, device=values.device), lo, width).added(values)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Histogram:
        return cls(state["counts"], state["lo"], state["width"], state["slack"])

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "lo": self.lo, "width": self.width, "slack": self.slack}

    def added(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> _Histogram:
        """This histogram plus ``values`` (U, n) (each counted ``weights`` times, default once): a new histogram
        whose range first grows (bin width doubled, neighbours merged) until it holds the largest value."""
        v = values.double()
        top = v.amax(dim=1) if weights is None else torch.where(weights > 0, v, -math.inf).amax(dim=1)
        counts, width = self.counts.clone(), self.width.clone()
        need = torch.ceil(torch.log2(((top - self.lo) / (width * self.bins)).clamp_min(1e-300))).clamp_min(0)
        need = torch.where(top >= self.lo + width * self.bins, need.clamp_min(1), need * 0)
        for d in torch.unique(need[need > 0]).tolist():
            rows = (need == d).nonzero().flatten()
            f = 2 ** int(d)
            if f >= self.bins:
                merged = counts[rows].sum(dim=1, keepdim=True)
                counts[rows] = F.pad(merged, (0, self.bins - 1))
            else:
                merged = counts[rows].view(len(rows), self.bins // f, f).sum(dim=2)
                counts[rows] = F.pad(merged, (0, self.bins - self.bins // f))
            width[rows] *= f
        idx = ((v - self.lo[:, None]) / width[:, None]).floor().clamp(0, self.bins - 1).long()
        counts.scatter_add_(1, idx, torch.ones_like(v) if weights is None else weights.double())
        return _Histogram(counts, self.lo, width, self.slack)

    def merged(self, other: _Histogram) -> _Histogram:
        """This histogram's values followed by ``other``'s, approximately: ``other``'s counts are added at the centres
        of their bins, so each of its values moves by at most half its bin width (added to :attr:`slack`)."""
        centres = other.lo[:, None] + other.width[:, None] * (torch.arange(other.bins, device=other.counts.device,
                                                                            dtype=torch.float64) + 0.5)
        out = self.added(centres, other.counts)
        return _Histogram(out.counts, out.lo, out.width, torch.maximum(self.slack, other.slack + other.width / 2))

    def quantile(self, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear-interpolation quantile per unit and its error bound (one bin width, plus the merging slack).

        The values at the two integer ranks around q (n - 1) are each placed inside their bin (ranks spread
        evenly through it), so each is off by less than a bin width, and so is their interpolation.
        """
        n = self.counts.sum(dim=1)
        pos = quantile * (n - 1)
        lo = pos.floor()
        cum = self.counts.cumsum(dim=1)

        def at(rank: torch.Tensor) -> torch.Tensor:
            b = torch.searchsorted(cum, rank[:, None], right=True).clamp_max(self.bins - 1).flatten()
            before = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)[:, None]).flatten(), torch.zeros_like(rank))
            inside = self.counts.gather(1, b[:, None]).flatten().clamp_min(1)
            return self.lo + self.width * (b.double() + ((rank - before + 0.5) / inside).clamp(0, 1))

        a, b = at(lo), at(torch.minimum(lo + 1, n - 1))
        return a + (pos - lo) * (b - a), self.width + self.slack


class ThresholdReducer(Reducer):
    """Pass 1 of :func:`dissect`: per unit of ``layer``, the ``quantile`` of its activations over every position of
    every image (see the module docstring), as a reducer of the dataset engine.

    ``count``: the dataset's images (n = count x h x w sizes the exact tail). State: ``map_size``, ``exact``,
    ``tail_size``, ``images`` and either ``tail`` (U, <= m) float32, the largest values seen, or the histogram's
    ``counts``/``lo``/``width``/``slack``; :meth:`step` builds new tensors and never changes the ones it is given.
    :meth:`merge_states`: the top m of both tails (exact), or :meth:`_Histogram.merged` (approximate, with its
    bound). :meth:`finish`: ``{"thresholds", "threshold_error", "exact", "map_size"}`` (``None``: no image yet).
    """

    def __init__(self, layer: str, *, quantile: float = 0.995, count: int, quantile_memory: int = 256 * 2**20,
                 name: str = "thresholds"):
        super().__init__()
        self.layer, self.quantile, self.count, self.quantile_memory = layer, quantile, int(count), int(quantile_memory)
        self.layers = (layer,)
        self.name = name

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "quantile": self.quantile, "count": self.count, "quantile_memory": self.quantile_memory}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        act = layer_maps(batch, self.layer)
        n, U, h, w = act.shape
        vals = act.permute(1, 0, 2, 3).reshape(U, -1)
        if state is None:
            m = tail_size(self.count * h * w, self.quantile)
            head = {"map_size": [int(h), int(w)], "exact": U * m * 4 <= self.quantile_memory, "tail_size": m, "images": 0}
        else:
            head = {k: state[k] for k in ("map_size", "exact", "tail_size", "images")}
            _same_maps(self.layer, head["map_size"], [int(h), int(w)])
        head["images"] += int(n)
        if head["exact"]:
            kept = vals if state is None else torch.cat([state["tail"], vals], dim=1)
            return {**head, "tail": torch.topk(kept, min(head["tail_size"], kept.shape[1]), dim=1, sorted=False).values}
        hist = _Histogram.of(vals) if state is None else _Histogram.from_state(state).added(vals)
        return {**head, **hist.state()}

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or b is None:
            return b if a is None else a
        _same_maps(self.layer, a["map_size"], b["map_size"])
        head = {"map_size": a["map_size"], "exact": a["exact"], "tail_size": a["tail_size"], "images": a["images"] + b["images"]}
        if a["exact"]:
            kept = torch.cat([a["tail"], b["tail"].to(a["tail"].device)], dim=1)
            return {**head, "tail": torch.topk(kept, min(a["tail_size"], kept.shape[1]), dim=1, sorted=False).values}
        other = _Histogram(*(b[k].to(a["counts"].device) for k in ("counts", "lo", "width", "slack")))
        return {**head, **_Histogram.from_state(a).merged(other).state()}

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> dict[str, Any] | None:
        if state is None:
            return None
        h, w = state["map_size"]
        if state["exact"]:
            thr = quantile_from_tail(state["tail"], int(state["images"]) * h * w, self.quantile)
            err = torch.zeros_like(thr)
        else:
            thr, err = _Histogram.from_state(state).quantile(self.quantile)
        return {"thresholds": thr.cpu(), "threshold_error": err.cpu(), "exact": bool(state["exact"]),
                "map_size": (int(h), int(w))}


def _same_maps(layer: str, before: Sequence[int], now: Sequence[int]) -> None:
    if list(before) != list(now):
        raise DissectError(f"layer {layer!r} gave maps of {tuple(now)} after {tuple(before)}; every input must have the same size")


# ============================================================================ pass 2: IoU tallies


class IoUReducer(Reducer):
    """Pass 2 of :func:`dissect`: per (unit, label) the intersection of the unit's masks (activation upsampled to the
    mask resolution, > its threshold) with the label's, per unit and category its mask area over the images carrying
    a label of that category, per label its area, and each unit's ``top_k`` images by maximum activation.

    ``ds``: the Broden dataset whose labels a batch's images have (read by their positions). ``thresholds`` (U,): pass
    1's. State: ``inter`` (U, L), ``unit_area`` (U, K), ``label_area`` (L,) float64 (integer counts, so sums are exact
    in any order), ``top_values``/``top_index`` (U, top_k); :meth:`step` returns old + this batch's in new tensors.
    :meth:`merge_states` (sums, stable top-k merge) is exact. :meth:`finish`: the state (zero counters before any image).
    """

    def __init__(self, layer: str, ds: Broden, thresholds: torch.Tensor, *, top_k: int = 4, name: str = "iou"):
        super().__init__()
        self.layer, self.ds, self.top_k, self.name = layer, ds, int(top_k), name
        self.layers = (layer,)
        self.thresholds = thresholds.detach().cpu()
        L, K = len(ds.names), len(ds.categories)
        cat_of = torch.tensor(ds.category_of, dtype=torch.long)
        self.cat_matrix = torch.zeros(L, max(K, 1), dtype=torch.float32)
        used = (cat_of >= 0).nonzero().flatten()
        self.cat_matrix[used, cat_of[used]] = 1
        self.keep = torch.where(cat_of >= 0, torch.arange(L), torch.zeros(L, dtype=torch.long))

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "top_k": self.top_k, "categories": self.ds.categories, "labels": len(self.ds.names),
                "mask_size": list(self.ds.mask_size)}

    def empty(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The state before any image: zero counters, no top images (-inf values, index -1)."""
        U, L, K = len(self.thresholds), len(self.ds.names), max(len(self.ds.categories), 1)
        return {"inter": torch.zeros(U, L, dtype=torch.float64, device=device),
                "unit_area": torch.zeros(U, K, dtype=torch.float64, device=device),
                "label_area": torch.zeros(L, dtype=torch.float64, device=device),
                "top_values": torch.full((U, self.top_k), -math.inf, device=device),
                "top_index": torch.full((U, self.top_k), -1, dtype=torch.long, device=device)}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        act = layer_maps(batch, self.layer)
        device = act.device
        U = act.shape[1]
        if len(self.thresholds) != U:
            raise DissectError(f"layer {self.layer!r} has {U} units, the thresholds are for {len(self.thresholds)}")
        thr = self.thresholds.to(device).float().view(1, -1, 1, 1)
        labels = [self.ds.labels(i) for i in batch.index.tolist()]
        inter, label_area, unit_area = _batch_counts(act, thr, labels, self.ds.mask_size, self.keep,
                                                     self.cat_matrix.to(device))
        old = self.empty(device) if state is None else state
        score = act.amax(dim=(2, 3)).T
        maps = act.transpose(0, 1).float()  # (U, n, h, w): kept for the top images, so pictures need no new pass
        old_maps = old.get("top_maps")
        if old_maps is None:
            old_maps = torch.zeros(U, self.top_k, *act.shape[-2:], device=device)
        top_values, top_index, top_maps = merge_topk(old["top_values"], old["top_index"], old_maps, score,
                                                     batch.index.to(device).unsqueeze(0).expand(U, -1), maps, self.top_k)
        return {"inter": old["inter"] + inter, "unit_area": old["unit_area"] + unit_area,
                "label_area": old["label_area"] + label_area, "top_values": top_values, "top_index": top_index,
                "top_maps": top_maps}

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or b is None:
            return b if a is None else a
        b = {k: v.to(a["inter"].device) for k, v in b.items()}
        maps = (a.get("top_maps"), b.get("top_maps")) if "top_maps" in a and "top_maps" in b else (None, None)
        top_values, top_index, top_maps = merge_topk(a["top_values"], a["top_index"], maps[0], b["top_values"],
                                                     b["top_index"], maps[1], self.top_k)
        out = {"inter": a["inter"] + b["inter"], "unit_area": a["unit_area"] + b["unit_area"],
               "label_area": a["label_area"] + b["label_area"], "top_values": top_values, "top_index": top_index}
        if top_maps is not None:
            out["top_maps"] = top_maps
        return out

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in (self.empty() if state is None else state).items()}


def _batch_counts(act: torch.Tensor, thr: torch.Tensor, labels: list[tuple[list[np.ndarray], list[int]]],
                  mask_size: tuple[int, int], keep: torch.Tensor, cat_matrix: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's intersections (U, L), label areas (L,) and unit areas per category (U, K), float64, in new
    tensors (the counters of the state are added to them by the caller, never changed)."""
    device = act.device
    n, U = act.shape[:2]
    P = mask_size[0] * mask_size[1]
    L = len(keep)
    # compact label ids of this batch: column 0 = no label
    layers = max([len(m) for m, _ in labels] + [1])
    pix = np.zeros((n, layers, P), np.int64)
    whole: list[list[int]] = []
    for j, (maps, img_labels) in enumerate(labels):
        for k, m in enumerate(maps):
            pix[j, k] = m.reshape(-1)
        whole.append(img_labels)
    pix_t = torch.from_numpy(pix)
    if pix_t.numel() and int(pix_t.max()) >= L or any(lab >= L or lab < 0 for w in whole for lab in w):
        raise DissectError(f"a mask or whole-image label uses a label number not in label.csv (largest known {L - 1})")
    pix_t = keep[pix_t]
    whole = [[int(keep[lab]) for lab in w if int(keep[lab]) > 0] for w in whole]
    present = torch.unique(torch.cat([pix_t.flatten(), torch.tensor([lab for w in whole for lab in w] + [0], dtype=torch.long)]))
    lookup = torch.zeros(L, dtype=torch.long)
    lookup[present] = torch.arange(len(present))
    Lb = len(present)
    compact = lookup[pix_t].to(device)
    present_d = present.to(device)
    inter_all = torch.zeros(U, L, dtype=torch.float64, device=device)
    label_area = torch.zeros(L, dtype=torch.float64, device=device)
    unit_area = torch.zeros(U, cat_matrix.shape[1], dtype=torch.float64, device=device)
    step = max(1, CHUNK_ELEMENTS // max(1, P * max(U, Lb)))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        onehot = torch.zeros(hi - lo, P, Lb, device=device)
        for k in range(layers):
            onehot.scatter_add_(2, compact[lo:hi, k].unsqueeze(-1), torch.ones(hi - lo, P, 1, device=device))
        for j in range(lo, hi):
            if whole[j]:
                onehot[j - lo, :, lookup[torch.tensor(whole[j])].to(device)] = 1
        onehot[..., 0] = 0
        onehot.clamp_(max=1)
        up = F.interpolate(act[lo:hi], size=mask_size, mode="bilinear", align_corners=False)
        masks = (up > thr).reshape(hi - lo, U, P).float()
        inter = torch.bmm(masks, onehot).sum(0).double()                 # (U, Lb)
        inter_all.index_add_(1, present_d, inter)
        label_area.index_add_(0, present_d, onehot.sum(dim=(0, 1)).double())
        has = (onehot.amax(dim=1) @ cat_matrix[present_d] > 0).float()   # (n, K): image carries a label of category k
        unit_area += (masks.sum(dim=2).T @ has).double()
    return inter_all, label_area, unit_area


# ============================================================================ the run


def dissect(
    model: Any,
    broden_root: str | os.PathLike,
    layer: str,
    *,
    batch_size: int = 32,
    categories: Sequence[str] | None = None,
    quantile: float = 0.995,
    iou_threshold: float = 0.04,
    max_images: int | None = None,
    top_k: int = 4,
    quantile_memory: int = 256 * 2**20,
    state: str | os.PathLike | None = None,
    save_every: int = 20,
    progress: bool | None | Callable[[str, int, int], None] = None,
    workers: int | None = None,
    amp: str | None = None,
    engine: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
) -> Dissection:
    """Network Dissection (Bau et al., CVPR 2017) of ``layer`` over the Broden dataset at ``broden_root``.

    ``model``: a :class:`~convscope.Model` or a plain module (:func:`convscope.as_model`: ImageNet mean/std,
    224 px); images are resized whole to its input size and normalised with its mean/std, no crop, so the masks
    stay aligned (:data:`WHOLE`). A dataset whose every image is unreadable raises
    :class:`~convscope.dataset.folder.UnreadableImagesError`.
    ``categories``: which concept categories to score (default all). ``quantile``: per-unit activation threshold
    (0.995). ``iou_threshold``: a detector's best IoU must exceed it (0.04). ``max_images``: the first N index rows.
    ``top_k``: images kept per unit for the picture. ``quantile_memory``: bytes allowed for the exact per-unit
    top tail; above that a histogram sketch is used (see the module docstring). ``state``: one file for both passes
    (:class:`~convscope.dataset.engine.StateStore`: ``torch.save`` of plain tensors, read back with
    ``weights_only=True``), saved every ``save_every`` batches, after each pass, on Ctrl-C and on errors; the same
    call continues from it, with exactly the numbers of an uninterrupted run; a state of another run (or of the
    format before the engine) raises :class:`~convscope.dataset.folder.StateMismatchError`. ``progress``: tqdm bars
    (``None``: only on a terminal) or a callable ``(stage, done, total)``, stage ``"thresholds"`` or ``"iou"``.
    ``workers``, ``amp``, ``engine``, ``address``, ``num_gpus``: see :func:`convscope.dataset.engine.run` (decode
    threads, autocast of the forward pass, the Ray engine).

    Cost: two forward passes per image (each stopped at ``layer``). Memory: units x labels float64 counters
    plus the threshold tail. Returns a :class:`Dissection`; Ctrl-C returns what is done (``interrupted``).
    """
    model = as_model(model)
    if not 0 < quantile < 1:
        raise DissectError(f"quantile must be between 0 and 1, got {quantile}")
    BATCH_SIZE.check("batch_size", batch_size)
    SAVE_EVERY.check("save_every", save_every)
    TOP_K.check("top_k", top_k)
    resolve_layer(model.module, layer)
    check_state_path(state)
    ds = open_broden(broden_root, categories, max_images=max_images)
    paths = [str(ds.image_path(i)) for i in range(len(ds))]
    source = ImageSource(paths)
    options = {"layer": layer, "quantile": quantile, "categories": ds.categories, "top_k": top_k,
               "quantile_memory": int(quantile_memory), "root": str(Path(broden_root).resolve())}
    store = StateStore(state, "dissection", fingerprint("dissection", model, source, [layer], WHOLE, dissect=options),
                       source.names)
    common = {"what": "dissection", "batch_size": batch_size, "preprocessing": WHOLE, "state": store,
              "save_every": save_every, "workers": workers, "amp": amp, "engine": engine, "address": address,
              "num_gpus": num_gpus}

    def progress_of(stage: str) -> bool | None | Callable[[int, int | None], None]:
        if callable(progress):
            return lambda done, total: progress(stage, done, total)
        return progress

    start = time.perf_counter()
    first = run_engine(model, source, [ThresholdReducer(layer, quantile=quantile, count=len(ds), quantile_memory=quantile_memory)],
                       stage="thresholds", progress=progress_of("thresholds"), desc=f"dissect {layer}: thresholds", **common)
    pass1 = first.results[0]
    if first.info.interrupted or pass1 is None:  # stopped during pass 1: no thresholds yet
        return _result(model, layer, ds, pass1, None, first.info, "thresholds", quantile, iou_threshold,
                       time.perf_counter() - start, paths, top_k)
    second = run_engine(model, source, [IoUReducer(layer, ds, pass1["thresholds"], top_k=top_k)], stage="iou",
                        progress=progress_of("iou"), desc=f"dissect {layer}: IoU", **common)
    return _result(model, layer, ds, pass1, second.results[0], second.info, "iou" if second.info.interrupted else "done",
                   quantile, iou_threshold, time.perf_counter() - start, paths, top_k)


def _result(model: Model, layer: str, ds: Broden, pass1: dict[str, Any] | None, counts: dict[str, torch.Tensor] | None,
            info: RunInfo, stage: str, quantile: float, iou_threshold: float, seconds: float, paths: list[str],
            top_k: int) -> Dissection:
    L = len(ds.names)
    label_category = [ds.categories[c] if c >= 0 else None for c in ds.category_of]
    skipped = [(int(i), str(r)) for i, r in info.skipped]
    if counts is None:  # stopped during pass 1: no thresholds yet
        z = torch.zeros(0)
        return Dissection(layer, quantile, iou_threshold, ds.categories, ds.names, label_category, z, z, True,
                          torch.zeros(0, L, dtype=torch.float64), torch.zeros(0, L, dtype=torch.float64), torch.zeros(0, len(ds.categories)),
                          torch.zeros(L), torch.zeros(0, top_k, dtype=torch.long), paths, ds.mask_size,
                          tuple(pass1["map_size"]) if pass1 else (0, 0), info.processed, len(ds), skipped, info.interrupted,
                          stage, seconds, str(ds.root), model)
    assert pass1 is not None
    inter = counts["inter"]
    cat_of = torch.tensor(ds.category_of)
    unit_area = counts["unit_area"]
    area_u = torch.zeros_like(inter)
    used = (cat_of >= 0).nonzero().flatten()
    area_u[:, used] = unit_area[:, cat_of[used]]
    union = area_u + counts["label_area"][None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-300), torch.zeros_like(inter))
    iou[:, 0] = 0
    top = torch.where(torch.isfinite(counts["top_values"]), counts["top_index"], -1)
    return Dissection(layer, quantile, iou_threshold, ds.categories, ds.names, label_category, pass1["thresholds"],
                      pass1["threshold_error"], pass1["exact"], iou, inter, unit_area[:, :len(ds.categories)],
                      counts["label_area"], top, paths, ds.mask_size, tuple(pass1["map_size"]), info.processed, len(ds),
                      skipped, info.interrupted, stage, seconds, str(ds.root), model,
                      top_maps=counts.get("top_maps"))
