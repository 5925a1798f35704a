"""Net2Vec: concepts encoded by several units of a layer, learned as one weight per channel.

Fong and Vedaldi, "Net2Vec: Quantifying and Explaining how Concepts are Encoded by Filters in Deep Neural
Networks" (CVPR 2018). Network Dissection (:mod:`.dissect`) asks which *single* unit matches a concept;
Net2Vec learns, per concept c, a weight vector w_c over the K channels of a layer and asks how well the
*combination* matches it:

- **segmentation** (pixel-level categories: colour, object, part, material; scene and texture labels describe
  whole images and are learned in classification mode only): each channel's map A_k is binarised at its activation threshold T_k (the 99.5th percentile
  over the dataset, as in Network Dissection, or thresholds given by the caller, e.g. a :class:`Dissection`'s);
  the concept mask is M_c = sigmoid(upsample(sum_k w_ck * A_k)), upsampled bilinearly to the label resolution.
  Training minimises, per pixel, -(alpha_c M_c L_c + (1 - alpha_c)(1 - M_c)(1 - L_c)) with
  alpha_c = 1 - (mean fraction of concept pixels in c's training images), on the training images that contain
  c; weights start uniform in +-1/sqrt(K), no bias; SGD with momentum 0.9. Scored by the *set IoU* on held-out
  images: sum |(M_c > 0.5) and L_c| / sum |(M_c > 0.5) or L_c| over the validation images that carry a label of
  c's category (the images Network Dissection's union counts).
- **classification**: each image's channels mean-pooled, one linear layer (with bias) per concept, binary
  cross-entropy with logits for "the image holds concept c"; SGD with momentum, learning rate decayed x0.1
  halfway. Scored by average precision on held-out images.

Both are compared with the **best single unit**, chosen on the training images (segmentation: the unit whose
thresholded, upsampled map has the best set IoU with c, Network Dissection's mask; classification: the unit
whose pooled activation ranks c's images best) and scored on the same held-out images. A concept *needs
several units* when the learned combination beats the best single unit.

Images are fed whole (resized to the model's input size, not cropped) so masks stay aligned. The layer's
activations of every image are held in memory (images x channels x h x w floats): use ``max_images`` for a big
dataset. Training runs all concepts at once (one weight matrix).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models import Model, as_model
from ..options import Option
from ..probe import resolve_layer
from ..progress import tqdm
from ..render import figure_to_image, png_bytes
from .dissect import IMAGE_COLUMNS, WHOLE, Broden, DissectError, Dissection, layer_maps, open_broden
from .engine import forward_batches
from .folder import BATCH_SIZE, ImageSource, SkippedImagesWarning, check_any_scored, skipped_summary

MODES = ("segmentation", "classification")
EPOCHS = Option(int, 30, "training epochs over the training images", minimum=1, maximum=10_000)
LEARNING_RATE = Option(float, None, "SGD learning rate (default: 0.5 segmentation, 0.1 classification)", minimum=1e-8, maximum=100.0)
VAL_FRACTION = Option(float, 0.25, "share of images held out for scoring (when the index has no val split)", minimum=0.05, maximum=0.95)
MIN_IMAGES = Option(int, 2, "a concept is learned only if it appears in at least this many training and held-out images", minimum=1, maximum=1_000_000)
TRAIN_BATCH = Option(int, 16, "images per SGD step", minimum=1, maximum=4096)


@dataclass(frozen=True)
class ConceptVector:
    """One concept's result: its learned weights over the layer's channels, the held-out score of the
    combination (set IoU, or average precision in classification mode) and of the best single unit."""

    label: int
    name: str
    category: str
    weights: torch.Tensor
    score: float
    single_unit: int
    single_score: float
    train_images: int
    val_images: int

    @property
    def gain(self) -> float:
        """How much the combination beats the best single unit (score - single_score)."""
        return self.score - self.single_score

    def top_units(self, mass: float = 0.8) -> list[int]:
        """The fewest units whose positive weights add up to ``mass`` of all positive weight (largest first)."""
        w = self.weights.clamp_min(0)
        total = float(w.sum())
        if total <= 0:
            return []
        order = torch.argsort(w, descending=True).tolist()
        out, acc = [], 0.0
        for u in order:
            out.append(u)
            acc += float(w[u])
            if acc >= mass * total:
                break
        return out


@dataclass(eq=False)
class Net2Vec:
    """Net2Vec (Fong & Vedaldi 2018) of ``layer``: one :class:`ConceptVector` per concept learned.

    ``mode``: ``"segmentation"`` (scores are set IoUs) or ``"classification"`` (average precisions).
    ``thresholds`` (K,): the channel thresholds used to binarise (segmentation). ``train``/``val``: dataset
    positions of the training and held-out images. ``skipped``: unreadable images.
    """

    layer: str
    mode: str
    concepts: list[ConceptVector]
    thresholds: torch.Tensor
    train: list[int]
    val: list[int]
    epochs: int
    skipped: list[tuple[int, str]] = field(default_factory=list)
    model: Any = field(default=None, repr=False)

    def needs_several(self, margin: float = 0.0) -> list[ConceptVector]:
        """Concepts the learned combination encodes better than any single unit (by more than ``margin``),
        best gain first."""
        return sorted((c for c in self.concepts if c.gain > margin), key=lambda c: -c.gain)

    def concept(self, name: str) -> ConceptVector:
        for c in self.concepts:
            if c.name == name:
                return c
        raise DissectError(f"no learned concept {name!r}; learned: {', '.join(c.name for c in self.concepts) or 'none'}")

    def table(self, top: int | None = None) -> str:
        """A text table: concept, category, Net2Vec score, best single unit and its score, the units carrying
        80% of the positive weight."""
        what = "IoU" if self.mode == "segmentation" else "AP"
        rows = sorted(self.concepts, key=lambda c: -c.gain)[:top]
        lines = [f"{'concept':<18} {'category':<10} {'net2vec ' + what:>12} {'best unit':>9} {what:>7} {'gain':>7}  units (80% of weight)"]
        for c in rows:
            units = ",".join(str(u) for u in c.top_units()[:8])
            lines.append(f"{c.name[:18]:<18} {c.category[:10]:<10} {c.score:>12.3f} {c.single_unit:>9d} {c.single_score:>7.3f} "
                         f"{c.gain:>+7.3f}  {units}")
        return "\n".join(lines)

    def picture(self, top: int = 20) -> Image.Image:
        """Bars per concept (largest gain first): the held-out score of the Net2Vec combination next to the
        best single unit's, labelled with the units that carry 80% of the positive weight."""
        from ..render.figures import Figure  # heavy (matplotlib): imported when a figure is drawn

        what = "set IoU" if self.mode == "segmentation" else "average precision"
        rows = sorted(self.concepts, key=lambda c: -c.gain)[:top]
        fig = Figure(figsize=(7.5, 0.42 * len(rows) + 1.3), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        y = np.arange(len(rows))[::-1]
        ax.barh(y + 0.2, [c.score for c in rows], height=0.38, color="#d95f02", label="Net2Vec (learned combination)")
        ax.barh(y - 0.2, [c.single_score for c in rows], height=0.38, color="#7570b3", label="best single unit")
        ax.set_yticks(y, [f"{c.name} ({c.category})" for c in rows])
        for yy, c in zip(y, rows):
            units = ",".join(str(u) for u in c.top_units()[:6])
            ax.text(max(c.score, c.single_score) + 0.01, yy, f"units {units}; unit {c.single_unit}", va="center", fontsize=7)
        ax.set_xlim(0, 1.35)
        ax.set_xlabel(f"held-out {what}")
        ax.set_title(f"Net2Vec at {self.layer}: concepts by one unit vs. a weighted set of units", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        return figure_to_image(fig)

    def _repr_png_(self) -> bytes:
        return png_bytes(self.picture())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "mode": self.mode, "epochs": self.epochs,
            "train_images": len(self.train), "val_images": len(self.val),
            "concepts": [{"label": c.label, "name": c.name, "category": c.category, "score": c.score,
                          "single_unit": c.single_unit, "single_score": c.single_score, "gain": c.gain,
                          "top_units": c.top_units(), "train_images": c.train_images, "val_images": c.val_images,
                          "weights": [round(float(v), 6) for v in c.weights]} for c in self.concepts],
            "needs_several": [c.name for c in self.needs_several()],
            "skipped": [[i, r] for i, r in self.skipped],
        }


def net2vec(
    model: Any,
    broden_root: str | os.PathLike,
    layer: str,
    *,
    mode: str = "segmentation",
    thresholds: Dissection | torch.Tensor | Sequence[float] | None = None,
    categories: Sequence[str] | None = None,
    concepts: Sequence[str] | None = None,
    quantile: float = 0.995,
    epochs: int = 30,
    lr: float | None = None,
    val_fraction: float = 0.25,
    min_images: int = 2,
    batch_size: int = 32,
    train_batch: int = 16,
    max_images: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Net2Vec:
    """Net2Vec (Fong & Vedaldi, CVPR 2018) of ``layer`` over the Broden-format dataset at ``broden_root``.

    ``mode``: ``"segmentation"`` (masks from thresholded channels, set IoU) or ``"classification"`` (pooled
    channels, average precision); see the module docstring for the exact losses. ``thresholds``: per-channel
    binarisation thresholds: a :class:`Dissection` of the same layer (its T_u), a tensor, or ``None`` (the
    ``quantile`` of each channel over every position of every image). ``categories``/``concepts``: restrict
    to these categories / label names. Held-out images: the index's ``split`` column when it names both
    ``train`` and ``val``, else every image whose position is in the last ``val_fraction`` of each block of 20
    (deterministic). A concept is learned when it appears in at least ``min_images`` training and held-out
    images. ``batch_size``: images per forward pass; ``train_batch``: images per SGD step; ``lr``: SGD
    learning rate (momentum 0.9; default 0.5 segmentation, 0.1 classification: our loss is a per-pixel mean,
    so the paper's 1e-4 on a sum is too small here). ``seed``: the weight initialisation.

    Cost: one forward pass per image (stopped at ``layer``), then ``epochs`` cheap passes over the stored
    activations. Memory: images x channels x h x w floats. Returns a :class:`Net2Vec`.
    """
    model = as_model(model)
    if mode not in MODES:
        raise DissectError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    EPOCHS.check("epochs", epochs)
    LEARNING_RATE.check("lr", lr)
    VAL_FRACTION.check("val_fraction", val_fraction)
    MIN_IMAGES.check("min_images", min_images)
    BATCH_SIZE.check("batch_size", batch_size)
    TRAIN_BATCH.check("train_batch", train_batch)
    if not 0 < quantile < 1:
        raise DissectError(f"quantile must be between 0 and 1, got {quantile}")
    resolve_layer(model.module, layer)
    ds = open_broden(broden_root, categories, max_images=max_images)
    acts, kept, skipped = _activations(model, ds, layer, batch_size, progress)
    N, K, h, w = acts.shape
    thr = _thresholds(thresholds, acts, quantile, layer)
    masks, present, label_ids = _concept_masks(ds, kept)
    train, val = _split(ds, kept, val_fraction)
    pixel_level = {k for k, c in enumerate(ds.categories) if c not in IMAGE_COLUMNS}
    chosen = [j for j, lab in enumerate(label_ids)
              if present[train, j].sum() >= min_images and present[val, j].sum() >= min_images
              and (concepts is None or ds.names[lab] in concepts)
              and (mode == "classification" or ds.category_of[lab] in pixel_level)]
    if concepts is not None:
        missing = sorted(set(concepts) - {ds.names[label_ids[j]] for j in chosen})
        if missing:
            raise DissectError(f"concept(s) {', '.join(missing)} not found in at least {min_images} training and "
                               "held-out images of this dataset")
    if not chosen:
        raise DissectError(f"no concept appears in at least {min_images} training and held-out images; "
                           "lower min_images or use more images")
    gen = torch.Generator().manual_seed(seed)
    cat_has = _category_presence(ds, present, label_ids)
    if mode == "segmentation":
        binary = (acts > thr.view(1, -1, 1, 1)).float()
        W = _train_segmentation(binary, masks[:, chosen], present[:, chosen], train, epochs, lr or 0.5, train_batch, gen, progress)
        scores = _set_iou_vectors(binary, W, masks[:, chosen], cat_has[:, chosen], val)
        unit_masks = F.interpolate(acts, size=ds.mask_size, mode="bilinear", align_corners=False) > thr.view(1, -1, 1, 1)
        best, single = _best_single_unit_iou(unit_masks, masks[:, chosen], cat_has[:, chosen], train, val)
    else:
        pooled = acts.mean(dim=(2, 3))
        W = _train_classification(pooled, present[:, chosen], train, epochs, lr or 0.1, train_batch, gen, progress)
        logits = pooled[val] @ W[:, :K].T + W[:, K]
        scores = torch.tensor([average_precision(logits[:, j], present[val, c]) for j, c in enumerate(chosen)])
        best, single = _best_single_unit_ap(pooled, present[:, chosen], train, val)
    out = []
    for j, c in enumerate(chosen):
        lab = label_ids[c]
        cat = ds.categories[ds.category_of[lab]] if ds.category_of[lab] >= 0 else "-"
        out.append(ConceptVector(lab, ds.names[lab], cat, W[j, :K].detach().clone(), float(scores[j]), int(best[j]),
                                 float(single[j]), int(present[train, c].sum()), int(present[val, c].sum())))
    return Net2Vec(layer, mode, out, thr, [kept[i] for i in train.tolist()], [kept[i] for i in val.tolist()], epochs,
                   skipped, model)


# ============================================================================ data


def _activations(model: Model, ds: Broden, layer: str, batch_size: int, progress: bool) -> tuple[torch.Tensor, list[int], list]:
    """Every readable image's activation maps at ``layer`` (N, K, h, w) on the CPU, their dataset positions and the
    unreadable images: one pass of the dataset engine's stream (:func:`~convscope.dataset.engine.forward_batches`),
    images fed whole as in :func:`~convscope.dataset.dissect.dissect`, maps checked by the same
    :func:`~convscope.dataset.dissect.layer_maps`."""
    source = ImageSource([str(ds.image_path(i)) for i in range(len(ds))])
    chunks, kept, skipped = [], [], []
    bar = tqdm(total=len(ds), desc=f"net2vec {layer}: activations", unit="img", leave=False, disable=not progress)
    try:
        with contextlib.closing(forward_batches(model, source, batch_size, preprocessing=WHOLE, layers=[layer])) as batches:
            for batch, fwd in batches:
                bar.update(batch.stop - batch.start)
                skipped += batch.skipped
                if fwd is None:
                    continue
                chunks.append(layer_maps(fwd, layer).cpu())
                kept += batch.index.tolist()
    finally:
        bar.close()
    if skipped:
        warnings.warn(skipped_summary(skipped), SkippedImagesWarning, stacklevel=3)
    check_any_scored(len(kept), skipped)
    return torch.cat(chunks), kept, skipped


def _thresholds(given: Any, acts: torch.Tensor, quantile: float, layer: str) -> torch.Tensor:
    K = acts.shape[1]
    if given is None:
        vals = acts.permute(1, 0, 2, 3).reshape(K, -1).numpy()
        return torch.from_numpy(np.quantile(vals, quantile, axis=1)).float()  # linear interpolation, as dissect
    if isinstance(given, Dissection):
        if given.layer != layer:
            raise DissectError(f"the dissection is of layer {given.layer!r}, not {layer!r}")
        given = given.thresholds
    thr = torch.as_tensor(given, dtype=torch.float32).flatten()
    if thr.numel() != K:
        raise DissectError(f"{thr.numel()} thresholds given for a layer with {K} channels")
    return thr


def _concept_masks(ds: Broden, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Masks (N, L, sh, sw) bool of every used label in every kept image (whole-image labels fill the mask),
    presence (N, L) bool, and the global label number of each column."""
    label_ids = [n for n in range(1, len(ds.names)) if ds.category_of[n] >= 0]
    column = {lab: j for j, lab in enumerate(label_ids)}
    sh, sw = ds.mask_size
    masks = torch.zeros(len(kept), len(label_ids), sh, sw, dtype=torch.bool)
    for row, i in enumerate(kept):
        maps, whole = ds.labels(i)
        for m in maps:
            for lab in np.unique(m).tolist():
                if lab in column:
                    masks[row, column[lab]] |= torch.from_numpy(m == lab)
        for lab in whole:
            if lab in column:
                masks[row, column[lab]] = True
    return masks, masks.flatten(2).any(dim=2), label_ids


def _category_presence(ds: Broden, present: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """(N, L) bool: image n carries some label of label l's category (whose images a set IoU's union counts)."""
    cats = torch.tensor([ds.category_of[lab] for lab in label_ids])
    out = torch.zeros_like(present)
    for k in cats.unique().tolist():
        cols = (cats == k).nonzero().flatten()
        out[:, cols] = present[:, cols].any(dim=1, keepdim=True)
    return out


def _split(ds: Broden, kept: list[int], val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out rows (indices into ``kept``): the index's split column when it has train and val,
    else the last ``val_fraction`` of every block of 20 positions."""
    splits = [ds.rows[i].get("split", "").strip().lower() for i in kept]
    if "val" in splits and "train" in splits:
        val = [r for r, s in enumerate(splits) if s == "val"]
        train = [r for r, s in enumerate(splits) if s == "train"]
    else:
        cut = 20 - max(1, round(20 * val_fraction))
        val = [r for r, i in enumerate(kept) if i % 20 >= cut]
        train = [r for r, i in enumerate(kept) if i % 20 < cut]
    if not train or not val:
        raise DissectError(f"need both training and held-out images, got {len(train)} and {len(val)}; use more images")
    return torch.tensor(train), torch.tensor(val)


# ============================================================================ training and scores


def _train_segmentation(binary: torch.Tensor, masks: torch.Tensor, present: torch.Tensor, train: torch.Tensor, epochs: int,
                        lr: float, batch: int, gen: torch.Generator, progress: bool) -> torch.Tensor:
    """Weights (C, K) of every concept at once; each concept's loss counts only training images that hold it."""
    N, K = binary.shape[:2]
    C = masks.shape[1]
    size = masks.shape[-2:]
    W = ((torch.rand(C, K, generator=gen) * 2 - 1) / math.sqrt(K)).requires_grad_(True)
    frac = torch.stack([masks[train][present[train, c], c].float().mean() for c in range(C)])
    alpha = (1 - frac).view(1, C, 1, 1)
    opt = torch.optim.SGD([W], lr=lr, momentum=0.9)
    rows = train[present[train].any(dim=1)]
    for _ in tqdm(range(epochs), desc="net2vec: training", leave=False, disable=not progress):
        order = rows[torch.randperm(len(rows), generator=gen)]
        for lo in range(0, len(order), batch):
            idx = order[lo:lo + batch]
            with torch.enable_grad():
                logits = torch.einsum("nkhw,ck->nchw", binary[idx], W)
                M = torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
                L = masks[idx].float()
                per_pixel = -(alpha * M * L + (1 - alpha) * (1 - M) * (1 - L))
                weight = present[idx].float()                               # (n, C): only images holding the concept
                loss = ((per_pixel.mean(dim=(2, 3)) * weight).sum(dim=0) / weight.sum(dim=0).clamp_min(1)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach()


def _set_iou_vectors(binary: torch.Tensor, W: torch.Tensor, masks: torch.Tensor, counted: torch.Tensor,
                     val: torch.Tensor) -> torch.Tensor:
    """Set IoU of each concept's learned mask (M > 0.5) on the held-out images that carry its category."""
    inter = torch.zeros(W.shape[0], dtype=torch.float64)
    union = torch.zeros_like(inter)
    for lo in range(0, len(val), 64):
        idx = val[lo:lo + 64]
        logits = torch.einsum("nkhw,ck->nchw", binary[idx], W)
        pred = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False) > 0
        inter, union = _accumulate(pred, masks[idx], counted[idx], inter, union)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def _accumulate(pred: torch.Tensor, truth: torch.Tensor, counted: torch.Tensor, inter: torch.Tensor,
                union: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = counted.view(*counted.shape, 1, 1)
    inter = inter + (pred & truth & c).flatten(2).sum(dim=(0, 2)).double()
    union = union + ((pred | truth) & c).flatten(2).sum(dim=(0, 2)).double()
    return inter, union


def _best_single_unit_iou(unit_masks: torch.Tensor, masks: torch.Tensor, counted: torch.Tensor, train: torch.Tensor,
                          val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per concept: the unit with the best set IoU on the training images, and its set IoU on the held-out ones."""

    def iou(rows: torch.Tensor) -> torch.Tensor:                              # (K, C)
        um = unit_masks[rows].flatten(2).float()                             # (n, K, P)
        cm = masks[rows].flatten(2).float()                                   # (n, C, P)
        cnt = counted[rows].float()                                           # (n, C)
        inter = torch.einsum("nkp,ncp->kc", um, cm)
        area_u = torch.einsum("nk,nc->kc", um.sum(2), cnt)
        area_c = cm.sum(dim=(0, 2))
        union = area_u + area_c - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))

    best = iou(train).argmax(dim=0)
    held = iou(val)
    return best, held[best, torch.arange(held.shape[1])]


def _train_classification(pooled: torch.Tensor, present: torch.Tensor, train: torch.Tensor, epochs: int, lr: float,
                          batch: int, gen: torch.Generator, progress: bool) -> torch.Tensor:
    """Weights (C, K + 1): a linear classifier (last column: bias) per concept on standardised pooled features."""
    N, K = pooled.shape
    C = present.shape[1]
    W = torch.zeros(C, K + 1)
    W[:, :K] = (torch.rand(C, K, generator=gen) * 2 - 1) / math.sqrt(K)
    W.requires_grad_(True)
    opt = torch.optim.SGD([W], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 2), gamma=0.1)
    for _ in tqdm(range(epochs), desc="net2vec: training", leave=False, disable=not progress):
        order = train[torch.randperm(len(train), generator=gen)]
        for lo in range(0, len(order), batch):
            idx = order[lo:lo + batch]
            with torch.enable_grad():
                logits = pooled[idx] @ W[:, :K].T + W[:, K]
                loss = F.binary_cross_entropy_with_logits(logits, present[idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return W.detach()


def _best_single_unit_ap(pooled: torch.Tensor, present: torch.Tensor, train: torch.Tensor,
                         val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    C = present.shape[1]
    best = torch.tensor([max(range(pooled.shape[1]), key=lambda k: average_precision(pooled[train, k], present[train, c]))
                         for c in range(C)])
    return best, torch.tensor([average_precision(pooled[val, best[c]], present[val, c]) for c in range(C)])


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision of ranking by ``scores`` (descending) for the boolean labels ``positive``: the mean of
    the precision at the rank of each positive (0 when there is none)."""
    pos = positive.bool()
    if not pos.any():
        return 0.0
    order = torch.argsort(scores, descending=True, stable=True)
    hits = pos[order].float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())
