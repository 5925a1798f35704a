"""Shape-versus-texture bias (Geirhos et al., ICLR 2019, "ImageNet-trained CNNs are biased towards texture").

A cue-conflict image carries the shape of one of 16 entry-level categories and the texture of another
(made by style transfer). The 1000-way ImageNet classifier is turned into a 16-way one by averaging its
softmax over each category's ImageNet classes (``imagenet16.json``) and taking the largest average. Over
the images whose shape and texture categories differ, the decision is a *shape* hit, a *texture* hit
or neither; the shape bias is ``shape / (shape + texture)``. Images whose two categories agree are left
out. Silhouettes and edge drawings (shape only) give a plain 16-way accuracy (:func:`shape_accuracy`).

- :func:`shape_bias` -> :class:`ShapeBias`; :func:`shape_accuracy` -> :class:`ShapeAccuracy`.
- :func:`load_categories`, :func:`aggregation_matrix`, :func:`category_scores`: the 16-way decision rule.
- :class:`CategoryScores`: the scoring as a reducer of the dataset engine (:mod:`convscope.dataset.engine`).
- :func:`stimuli_state`: one state file for several stimulus sets (what ``convscope bias --state`` uses).
- :func:`find_stimuli`: where the shipped stimuli are (``$CONVSCOPE_DATA``, ``../shared/data``).

The stimuli stream through :func:`convscope.dataset.engine.run` (threaded decode, batched forward passes in
inference mode, the model restored afterwards, on its device) into one :class:`CategoryScores` reducer: per
image the 16 category scores and the top ImageNet class, kept by input position (memory: images x 16).
Stimuli are fed whole, resized to the input size with the model's interpolation
(``Preprocessing(kind="whole")``, the published protocol), or with the model's own preprocessing for
``crop=True``. An unreadable stimulus is skipped and listed (:attr:`StimuliRun.unreadable`), never fatal; a
set whose every stimulus is unreadable raises :class:`~convscope.dataset.folder.UnreadableImagesError`.
A Ctrl-C returns the decisions made so far (``interrupted=True``). With ``state=PATH`` the scores are saved
atomically every ``save_every`` batches, on Ctrl-C and at the end; the same call again continues where it
stopped (a finished set is read back without a forward pass), and a state saved for other stimuli,
categories, preprocessing or weights is refused with :class:`~convscope.dataset.folder.StateMismatchError`
naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConvscopeError
from ..images import list_images
from ..models import Model, as_model, model_fingerprint, same_model
from ..render import figure_to_image
from ..render.picture import Pictured
from .engine import MODEL_PREPROCESSING, Forward, Preprocessing, Reducer, RunInfo, StateStore
from .engine import preprocess as engine_preprocess
from .engine import run as run_engine
from .folder import BATCH_SIZE, SAVE_EVERY, ImageSource, StateMismatchError

#: Shape bias published with mean aggregation (Geirhos et al. 2019 and their model-vs-human benchmark).
PUBLISHED_SHAPE_BIAS: dict[str, float] = {
    "humans": 0.96,
    "ResNet-50 (Stylized-ImageNet)": 0.81,
    "AlexNet": 0.253,
    "ResNet-50": 0.214,
    "VGG-16": 0.092,
}

#: Published 16-way accuracy on shape-only stimuli (Geirhos et al. 2019): ResNet-50 and humans.
PUBLISHED_SHAPE_ACCURACY: dict[str, dict[str, float]] = {
    "edges": {"ResNet-50": 0.18, "humans": 0.87},
    "silhouettes": {"ResNet-50": 0.54, "humans": 0.75},
}

#: The ImageNet-1k class count the category mapping refers to (standard class order).
IMAGENET_CLASSES = 1000

CUE_CONFLICT = "cue-conflict-sample"
#: The stage of the cue-conflict set in a state file (shape-only sets are ``shape-only:KIND``).
CUE_CONFLICT_STAGE = "cue-conflict"
STIMULI_URL = "https://github.com/rgeirhos/texture-vs-shape (folder stimuli/, CC BY 4.0)"

_CONFLICT_NAME = re.compile(r"^(?P<shape>.+?)\d+-(?P<texture>.+?)\d+$")
_LEADING_NAME = re.compile(r"^(?P<name>.+?)\d*$")


class StimuliError(ConvscopeError, ValueError):
    """Stimuli, a category mapping or a model that the shape-bias experiments cannot use."""


# ============================================================================ where the data is


def data_roots() -> list[Path]:
    """Folders searched for the shipped stimuli, in order: ``$CONVSCOPE_DATA``, ``../shared/data`` from the
    current folder, ``shared/data`` under it, and ``../shared/data`` next to the source checkout."""
    roots = []
    if os.environ.get("CONVSCOPE_DATA"):
        roots.append(Path(os.environ["CONVSCOPE_DATA"]))
    cwd = Path.cwd()
    roots += [cwd.parent / "shared" / "data", cwd / "shared" / "data"]
    here = Path(__file__).resolve()
    if len(here.parents) > 4:  # src/convscope/dataset/bias.py -> the repository's parent folder
        roots.append(here.parents[4] / "shared" / "data")
    return roots


def find_stimuli(name: str = CUE_CONFLICT) -> Path | None:
    """The shipped stimulus folder ``name`` (``cue-conflict-sample``, ``silhouettes``, ``edges``), or None."""
    for root in data_roots():
        if (root / name).is_dir():
            return root / name
    return None


def _default_root() -> Path:
    found = find_stimuli(CUE_CONFLICT)
    if found is None:
        searched = ", ".join(str(r) for r in data_roots())
        raise StimuliError(
            f"no cue-conflict images found (looked for {CUE_CONFLICT}/ in {searched}); pass the folder "
            f"(root=... or --data DIR), laid out as SHAPE/SHAPEi-TEXTUREj.png, or set CONVSCOPE_DATA. "
            f"The stimuli: {STIMULI_URL}"
        )
    return found


# ============================================================================ the 16-way decision


def load_categories(source: str | os.PathLike | Mapping[str, Sequence[int]] | None = None, *, near: Path | None = None,
                    num_classes: int = IMAGENET_CLASSES) -> dict[str, list[int]]:
    """The 16 categories and their ImageNet class indices, validated.

    ``source``: a JSON file ``{"airplane": [404], ...}``, a mapping, or None: ``imagenet16.json`` in
    ``near`` or its parent folder when there is one, else the copy shipped with convscope.
    """
    if source is None:
        for folder in ([near, near.parent] if near is not None else []):
            if (folder / "imagenet16.json").is_file():
                source = folder / "imagenet16.json"
                break
    if source is None:
        text = resources.files("convscope.dataset").joinpath("imagenet16.json").read_text(encoding="utf-8")
        raw: Any = json.loads(text)
        where = "the shipped imagenet16.json"
    elif isinstance(source, Mapping):
        raw, where = source, "the category mapping"
    else:
        where = str(source)
        try:
            raw = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise StimuliError(f"{source}: cannot read the category mapping ({exc.strerror or exc})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StimuliError(f"{source}: not a JSON category mapping ({exc})") from None
    if not isinstance(raw, Mapping) or len(raw) < 2:
        raise StimuliError(f"{where}: expected a JSON object of at least two categories -> lists of ImageNet indices")
    categories: dict[str, list[int]] = {}
    for name, indices in raw.items():
        if not isinstance(indices, (list, tuple)) or not indices:
            raise StimuliError(f"{where}: category {name!r} needs a non-empty list of class indices")
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_classes]
        if bad:
            raise StimuliError(f"{where}: category {name!r} has indices outside 0..{num_classes - 1}: {bad[:5]}")
        categories[str(name)] = sorted(set(indices))
    return categories


def aggregation_matrix(categories: Mapping[str, Sequence[int]], num_classes: int = IMAGENET_CLASSES) -> torch.Tensor:
    """(K, num_classes) matrix whose row k averages the probabilities of category k's classes (1/|k| on them)."""
    m = torch.zeros(len(categories), num_classes)
    for k, indices in enumerate(categories.values()):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        m[k, idx] = 1.0 / len(idx)
    return m


def category_scores(logits: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """(N, K) mean softmax probability of each category's classes; argmax over K is the 16-way decision."""
    probs = logits.float().softmax(dim=1)
    return probs @ matrix.to(probs.device, probs.dtype).T


# ============================================================================ results


@dataclass
class Decision:
    """One image: its shape and texture categories (equal for shape-only stimuli), the 16-way decision and
    the top ImageNet class (index and label)."""

    file: str
    shape: str
    texture: str
    decision: str
    top_class: int
    top_label: str

    @property
    def conflict(self) -> bool:
        """Whether shape and texture categories differ (only these count for the shape bias)."""
        return self.shape != self.texture

    @property
    def outcome(self) -> str:
        """``"shape"``, ``"texture"``, ``"neither"``, or ``"no conflict"`` for same-category images."""
        if not self.conflict:
            return "no conflict"
        return "shape" if self.decision == self.shape else "texture" if self.decision == self.texture else "neither"


@dataclass
class CategoryCounts:
    """Per shape category: conflict images ``n``, decisions for their ``shape`` and for their ``texture``."""

    category: str
    shape: int = 0
    texture: int = 0
    n: int = 0

    @property
    def shape_bias(self) -> float:
        """shape / (shape + texture) within the category; NaN when it has neither kind of decision."""
        return self.shape / (self.shape + self.texture) if self.shape + self.texture else math.nan


@dataclass(eq=False, kw_only=True)
class StimuliRun(Pictured):
    """What both experiments record besides their counts: the 16-way ``categories``, ``scores`` (N, K) mean
    softmax per category for the images decided (columns in ``categories`` order), the stimulus folder
    ``root``, the ``model_name``, ``total`` stimuli, ``skipped`` files that are no stimulus (their names do
    not give two categories), ``unreadable`` stimuli (file, reason) that could not be read and were left
    out, ``processed`` stimuli done (unreadable ones included; ``total`` when the run is complete), and
    whether Ctrl-C ``interrupted`` the run (the same call with the same ``state`` continues it).
    ``protocol``: how stimuli reached the model (:func:`stimulus_inputs`). ``seconds``: time of this call."""

    categories: dict[str, list[int]]
    scores: torch.Tensor
    root: str
    model_name: str = "model"
    protocol: str = ""
    total: int = 0
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    processed: int = 0
    seconds: float = 0.0
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        """Whether every stimulus was processed (decided or found unreadable)."""
        return self.processed >= self.total and not self.interrupted


@dataclass(eq=False)
class ShapeBias(StimuliRun):
    """Shape-vs-texture bias of a model on cue-conflict images (Geirhos et al. 2019).

    ``shape_bias`` = ``shape`` / (``shape`` + ``texture``) over the ``conflicts`` images whose shape and
    texture categories differ (NaN when there is neither kind of decision). ``excluded``: images with the
    same category for both, left out. ``decisions``: every image, in file order; ``scores``: (N, K) mean
    softmax per category for the same images (columns in ``categories`` order); ``per_category``: counts
    per shape category; ``confusion``: (K, K) counts of conflict images, row = shape category, column =
    decided category. ``interrupted``: Ctrl-C stopped the run after ``len(decisions)`` of ``total`` images.
    """

    shape_bias: float
    shape: int
    texture: int
    neither: int
    conflicts: int
    excluded: int
    decisions: list[Decision]
    per_category: list[CategoryCounts]
    confusion: torch.Tensor

    @property
    def shape_fraction(self) -> float:
        """Share of conflict images decided for their shape category."""
        return self.shape / self.conflicts if self.conflicts else math.nan

    @property
    def texture_fraction(self) -> float:
        """Share of conflict images decided for their texture category."""
        return self.texture / self.conflicts if self.conflicts else math.nan

    @property
    def neither_fraction(self) -> float:
        """Share of conflict images decided for a third category."""
        return self.neither / self.conflicts if self.conflicts else math.nan

    def figure(self, accuracies: Sequence[ShapeAccuracy] = (), *, title: str | None = None) -> Any:
        """The classic per-category plot: share of shape decisions per shape category, with the model's
        overall shape bias and the published human mean; a panel of shape-only accuracies when given."""
        return bias_figure(self, accuracies, title=title)

    def to_image(self, accuracies: Sequence[ShapeAccuracy] = (), *, dpi: int = 100) -> Image.Image:
        """:meth:`figure` rendered to a PIL image."""
        return figure_to_image(self.figure(accuracies), dpi=dpi)

    def to_dict(self, *, images: bool = True) -> dict[str, Any]:
        """Plain JSON-ready data (NaN becomes None)."""
        out: dict[str, Any] = {
            "model": self.model_name,
            "root": self.root,
            "shape_bias": _num(self.shape_bias),
            "shape_fraction": _num(self.shape_fraction),
            "texture_fraction": _num(self.texture_fraction),
            "neither_fraction": _num(self.neither_fraction),
            "shape": self.shape,
            "texture": self.texture,
            "neither": self.neither,
            "conflicts": self.conflicts,
            "excluded": self.excluded,
            "images": len(self.decisions),
            "total": self.total,
            "processed": self.processed,
            "interrupted": self.interrupted,
            "protocol": self.protocol,
            "skipped": list(self.skipped),
            "unreadable": _unreadable_dicts(self.unreadable),
            "per_category": [
                {"category": c.category, "shape": c.shape, "texture": c.texture, "n": c.n, "shape_bias": _num(c.shape_bias)}
                for c in self.per_category
            ],
            "published": dict(PUBLISHED_SHAPE_BIAS),
        }
        if images:
            out["decisions"] = [_decision_dict(d) | {"outcome": d.outcome} for d in self.decisions]
        return out

    def __str__(self) -> str:
        return (f"{self.model_name}: shape bias {self.shape_bias:.3f} over {self.conflicts} cue-conflict images "
                f"(shape {self.shape}, texture {self.texture}, neither {self.neither}; {self.excluded} same-category left out; "
                f"{self.protocol})"
                + (f"; {len(self.unreadable)} unreadable left out" if self.unreadable else "")
                + (f"; interrupted after {self.processed} of {self.total}" if self.interrupted else ""))


@dataclass(eq=False)
class ShapeAccuracy(StimuliRun):
    """16-way accuracy on shape-only stimuli (silhouettes, edge drawings): ``correct`` of ``n`` images.

    ``per_category``: category -> (correct, n); ``decisions`` and ``scores`` (N, K) as in :class:`ShapeBias`.
    """

    kind: str
    accuracy: float
    correct: int
    n: int
    per_category: dict[str, tuple[int, int]]
    decisions: list[Decision]

    def figure(self, *, title: str | None = None) -> Any:
        """Bars: accuracy per category, with the overall accuracy and the published references."""
        return accuracy_figure(self, title=title)

    def to_image(self, *, dpi: int = 100) -> Image.Image:
        return figure_to_image(self.figure(), dpi=dpi)

    def to_dict(self, *, images: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "model": self.model_name, "root": self.root, "accuracy": _num(self.accuracy),
            "correct": self.correct, "n": self.n, "total": self.total, "processed": self.processed,
            "interrupted": self.interrupted, "protocol": self.protocol,
            "skipped": list(self.skipped), "unreadable": _unreadable_dicts(self.unreadable),
            "per_category": {c: {"correct": k, "n": n} for c, (k, n) in self.per_category.items()},
            "published": dict(PUBLISHED_SHAPE_ACCURACY.get(self.kind, {})),
        }
        if images:
            out["decisions"] = [_decision_dict(d) | {"correct": d.decision == d.shape} for d in self.decisions]
        return out

    def __str__(self) -> str:
        return f"{self.model_name}: {self.kind} accuracy {self.accuracy:.3f} ({self.correct}/{self.n}, 16-way)"


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _unreadable_dicts(unreadable: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"file": f, "reason": r} for f, r in unreadable]


def _decision_dict(d: Decision) -> dict[str, Any]:
    return {"file": d.file, "shape": d.shape, "texture": d.texture, "decision": d.decision,
            "top_class": d.top_class, "top_label": d.top_label}


# ============================================================================ running


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise StimuliError(f"{path}: no such folder (stimuli: {STIMULI_URL})")
    if not path.is_dir():
        raise StimuliError(f"{path}: not a folder; pass the folder that holds CATEGORY/ subfolders of images")
    return path


def _check_model(model: Any) -> Model:
    """The model as a :class:`~convscope.Model` (:func:`~convscope.as_model`), refused before any image is read
    unless it has the 1000 ImageNet classes."""
    model = as_model(model)
    if model.num_classes != IMAGENET_CLASSES:
        raise StimuliError(_classes_message(model.num_classes))
    return model


def _classes_message(n: int) -> str:
    return (f"the shape-vs-texture experiments need a classifier over the {IMAGENET_CLASSES} ImageNet-1k classes "
            f"(standard order); this model has {n} classes")


def protocol_text(model: Model, crop: bool) -> str:
    """One line saying how stimuli reach ``model`` (see :func:`stimulus_inputs`)."""
    h, w = model.input_size
    if crop:
        short = model.resize_size or min(h, w)
        return f"model preprocessing: shorter side to {short}, centre crop {h}x{w} (--crop)"
    return f"whole stimulus resized to {h}x{w}, no crop (Geirhos et al. / model-vs-human protocol)"


def stimulus_inputs(model: Model, files: Sequence[Any], *, crop: bool = False) -> torch.Tensor:
    """Stimuli (paths or images) as the model's input batch (N, 3, H, W).

    ``crop=False`` (default): the published protocol for stimulus sets (Geirhos et al. 2019; the
    model-vs-human toolbox): the whole 224 px stimulus resized to the model's input size with its
    interpolation, no centre crop, then the model's normalisation. ``crop=True``: the model's own
    preprocessing (:meth:`~convscope.Model.preprocess`: shorter side to ``resize_size``, centre crop),
    which zooms the stimulus and cuts off its border."""
    pictures = [str(f) if isinstance(f, Path) else f for f in files]
    return engine_preprocess(model, pictures, MODEL_PREPROCESSING if crop else Preprocessing(kind="whole"))


# ============================================================================ the reducer


@dataclass
class Scored:
    """What :class:`CategoryScores` gives back, for the M images scored, in input order: ``scores`` (M, K) the
    category scores, ``top`` (M,) the top ImageNet class, ``index`` (M,) each image's position in the inputs."""

    scores: torch.Tensor
    top: torch.Tensor
    index: torch.Tensor


class CategoryScores(Reducer):
    """Per image, the 16-way category scores (:func:`category_scores` of the logits) and the top ImageNet
    class, stored by input position: the scoring of both experiments as a reducer of
    :func:`convscope.dataset.engine.run`.

    State: ``scores`` (M, K), ``top`` (M,), ``index`` (M,) of the M images seen (the only state that grows with
    the images: M x (K + 2) numbers). :meth:`merge_states` concatenates (``a``'s images precede ``b``'s), so
    any split of the inputs gives the same result. A model whose output is not 1000 class scores raises
    :class:`StimuliError` at the first batch."""

    needs_output = True

    def __init__(self, categories: Mapping[str, Sequence[int]], *, name: str = "category-scores"):
        super().__init__()
        self.categories = {str(k): [int(i) for i in v] for k, v in categories.items()}
        self.matrix = aggregation_matrix(self.categories)
        self.name = name

    def options(self) -> dict[str, Any]:
        return {"categories": self.categories}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        logits = batch.output
        if logits is None or logits.ndim != 2 or logits.shape[1] != IMAGENET_CLASSES:
            n = 0 if logits is None or not logits.ndim else int(logits.shape[-1])
            raise StimuliError(_classes_message(n))
        part = {"scores": category_scores(logits, self.matrix).cpu(), "top": logits.argmax(dim=1).cpu(),
                "index": batch.index.cpu()}
        return self.merge_states(state, part)

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or b is None:
            return b if a is None else a
        return {k: torch.cat([a[k].cpu(), b[k].cpu()]) for k in ("scores", "top", "index")}

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> Scored:
        if state is None:  # nothing scored yet (interrupted at once)
            return Scored(torch.zeros(0, len(self.categories)), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, dtype=torch.long))
        return Scored(state["scores"].cpu(), state["top"].cpu(), state["index"].cpu())


# ============================================================================ stimulus sets and their state


class _Stimuli(ImageSource):
    """The stimulus files of one set, in order, named by their paths relative to the set's folder."""

    def __init__(self, root: Path, files: Sequence[Path]):
        super().__init__([str(f) for f in files])
        self.root = root
        self.names = [f.relative_to(root).as_posix() for f in files]


@dataclass
class _Set:
    """One stimulus set: its stage name in a state file, folder, categories, stimuli and their categories."""

    stage: str
    path: Path
    cats: dict[str, list[int]]
    source: _Stimuli
    pairs: list[tuple[str, str]]
    skipped: list[str]

    def entry(self) -> dict[str, Any]:
        """The set's part of a state's fingerprint (the list of stimuli and the categories)."""
        return {"count": len(self.source), "sha256": self.source.fingerprint(), "categories": self.cats}


def _preprocessing(crop: bool) -> Preprocessing:
    """The model's preprocessing (``crop=True``) or the whole stimulus resized with the model's interpolation."""
    return MODEL_PREPROCESSING if crop else Preprocessing(kind="whole")


def _fingerprint(what: str, model: Model, sets: Sequence[_Set], crop: bool) -> dict[str, Any]:
    """The identity of a run over ``sets`` (see :class:`~convscope.dataset.engine.StateStore`)."""
    digest = hashlib.sha256()
    for s in sets:
        digest.update(f"{s.stage}\0{s.source.fingerprint()}\0".encode())
    return {"what": what, "model": model_fingerprint(model.module),
            "inputs": {"count": sum(len(s.source) for s in sets), "sha256": digest.hexdigest(), "root": None},
            "preprocessing": _preprocessing(crop).to_json(),
            "input": {"size": list(model.input_size), "resize_size": model.resize_size,
                      "interpolation": model.interpolation, "mean": list(model.mean), "std": list(model.std)},
            "sets": {s.stage: s.entry() for s in sets}}


def _store(path: str | os.PathLike, what: str, model: Model, sets: Sequence[_Set], crop: bool) -> StateStore:
    names = [f"{s.stage}/{n}" for s in sets for n in s.source.names]
    return StateStore(path, what, _fingerprint(what, model, sets, crop), names)


def _check_store(store: StateStore, model: Model, s: _Set, crop: bool) -> None:
    """Refuse a shared state (:func:`stimuli_state`) made for another model, protocol or stimulus set."""
    now = _fingerprint(store.what, model, [s], crop)
    saved = store.fingerprint
    why = None
    if saved.get("sets", {}).get(s.stage) is None:
        why = f"it holds the sets {', '.join(saved.get('sets', {})) or 'none'}, not {s.stage!r}"
    elif saved["sets"][s.stage] != now["sets"][s.stage]:
        why = f"its set {s.stage!r} holds other stimuli or categories than {s.path}"
    elif not same_model(saved.get("model", {}), now["model"]):
        why = f"it was made for a different model ({saved.get('model')} vs {now['model']})"
    elif saved.get("preprocessing") != now["preprocessing"] or saved.get("input") != now["input"]:
        why = (f"it was made for the preprocessing {saved.get('preprocessing')} {saved.get('input')}, this run asks for "
               f"{now['preprocessing']} {now['input']}")
    if why is not None:
        raise StateMismatchError(f"{store.path}: this state does not fit: {why}; make it with stimuli_state for these "
                                 "stimuli and this model")


def _conflict_set(root: str | os.PathLike | None, categories: Any) -> _Set:
    path = _check_root(root) if root is not None else _default_root()
    cats = load_categories(categories, near=path)
    files, pairs, skipped = _sorted_stimuli(path, cats, _conflict_pair,
                                            "no cue-conflict images; expected files named SHAPEi-TEXTUREj.png (e.g. cat3-elephant1.png) "
                                            "with SHAPE and TEXTURE")
    return _Set(CUE_CONFLICT_STAGE, path, cats, _Stimuli(path, files), pairs, skipped)


def _shape_only_set(root: str | os.PathLike, kind: str | None, categories: Any) -> tuple[_Set, str]:
    path = _check_root(root)
    cats = load_categories(categories, near=path)

    def category_of(f: Path) -> tuple[str, str] | None:
        name = f.parent.name if f.parent != path else None
        if name not in cats:
            m = _LEADING_NAME.match(f.stem)
            name = m["name"] if m else None
        return None if name is None else (name, name)

    files, pairs, skipped = _sorted_stimuli(path, cats, category_of, "no shape-only images; expected CATEGORY/*.png with CATEGORY")
    kind = kind or path.name
    return _Set(f"shape-only:{kind}", path, cats, _Stimuli(path, files), pairs, skipped), kind


def stimuli_state(
    path: str | os.PathLike,
    model: Any,
    *,
    data: str | os.PathLike | None = None,
    shape_only: Sequence[tuple[str, str | os.PathLike]] = (),
    categories: str | os.PathLike | Mapping[str, Sequence[int]] | None = None,
    crop: bool = False,
) -> StateStore:
    """One state file for :func:`shape_bias` on ``data`` followed by :func:`shape_accuracy` on each
    ``(kind, folder)`` of ``shape_only``; pass it as ``state=`` to each of those calls (the same ``categories``
    and ``crop``): every set is one stage of the file (``cue-conflict``, ``shape-only:KIND``), finished sets
    are read back without a forward pass, and the set that was interrupted continues. What ``convscope bias
    --state FILE`` uses. Refused (:class:`~convscope.dataset.folder.StateMismatchError`, naming what differs)
    when ``path`` holds a state of other stimuli, sets, categories, preprocessing or weights."""
    model = _check_model(model)
    sets = [_conflict_set(data, categories)] + [_shape_only_set(folder, kind, categories)[0] for kind, folder in shape_only]
    return _store(path, "shape bias", model, sets, crop)


# ============================================================================ running


def _sorted_stimuli(path: Path, cats: Mapping[str, Sequence[int]], categories_of: Any, what: str
                    ) -> tuple[list[Path], list[tuple[str, str]], list[str]]:
    """The image files under ``path`` whose (shape, texture) categories ``categories_of(file)`` names (both among
    ``cats``; ``None``: not a stimulus), those pairs, and the other files (relative paths). ``what``: the
    expected layout, for the error when no file fits (the category names are added)."""
    files, pairs, skipped = [], [], []
    for f in list_images(path):
        pair = categories_of(f)
        if pair is not None and pair[0] in cats and pair[1] in cats:
            files.append(f)
            pairs.append(pair)
        else:
            skipped.append(f.relative_to(path).as_posix())
    if not files:
        raise StimuliError(f"{path}: {what} among {', '.join(cats)}" + (f" ({len(skipped)} other files ignored, e.g. {skipped[0]})" if skipped else ""))
    return files, pairs, skipped


def _decide(model: Model, s: _Set, *, what: str, crop: bool, state: str | os.PathLike | StateStore | None,
            batch_size: int, save_every: int, progress: Any, desc: str, engine_options: dict[str, Any]
            ) -> tuple[list[Decision], dict[str, Any]]:
    """The 16-way decision of every readable stimulus (in order; fewer after Ctrl-C) and the fields both result
    types share (``categories``, ``scores`` (M, K), ``root``, ``model_name``, ``total``, ``skipped``,
    ``unreadable``, ``processed``, ``interrupted``, ``protocol``, ``seconds``)."""
    BATCH_SIZE.check("batch_size", batch_size)
    SAVE_EVERY.check("save_every", save_every)
    if isinstance(state, StateStore):
        _check_store(state, model, s, crop)
    elif state is not None:
        state = _store(state, what, model, [s], crop)
    ran = run_engine(model, s.source, [CategoryScores(s.cats)], what=what, batch_size=batch_size,
                     preprocessing=_preprocessing(crop), state=state, stage=s.stage, save_every=save_every,
                     progress=progress, desc=desc, **engine_options)
    scored, info = ran.results[0], ran.info
    names = list(s.cats)
    chosen = scored.scores.argmax(dim=1).tolist() if len(scored.scores) else []
    decisions = [
        Decision(file=s.source.names[i], shape=s.pairs[i][0], texture=s.pairs[i][1], decision=names[c],
                 top_class=int(top), top_label=model.label(int(top)))
        for i, c, top in zip(scored.index.tolist(), chosen, scored.top.tolist())
    ]
    return decisions, {"categories": s.cats, "scores": scored.scores, "root": str(s.path), "model_name": model.name,
                       "total": len(s.source), "skipped": s.skipped, "interrupted": info.interrupted,
                       "unreadable": [(s.source.names[i], reason) for i, reason in info.skipped],
                       "processed": info.processed, "seconds": info.seconds, "protocol": protocol_text(model, crop)}


def _conflict_pair(f: Path) -> tuple[str, str] | None:
    m = _CONFLICT_NAME.match(f.stem)
    return (m["shape"], m["texture"]) if m else None


def shape_bias(
    model: Any,
    root: str | os.PathLike | None = None,
    *,
    categories: str | os.PathLike | Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 32,
    progress: bool | None | Callable[[int, int | None], None] = None,
    crop: bool = False,
    state: str | os.PathLike | StateStore | None = None,
    save_every: int = 20,
    workers: int | None = None,
    amp: str | None = None,
    engine: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
) -> ShapeBias:
    """Shape-vs-texture bias of an ImageNet classifier on cue-conflict images (Geirhos et al., ICLR 2019).

    ``model``: a :class:`~convscope.Model` whose output is the 1000 ImageNet-1k classes (its own
    ``preprocess`` is used). ``root``: a folder of ``SHAPE/SHAPEi-TEXTUREj.png`` images (any depth; the
    name alone gives both categories), e.g. the 80-image sample shipped in ``../shared/data`` (the
    default) or the full 1280-image set. ``categories``: the 16-class mapping (JSON file or dict; default
    ``imagenet16.json`` next to the data, else the shipped copy). Each image is decided by the mean
    softmax over each category's ImageNet classes, argmax over the categories. Cost: one forward pass
    per image, ``batch_size`` at a time. ``progress``: tqdm bar (None: only on a terminal) or a callable
    ``(processed, total)`` called after every batch.
    ``crop``: ``False`` (default) feeds each whole stimulus resized to the input size, as Geirhos et al. and
    model-vs-human do; ``True`` uses the model's ImageNet preprocessing (resize, centre crop), which zooms
    the stimuli and cuts off their border. The result's ``protocol`` says which (:func:`stimulus_inputs`).

    ``state``: a file (or a :func:`stimuli_state` shared with :func:`shape_accuracy` runs) saved atomically
    every ``save_every`` batches, on Ctrl-C, on errors and at the end; the same call again continues where
    it stopped, and returns a finished run from the file without a forward pass. A state of other stimuli,
    categories, ``crop`` or weights raises :class:`~convscope.dataset.folder.StateMismatchError` naming what
    differs. ``workers``, ``amp``, ``engine``, ``address``, ``num_gpus``: see
    :func:`convscope.dataset.engine.run` (decode threads, autocast, Ray). Unreadable stimuli are skipped and
    listed in :attr:`ShapeBias.unreadable`; if none can be read,
    :class:`~convscope.dataset.folder.UnreadableImagesError`.
    """
    model = _check_model(model)
    BATCH_SIZE.check("batch_size", batch_size)
    s = _conflict_set(root, categories)
    decisions, common = _decide(model, s, what="shape bias", crop=crop, state=state, batch_size=batch_size,
                                save_every=save_every, progress=progress, desc="shape bias",
                                engine_options=dict(workers=workers, amp=amp, engine=engine, address=address,
                                                    num_gpus=num_gpus))
    names = list(s.cats)
    per = {name: CategoryCounts(name) for name in names}
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    where = {name: i for i, name in enumerate(names)}
    for d in decisions:
        if not d.conflict:
            continue
        row = per[d.shape]
        row.n += 1
        row.shape += d.outcome == "shape"
        row.texture += d.outcome == "texture"
        confusion[where[d.shape], where[d.decision]] += 1
    shape = sum(c.shape for c in per.values())
    texture = sum(c.texture for c in per.values())
    conflicts = sum(c.n for c in per.values())
    return ShapeBias(
        shape_bias=shape / (shape + texture) if shape + texture else math.nan,
        shape=shape,
        texture=texture,
        neither=conflicts - shape - texture,
        conflicts=conflicts,
        excluded=len(decisions) - conflicts,
        decisions=decisions,
        per_category=list(per.values()),
        confusion=confusion,
        **common,
    )


def shape_accuracy(
    model: Any,
    root: str | os.PathLike,
    *,
    kind: str | None = None,
    categories: str | os.PathLike | Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 32,
    progress: bool | None | Callable[[int, int | None], None] = None,
    crop: bool = False,
    state: str | os.PathLike | StateStore | None = None,
    save_every: int = 20,
    workers: int | None = None,
    amp: str | None = None,
    engine: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
) -> ShapeAccuracy:
    """16-way accuracy on shape-only stimuli laid out as ``CATEGORY/*.png`` (silhouettes, edge drawings).

    Same decision rule as :func:`shape_bias`. The category of an image is its folder's name (or, for
    files outside category folders, the name before its number: ``cat3.png``). ``kind``: a name for the
    set (default: the folder's name; ``silhouettes`` and ``edges`` have published references in
    :data:`PUBLISHED_SHAPE_ACCURACY`). ``crop``: as in :func:`shape_bias` (default: whole stimulus, no crop).
    ``state``, ``save_every``, the engine options and unreadable stimuli: as in :func:`shape_bias` (a shared
    :func:`stimuli_state` keeps this set as its stage ``shape-only:KIND``).
    """
    model = _check_model(model)
    BATCH_SIZE.check("batch_size", batch_size)
    s, kind = _shape_only_set(root, kind, categories)
    decisions, common = _decide(model, s, what="shape accuracy", crop=crop, state=state, batch_size=batch_size,
                                save_every=save_every, progress=progress, desc=kind,
                                engine_options=dict(workers=workers, amp=amp, engine=engine, address=address,
                                                    num_gpus=num_gpus))
    names = list(s.cats)
    per: dict[str, tuple[int, int]] = {}
    for d in decisions:
        k, n = per.get(d.shape, (0, 0))
        per[d.shape] = (k + (d.decision == d.shape), n + 1)
    correct = sum(k for k, _ in per.values())
    return ShapeAccuracy(
        kind=kind,
        accuracy=correct / len(decisions) if decisions else math.nan,
        correct=correct,
        n=len(decisions),
        per_category={c: per[c] for c in names if c in per},
        decisions=decisions,
        **common,
    )


# ============================================================================ figures


def bias_figure(result: ShapeBias, accuracies: Sequence[ShapeAccuracy] = (), *, title: str | None = None) -> Any:
    """Per shape category, the share of shape decisions among shape + texture decisions (the layout of
    Geirhos et al.'s figure 4, shape on the left), with the model's mean, humans and ResNet-50."""
    from ..render.figures import Figure  # heavy (matplotlib): imported when a figure is drawn

    rows = result.per_category
    wide = bool(accuracies)
    fig = Figure(figsize=(9.5 if wide else 5.6, 0.28 * len(rows) + 1.9), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 2, 1) if wide else fig.add_subplot()
    y = list(range(len(rows)))[::-1]
    values = [c.shape_bias for c in rows]
    shown = [(yy, v) for yy, v in zip(y, values) if not math.isnan(v)]
    ax.axvline(PUBLISHED_SHAPE_BIAS["humans"], color="#c44e52", linestyle="--", linewidth=1.2,
               label=f"humans, mean ({PUBLISHED_SHAPE_BIAS['humans']:.2f})")
    ax.axvline(PUBLISHED_SHAPE_BIAS["ResNet-50"], color="#8c8c8c", linestyle=":", linewidth=1.2,
               label=f"ResNet-50, published ({PUBLISHED_SHAPE_BIAS['ResNet-50']:.3f})")
    if not math.isnan(result.shape_bias):
        ax.axvline(result.shape_bias, color="#4c72b0", linewidth=1.4, label=f"{result.model_name} ({result.shape_bias:.3f})")
    if shown:
        ax.scatter([v for _, v in shown], [yy for yy, _ in shown], color="#4c72b0", s=36, zorder=3, edgecolor="white")
    for yy, c, v in zip(y, rows, values):
        if math.isnan(v):
            ax.text(0.5, yy, "no shape or texture decision" if c.n else "no images", ha="center", va="center",
                    fontsize=7, color="#888888")
    ax.set_yticks(y, [f"{c.category} ({c.shape}/{c.shape + c.texture})" for c in rows], fontsize=8)
    ax.set_xlim(1.02, -0.02)  # shape on the left, texture on the right, as in the paper
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("fraction of 'shape' decisions")
    top = ax.secondary_xaxis("top", functions=(lambda v: 1 - v, lambda v: 1 - v))
    top.set_xlabel("fraction of 'texture' decisions")
    ax.grid(axis="x", color="#eeeeee")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=7, frameon=False, ncol=1)
    if wide:
        _accuracy_panel(fig.add_subplot(1, 2, 2), accuracies)
    fig.suptitle(title or f"Shape vs texture bias: {result.conflicts} cue-conflict images", fontsize=10)
    return fig


def _accuracy_panel(ax: Any, accuracies: Sequence[ShapeAccuracy]) -> None:
    names = [a.kind for a in accuracies]
    x = np.arange(len(names))
    refs = [("model", [a.accuracy for a in accuracies], "#4c72b0"),
            ("ResNet-50 (published)", [PUBLISHED_SHAPE_ACCURACY.get(a.kind, {}).get("ResNet-50", np.nan) for a in accuracies], "#8c8c8c"),
            ("humans (published)", [PUBLISHED_SHAPE_ACCURACY.get(a.kind, {}).get("humans", np.nan) for a in accuracies], "#c44e52")]
    width = 0.26
    for i, (label, vals, colour) in enumerate(refs):
        bars = ax.bar(x + (i - 1) * width, vals, width, color=colour, label=label)
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.axhline(1 / 16, color="#444444", linewidth=0.8, linestyle=":", label="chance (1/16)")
    ax.set_xticks(x, [f"{a.kind}\n(n={a.n})" for a in accuracies], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("16-way accuracy")
    ax.set_title("shape-only stimuli", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left")


def accuracy_figure(result: ShapeAccuracy, *, title: str | None = None) -> Any:
    """Accuracy per category as bars, with the overall accuracy and the published references."""
    from ..render.figures import Figure  # heavy (matplotlib): imported when a figure is drawn

    names = list(result.per_category)
    acc = [k / n if n else math.nan for k, n in result.per_category.values()]
    fig = Figure(figsize=(7.5, 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(names)), acc, color="#4c72b0")
    ax.axhline(result.accuracy, color="#4c72b0", linewidth=1.2, label=f"{result.model_name} ({result.accuracy:.2f})")
    for who, colour in (("humans", "#c44e52"), ("ResNet-50", "#8c8c8c")):
        ref = PUBLISHED_SHAPE_ACCURACY.get(result.kind, {}).get(who)
        if ref is not None:
            ax.axhline(ref, color=colour, linestyle="--", linewidth=1.0, label=f"{who}, published ({ref:.2f})")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("16-way accuracy")
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    ax.set_title(title or f"{result.kind}: {result.correct}/{result.n} correct", fontsize=10)
    return fig


__all__ = [
    "IMAGENET_CLASSES",
    "PUBLISHED_SHAPE_ACCURACY",
    "PUBLISHED_SHAPE_BIAS",
    "CategoryCounts",
    "CategoryScores",
    "Decision",
    "Scored",
    "ShapeAccuracy",
    "ShapeBias",
    "StimuliError",
    "StimuliRun",
    "aggregation_matrix",
    "category_scores",
    "find_stimuli",
    "load_categories",
    "shape_accuracy",
    "shape_bias",
    "stimuli_state",
]
