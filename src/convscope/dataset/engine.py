"""The dataset engine: one streaming runner, reducers that share its forward passes, one saved state.

Every dataset analysis (top-k, channel statistics, both passes of Network Dissection, embeddings, shape bias,
per-checkpoint evolution statistics) is a :class:`Reducer`: a small object that turns batches of recorded
activations into a result. :func:`run` streams an image source (a folder, optionally of class sub-folders, a
list of files or PIL images, preprocessed tensors, or a ``torch.utils.data.Dataset``) through the model once,
records the layers every reducer asks for in the same forward pass (stopped right after the last of them
when nobody needs the output) and hands each batch to every reducer.

The runner owns everything else, once:

- **input pipeline**: files are read, decoded, resized and cropped by a pool of worker threads that runs
  ``prefetch`` batches ahead of the forward passes (PIL releases the GIL while it decodes and resamples; see
  ``benchmarks/bench_engine.py`` for the measurement against DataLoader worker processes); the uint8 batch
  goes to the device (pinned memory on CUDA) and is normalised there;
- **atomic updates**: a reducer's :meth:`Reducer.step` is a pure function ``(state, batch) -> new state``
  that never changes the state it was given; the runner commits a batch to every reducer and to the
  progress counters in one assignment, so an interruption anywhere inside an update (Ctrl-C, an error, a
  ``kill -9``) leaves the last committed state whole and the batch is either counted once or not at all;
- **one saved state** per run: ``torch.save`` of plain tensors plus a JSON description (loaded with
  ``weights_only=True``), written atomically (temporary file, then ``os.replace``), so a ``kill -9`` at any
  moment leaves the previous state or the new one, never a broken file; one fingerprint (model weights,
  inputs, layers, reducers and their options, preprocessing) and one refusal, naming what differs, when a
  state is resumed by another run; several stages (the two passes of dissection) live in one file;
- **one policy**: Ctrl-C keeps every committed batch and returns (``interrupted=True``); an error saves what
  is committed and re-raises; unreadable images are skipped, counted and listed, never fatal (a run whose
  every image is unreadable raises :class:`~convscope.dataset.folder.UnreadableImagesError`);
- **engines**: ``engine="local"`` (this process, CPU or CUDA, optional autocast ``amp="bf16"|"fp16"`` for
  forward-only reducers) or ``engine="ray"`` (:mod:`convscope.dataset.ray_engine`: Ray Data shards the
  inputs over an actor pool and the runner merges the partial states with :meth:`Reducer.merge_states`, in
  input order, so results equal the local engine's).

Results are plain data; pictures are drawn from them by render code, never by re-running the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ImageError, LayerKindError
from ..files import write_text
from ..images import load_image
from ..models import Model, as_model, model_fingerprint, output_logits, same_model
from ..options import Option
from ..probe import Capture, forward_fast, resolve_layer
from ..progress import tqdm
from .folder import (
    BATCH_SIZE,
    SAVE_EVERY,
    Batch,
    DatasetError,
    ImageSource,
    SkippedImagesWarning,
    StateFileError,
    StateMismatchError,
    TensorSource,
    check_any_scored,
    check_state_path,
    open_images,
    save_tensors,
    skipped_summary,
)

#: The one state format of every resumable analysis (version 2: the engine's; version 1 files are refused).
STATE_FORMAT = "convscope-state/2"
#: Decode workers (threads): ``None`` picks min(8, CPU cores); 0 decodes in the calling thread.
WORKERS = Option(int, None, "image decode threads (0: decode in the main thread)", minimum=0, maximum=256)
#: Batches decoded ahead of the forward pass.
PREFETCH = 2
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ENGINES = ("local", "ray")


class EngineError(DatasetError):
    """An engine option that cannot be used (an unknown engine, autocast for a reducer that needs gradients...)."""


# ============================================================================ preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a network input, as data (it is part of a run's fingerprint and travels to Ray actors).

    ``kind="model"``: the model's own :meth:`~convscope.Model.transform_image` (shorter side to ``resize_size``,
    centre crop). ``kind="whole"``: the whole picture resized to the input size, never cropped (dissection's masks
    stay aligned; stimulus sets are shown whole), with ``resample`` (``None``: the model's interpolation).
    Normalisation with the model's mean/std follows either way, on the device.
    """

    kind: str = "model"
    resample: str | None = None

    def __call__(self, model: Model, picture: Image.Image) -> Image.Image:
        if self.kind == "model":
            return model.transform_image(picture)
        h, w = model.input_size
        if picture.size == (w, h):
            return picture
        mode = getattr(Image.Resampling, (self.resample or model.interpolation).upper())
        return picture.resize((w, h), mode)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "resample": self.resample}


MODEL_PREPROCESSING = Preprocessing()


def decode(model: Model, item: Any, preprocessing: Preprocessing) -> np.ndarray:
    """One picture (path, ``sample:NAME``, PIL image, array) read, validated and transformed: uint8 (H, W, 3)."""
    return np.asarray(preprocessing(model, load_image(item)), dtype=np.uint8)


def normalise(model: Model, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) on any device -> the model's normalised float input (N, 3, H, W), on that device.

    The same float32 operations as :meth:`~convscope.Model.preprocess` (x / 255, then (x - mean) / std), so
    the values are bit-identical to it.
    """
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(model.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def preprocess(model: Model, pictures: Sequence[Any], preprocessing: Preprocessing = MODEL_PREPROCESSING) -> torch.Tensor:
    """Pictures (paths, ``sample:NAME``, PIL images, arrays) as the network input the engine makes for them
    (:func:`decode` then :func:`normalise`), on the model's device: the one place outside the pipeline that
    needs the same values (a picture drawn again, a few inputs at once)."""
    pixels = torch.from_numpy(np.stack([decode(model, p, preprocessing) for p in pictures]))
    return normalise(model, pixels.to(model.device))


# ============================================================================ sources


class DatasetSource:
    """A ``torch.utils.data.Dataset`` (map-style) as a source: item ``i`` is a picture (PIL image, array, path)
    or a preprocessed tensor (3, H, W), optionally as the first element of a tuple whose second element is an
    integer class (kept as the image's class)."""

    def __init__(self, dataset: Any):
        try:
            self.total = len(dataset)
        except TypeError:
            raise DatasetError("a torch Dataset source must have a length (map-style); stream an iterable of "
                               "tensors instead") from None
        if self.total == 0:
            raise DatasetError("the dataset is empty")
        self.dataset = dataset
        self.root = None
        self.names: list[str | None] = [None] * self.total
        self.paths = self.names

    def __len__(self) -> int:
        return self.total

    def fingerprint(self) -> str:
        return f"{type(self.dataset).__module__}.{type(self.dataset).__qualname__}:{self.total}"

    def item(self, i: int) -> tuple[Any, int | None]:
        got = self.dataset[i]
        if isinstance(got, (tuple, list)) and len(got) >= 2:
            label = got[1]
            return got[0], (int(label) if isinstance(label, (int, np.integer)) or (
                isinstance(label, torch.Tensor) and label.numel() == 1) else None)
        return got, None


def as_source(images: Any, device: torch.device) -> ImageSource | TensorSource | DatasetSource:
    """The source behind ``images``: :func:`~convscope.dataset.folder.open_images`, plus map-style torch Datasets."""
    if isinstance(images, (ImageSource, TensorSource, DatasetSource)):
        return images
    if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.utils.data.IterableDataset):
        return DatasetSource(images)
    return open_images(images, device)


def class_of(source: Any) -> list[int] | None:
    """Per input, its class when the source has classes (a folder of class sub-folders: the sub-folder's
    position in the sorted list of sub-folders), else ``None``."""
    return getattr(source, "classes", None)


# ============================================================================ the input pipeline


class Loader:
    """Batches of a source, decoded by ``workers`` threads ``PREFETCH`` batches ahead of the consumer.

    Each yielded :class:`~convscope.dataset.folder.Batch` holds the normalised input on ``device`` (uint8
    pixels are moved, pinned on CUDA, then normalised there), the positions of its images, and the
    unreadable ones with their reasons. Closing the iterator (or leaving the ``for``) stops the workers.
    """

    def __init__(self, model: Model, source: Any, batch_size: int, *, preprocessing: Preprocessing = MODEL_PREPROCESSING,
                 workers: int | None = None, start: int = 0, stop: int | None = None, device: torch.device | None = None):
        self.model, self.source, self.batch_size = model, source, batch_size
        self.preprocessing = preprocessing
        self.workers = default_workers() if workers is None else int(workers)
        self.start = start
        self.stop = len(source) if stop is None and not isinstance(source, TensorSource) else stop
        self.device = device or model.device

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.source, TensorSource):
            for batch in self.source.batches(self.batch_size, start=self.start):
                if self.stop is not None and batch.start >= self.stop:
                    return
                yield batch
            return
        ranges = [(lo, min(lo + self.batch_size, self.stop)) for lo in range(self.start, self.stop, self.batch_size)]
        if self.workers == 0:
            for lo, hi in ranges:
                yield self._assemble(lo, hi, [self._decode_safe(i) for i in range(lo, hi)])
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="convscope-decode")
        pending: deque[tuple[int, int, list[Future]]] = deque()
        todo = iter(ranges)
        try:
            for _ in range(PREFETCH + 1):
                self._submit(pool, todo, pending)
            while pending:
                lo, hi, futures = pending.popleft()
                self._submit(pool, todo, pending)
                yield self._assemble(lo, hi, [f.result() for f in futures])
        finally:
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, pool: ThreadPoolExecutor, todo: Iterator[tuple[int, int]], pending: deque) -> None:
        nxt = next(todo, None)
        if nxt is not None:
            lo, hi = nxt
            pending.append((lo, hi, [pool.submit(self._decode_safe, i) for i in range(lo, hi)]))

    def _decode_safe(self, i: int) -> tuple[np.ndarray | None, int | None, str | None]:
        """(pixels, class, None) or (None, None, reason): an unreadable image is a reason, never an exception."""
        label = None
        try:
            if isinstance(self.source, DatasetSource):
                item, label = self.source.item(i)
                if isinstance(item, torch.Tensor):
                    return item, label, None
                return decode(self.model, item, self.preprocessing), label, None
            return decode(self.model, self.source.load(i), self.preprocessing), label, None
        except ImageError as exc:
            return None, None, str(exc)
        except (OSError, ValueError) as exc:  # a Dataset's own reader failing on one item
            return None, None, f"item {i}: {exc}"

    def _assemble(self, lo: int, hi: int, decoded: list[tuple[Any, int | None, str | None]]) -> Batch:
        index, arrays, skipped, labels = [], [], [], []
        for i, (a, label, reason) in zip(range(lo, hi), decoded):
            if reason is not None:
                skipped.append((i, reason))
            else:
                index.append(i)
                arrays.append(a)
                labels.append(-1 if label is None else label)
        x = None
        if arrays:
            if isinstance(arrays[0], torch.Tensor):  # a Dataset of preprocessed tensors
                x = torch.stack(arrays).to(self.device).float()
            else:
                pixels = torch.from_numpy(np.stack(arrays))
                if self.device.type == "cuda":
                    pixels = pixels.pin_memory().to(self.device, non_blocking=True)
                x = normalise(self.model, pixels)
        batch = Batch(x=x, index=torch.tensor(index, dtype=torch.long), start=lo, stop=hi, skipped=skipped)
        classes = getattr(self.source, "classes", None)
        if isinstance(self.source, DatasetSource):
            batch.labels = torch.tensor(labels, dtype=torch.long)
        elif classes is not None:
            batch.labels = torch.tensor([classes[i] for i in index], dtype=torch.long)
        return batch


def default_workers() -> int:
    """Decode threads when none are asked for: min(8, the CPU cores this process may use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


# ============================================================================ reducers


@dataclass
class Forward:
    """What one forward pass recorded for a batch: ``x`` the input, ``index`` the positions of its images in
    the source, ``activations`` per recorded layer, ``inputs`` the inputs of layers asked for with
    :attr:`Reducer.inputs` (e.g. the classifier's: penultimate features), ``output`` the model's logits
    (``None`` when the pass stopped at the last recorded layer), ``labels`` the images' classes (-1: none)."""

    x: torch.Tensor
    index: torch.Tensor
    activations: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor | None
    labels: torch.Tensor | None = None


class Reducer:
    """One analysis over a stream: consumes batches, keeps a state whose size does not grow with the dataset
    (per-image results, as embeddings, are written to disk by the reducer and the state records what is done),
    and merges with another reducer's state.

    Subclasses set :attr:`name` (unique within a run), :attr:`layers` (outputs to record), :attr:`inputs`
    (layers whose input to record), :attr:`needs_output` (the logits), and implement the pure functions
    :meth:`step` and :meth:`merge_states`, plus :meth:`finish`. The object methods the issue names
    (:meth:`update`, :meth:`state_dict`, :meth:`load_state_dict`, :meth:`merge`, :meth:`result`) are built on
    them: the object holds one state, replaced (never changed in place) by each update.

    A state is ``None`` (nothing seen yet) or a dict whose values are tensors or JSON-ready plain data.
    """

    name: str = "reducer"
    layers: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    needs_output: bool = False
    #: autocast is allowed (forward-only reducers; a reducer that takes gradients says False)
    amp_ok: bool = True

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    # ---- to implement
    def options(self) -> dict[str, Any]:
        """Everything that changes the result besides the data and the model: part of the run's fingerprint."""
        return {}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        """The state after ``batch``: a new dict; ``state`` (and every tensor in it) must be left unchanged."""
        raise NotImplementedError

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        """The state of ``a``'s inputs followed by ``b``'s (every input of ``a`` precedes every input of ``b``)."""
        raise NotImplementedError

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> Any:
        """The result (plain data) of a state."""
        return state

    # ---- the object interface
    def update(self, batch: Forward) -> None:
        self.state = self.step(self.state, batch)

    def state_dict(self) -> dict[str, Any]:
        plain, tensors = pack(self.state)
        return {"plain": plain, "tensors": tensors}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = unpack(d.get("plain"), d.get("tensors", {}))

    def merge(self, other: Reducer) -> None:
        self.state = self.merge_states(self.state, other.state)

    def result(self, run: RunInfo | None = None) -> Any:
        return self.finish(self.state, run or RunInfo())


class Remapped(Reducer):
    """``inner`` run over a subset or continuation of its inputs: the subset's input i is input ``positions[i]``
    of the whole (images appended later, candidates read again). Returns the raw state, for the caller to merge
    into the whole's and finish with the whole's :class:`RunInfo`."""

    def __init__(self, inner: Reducer, positions: Sequence[int] | range):
        super().__init__()
        self.inner, self.positions = inner, torch.as_tensor(list(positions), dtype=torch.long)
        self.name, self.layers, self.inputs = inner.name, inner.layers, inner.inputs
        self.needs_output, self.amp_ok = inner.needs_output, inner.amp_ok

    def options(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.positions.numpy().tobytes()).hexdigest()[:16]
        return {**self.inner.options(), "positions": digest}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        mapped = self.positions.to(batch.index.device)[batch.index]
        return self.inner.step(state, dataclasses.replace(batch, index=mapped))

    def merge_states(self, a: Any, b: Any) -> Any:
        return self.inner.merge_states(a, b)

    def finish(self, state: Any, run: RunInfo) -> Any:
        return state


def pack(state: dict[str, Any] | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """A state split into JSON-ready data and tensors (moved to the CPU)."""
    if state is None:
        return None, {}
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return plain, tensors


def unpack(plain: Any, tensors: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, Any] | None:
    if plain is None:
        return None
    out = dict(plain)
    out.update({k: (v.to(device) if device is not None else v) for k, v in tensors.items()})
    return out


@dataclass
class RunInfo:
    """What the runner knows about a run, handed to :meth:`Reducer.finish`: the source's names and paths,
    ``processed`` (inputs done, skipped ones included), ``total`` (``None``: unknown), ``scored`` (images that
    reached the network), ``skipped`` ((position, reason) of unreadable images), ``interrupted``, ``seconds``,
    ``model``, ``input_size`` (the network input's (H, W))."""

    names: list[str | None] | None = None
    paths: list[str | None] | None = None
    processed: int = 0
    total: int | None = None
    scored: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    model: Model | None = None
    input_size: tuple[int, int] | None = None
    root: str | None = None
    classes: list[str] | None = None

    @property
    def complete(self) -> bool:
        return self.total is not None and self.processed >= self.total and not self.interrupted


@dataclass
class Run:
    """The outcome of :func:`run`: one result per reducer (in the order given), and the run's :class:`RunInfo`."""

    results: list[Any]
    info: RunInfo

    def __getitem__(self, i: int) -> Any:
        return self.results[i]


# ============================================================================ saved state


class StateStore:
    """One state file for a run of one or more stages (e.g. dissection's threshold and IoU passes).

    The file is ``torch.save({"meta": JSON, "<stage>/<reducer>/<key>": tensor, ...})``, written atomically
    (so a ``kill -9`` leaves the old or the new file), with a JSON manifest ``PATH.json`` beside it (the
    description and the list of inputs, for people; never read back). ``what`` names the analysis in errors.
    ``check=False`` reads a state without comparing fingerprints (to inspect it).
    """

    def __init__(self, path: str | os.PathLike | None, what: str, fingerprint: dict[str, Any],
                 names: Sequence[str | None] | None = None, *, check: bool = True):
        self.path = check_state_path(path)
        self.what = what
        self.fingerprint = fingerprint
        self.names = names
        self.stages: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        if self.path is not None and self.path.exists():
            self._load(check)

    def _load(self, check: bool = True) -> None:
        assert self.path is not None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # torch raises many kinds for a file that is not its own (pickle, zip, EOF, text)
            payload = None
        meta = None
        if isinstance(payload, dict) and isinstance(payload.get("meta"), str):
            try:
                meta = json.loads(payload["meta"])
            except ValueError:
                meta = None
        if not isinstance(meta, dict):
            raise StateFileError(f"{self.path}: not a convscope {self.what} state file; delete it or choose another state file")
        if meta.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"{self.path}: a state of format {meta.get('format')!r}, not {STATE_FORMAT!r} "
                                     f"(written by another convscope version or analysis); delete it or choose another state file")
        saved = meta.get("fingerprint", {})
        if saved.get("what") != self.fingerprint.get("what"):
            raise StateMismatchError(f"{self.path}: a {saved.get('what')} state, not a {self.what} state; choose another state file")
        if check:
            self._check(saved, meta)
        self.stages = meta.get("stages", {})
        self.tensors = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}

    def _check(self, saved: dict[str, Any], meta: dict[str, Any]) -> None:
        now = self.fingerprint
        if not same_model(saved.get("model", {}), now.get("model", {})):
            self._refuse(f"saved for a different model ({saved.get('model')} vs {now.get('model')})")
        old_inputs, new_inputs = saved.get("inputs") or {}, now.get("inputs") or {}
        if (old_inputs.get("count"), old_inputs.get("sha256")) != (new_inputs.get("count"), new_inputs.get("sha256")):
            self._refuse(f"saved for a different list of inputs ({self._inputs_difference(saved, meta)})")
        rest_old = {k: v for k, v in saved.items() if k not in ("model", "inputs", "what")}
        rest_new = {k: v for k, v in now.items() if k not in ("model", "inputs", "what")}
        where = first_difference(rest_old, rest_new)
        if where is not None:
            path, a, b = where
            self._refuse(f"saved for {path} {_short(a)}, this run asks for {_short(b)}")

    def _refuse(self, why: str) -> None:
        raise StateMismatchError(f"{self.path}: {why}; use another state file or delete this one")

    def _inputs_difference(self, saved: dict[str, Any], meta: dict[str, Any]) -> str:
        old, now = saved.get("inputs") or {}, self.fingerprint.get("inputs") or {}
        text = f"{old.get('count')} inputs then, {now.get('count')} now"
        files = meta.get("files")
        if files is not None and self.names is not None:
            for i, (a, b) in enumerate(zip(files, [n if n is not None else "<memory>" for n in self.names])):
                if a != b:
                    return f"{text}; input {i} was {a!r}, is now {b!r}"
        return text

    # ---- stages
    def stage(self, name: str, reducers: Sequence[Reducer], device: torch.device) -> tuple[dict[str, Any], list[Any]] | None:
        """A saved stage: its progress record and every reducer's state; ``None`` when it was never saved."""
        record = self.stages.get(name)
        if record is None:
            return None
        if record.get("reducers_options") != [[r.name, r.options()] for r in reducers]:
            self._refuse(f"stage {name!r} was saved with other options ({_short(record.get('reducers_options'))})")
        states = []
        for r in reducers:
            prefix = f"{name}/{r.name}/"
            tensors = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
            states.append(unpack(record["states"].get(r.name), tensors, device))
        return record, states

    def save(self, name: str, record: dict[str, Any], reducers: Sequence[Reducer], states: Sequence[Any]) -> None:
        """Write stage ``name`` (its progress ``record`` and reducer ``states``), keeping the other stages."""
        if self.path is None:
            return
        plains, tensors = {}, {k: v for k, v in self.tensors.items() if not k.startswith(f"{name}/")}
        for r, s in zip(reducers, states):
            plain, ts = pack(s)
            plains[r.name] = plain
            tensors.update({f"{name}/{r.name}/{k}": v for k, v in ts.items()})
        stage = {**record, "states": plains, "reducers_options": [[r.name, r.options()] for r in reducers]}
        stages = {**self.stages, name: stage}
        files = None if self.names is None else [n if n is not None else "<memory>" for n in self.names]
        meta = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "stages": stages, "files": files}
        save_tensors({"meta": json.dumps(meta), **tensors}, self.path)
        self.stages, self.tensors = stages, tensors
        manifest = {"format": STATE_FORMAT, "what": self.what, "state_file": self.path.name,
                    "fingerprint": self.fingerprint,
                    "stages": {k: {kk: vv for kk, vv in v.items() if kk != "states"} for k, v in stages.items()},
                    "files": files}
        write_text(json.dumps(manifest, indent=1), Path(str(self.path) + ".json"))


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first place where two JSON-like values differ: (``"reducers topk:conv2 k"``-style path, a's, b's)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            got = first_difference(a.get(key), b.get(key), f"{path} {key}".strip())
            if got is not None:
                return got
        return None
    return None if a == b else (path or "options", a, b)


def _short(value: Any, n: int = 160) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def fingerprint(what: str, model: Model, source: Any, layers: Sequence[str], preprocessing: Preprocessing,
                **options: Any) -> dict[str, Any]:
    """The identity of a run: analysis, model weights, inputs (count and the SHA-256 of their names), layers,
    preprocessing and options. Two runs with equal fingerprints compute the same thing."""
    names = getattr(source, "names", None)
    return {"what": what, "model": model_fingerprint(model.module),
            "inputs": {"count": None if names is None else len(names), "sha256": source.fingerprint(),
                       "root": None if getattr(source, "root", None) is None else str(Path(source.root).resolve())},
            "layers": list(layers), "preprocessing": preprocessing.to_json(), **options}


# ============================================================================ the runner


@dataclass(frozen=True)
class _Committed:
    """Everything a run has done, replaced in one assignment per batch: a torn update can never be saved."""

    processed: int
    scored: int
    skipped: tuple[tuple[int, str], ...]
    states: tuple[Any, ...]


def run(
    model: Any,
    images: Any,
    reducers: Sequence[Reducer],
    *,
    what: str = "run",
    batch_size: int = 32,
    preprocessing: Preprocessing = MODEL_PREPROCESSING,
    state: str | os.PathLike | StateStore | None = None,
    stage: str = "run",
    save_every: int = 20,
    progress: bool | None | Callable[[int, int | None], None] = None,
    desc: str | None = None,
    workers: int | None = None,
    amp: str | None = None,
    engine: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
    actors: int | None = None,
    options: dict[str, Any] | None = None,
    check_scored: bool = True,
) -> Run:
    """Stream ``images`` through ``model`` once and feed every batch to every reducer; one result per reducer.

    ``images``: a folder (recursively, sorted by relative path), a list of paths / ``sample:NAME`` / PIL images,
    preprocessed tensors (N, C, H, W) or an iterable of them, or a map-style ``torch.utils.data.Dataset``.
    ``reducers``: the analyses sharing the pass (names unique). ``preprocessing``: how pictures become inputs
    (:class:`Preprocessing`). ``state``: a state file (or a :class:`StateStore` shared by several stages); the run
    resumes from it and saves to it every ``save_every`` batches, at the end, on Ctrl-C and on errors.
    ``stage``: the name of this pass inside the state (several passes share one file). ``workers``: decode
    threads (``None``: :func:`default_workers`). ``amp``: ``"bf16"`` or ``"fp16"`` autocast of the forward pass
    (CUDA; bf16 also on CPU), for reducers that allow it. ``engine``: ``"local"`` or ``"ray"`` (``address``: the
    cluster, default a local instance; ``num_gpus`` per actor; ``actors``: pool size). ``options``: extra
    fingerprint entries. ``progress``: a tqdm bar (``None``: only on a terminal) or ``fn(done, total)``.
    """
    model = as_model(model)
    reducers = list(reducers)
    if not reducers:
        raise EngineError("no reducers: nothing to compute")
    if len({r.name for r in reducers}) != len(reducers):
        raise EngineError(f"reducer names must be unique, got {[r.name for r in reducers]}")
    BATCH_SIZE.check("batch_size", batch_size)
    SAVE_EVERY.check("save_every", save_every)
    WORKERS.check("workers", workers)
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    amp_dtype = _amp_dtype(amp, model, reducers)
    layers = list(dict.fromkeys(layer for r in reducers for layer in r.layers))
    inputs_of = list(dict.fromkeys(layer for r in reducers for layer in r.inputs))
    for name in layers + inputs_of:
        resolve_layer(model.module, name)
    source = as_source(images, model.device)
    if isinstance(state, StateStore):
        store = state
    else:
        fp = fingerprint(what, model, source, layers + [f"input:{n}" for n in inputs_of], preprocessing,
                         **{"options": {r.name: r.options() for r in reducers}}, **(options or {}))
        store = StateStore(state, what, fp, getattr(source, "names", None))
    total = None if getattr(source, "names", None) is None else len(source.names)
    info = RunInfo(names=getattr(source, "names", None), paths=getattr(source, "paths", None), total=total, model=model,
                   root=None if getattr(source, "root", None) is None else str(source.root),
                   classes=getattr(source, "class_names", None))
    committed = _Committed(0, 0, (), tuple(None for _ in reducers))
    saved = store.stage(stage, reducers, model.device)
    if saved is not None:
        record, states = saved
        committed = _Committed(int(record["processed"]), int(record["scored"]),
                               tuple((int(i), str(r)) for i, r in record.get("skipped", [])), tuple(states))
        info.input_size = tuple(record["input_size"]) if record.get("input_size") else None
        if record.get("complete"):
            info.processed, info.scored, info.skipped = committed.processed, committed.scored, list(committed.skipped)
            info.total = record.get("total", total)
            return Run([r.finish(s, info) for r, s in zip(reducers, committed.states)], info)

    def save(c: _Committed, complete: bool = False) -> None:
        record = {"processed": c.processed, "scored": c.scored, "skipped": [list(s) for s in c.skipped],
                  "complete": complete, "total": info.total,
                  "input_size": None if info.input_size is None else list(info.input_size)}
        store.save(stage, record, reducers, c.states)

    start_time = time.perf_counter()
    report = progress if callable(progress) else None
    bar = tqdm(total=total, initial=committed.processed, desc=desc or what, unit="img", leave=False,
               disable=True if report else (None if progress is None else not progress))
    interrupted = False
    if engine == "ray":
        from .ray_engine import ray_batches  # optional dependency (pip install convscope[ray])

        stream = ray_batches(model, source, reducers, batch_size=batch_size, preprocessing=preprocessing, start=committed.processed,
                             layers=layers, inputs_of=inputs_of, amp=amp, address=address, num_gpus=num_gpus, actors=actors)
    else:
        stream = _local_states(model, source, reducers, batch_size, preprocessing, committed.processed, workers, layers,
                               inputs_of, amp_dtype, info)
    n_batch = 0
    try:
        try:
            for lo, hi, skipped, scored, states, input_size in stream:
                # ``states`` computes the batch's new states from the committed ones without changing them (local:
                # the reducers' steps; Ray: merging the batch's partial states); one assignment commits everything
                if lo != committed.processed:
                    raise EngineError(f"internal: batch at {lo} out of order (expected {committed.processed})")
                if info.input_size is None and input_size is not None:
                    info.input_size = input_size
                committed = _Committed(hi, committed.scored + scored, committed.skipped + tuple(skipped), states(committed.states))
                n_batch += 1
                bar.update(hi - lo)
                if report:
                    report(committed.processed, total)
                if n_batch % save_every == 0:
                    save(committed)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            with contextlib.suppress(Exception):
                stream.close()
    except BaseException:
        if committed.processed:
            save(committed)  # keep what is done even when a batch fails
        raise
    finally:
        bar.close()
    if info.total is None and not interrupted:
        info.total = committed.processed  # an iterable of unknown length: its end is now known
    info.processed, info.scored, info.skipped = committed.processed, committed.scored, list(committed.skipped)
    info.interrupted, info.seconds = interrupted, time.perf_counter() - start_time
    save(committed, complete=not interrupted)
    if committed.skipped:
        warnings.warn(skipped_summary(committed.skipped), SkippedImagesWarning, stacklevel=2)
    if check_scored and not interrupted:
        check_any_scored(committed.scored, committed.skipped)
    return Run([r.finish(s, info) for r, s in zip(reducers, committed.states)], info)


def _amp_dtype(amp: str | None, model: Model, reducers: Sequence[Reducer]) -> torch.dtype | None:
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise EngineError(f"unknown amp {amp!r}; choose {' or '.join(AMP_DTYPES)} (or leave it out for float32)")
    refuse = [r.name for r in reducers if not r.amp_ok]
    if refuse:
        raise EngineError(f"autocast is for forward-only analyses; {', '.join(refuse)} needs float32")
    if amp == "fp16" and model.device.type != "cuda":
        raise EngineError("fp16 autocast needs a CUDA device; use amp='bf16' on the CPU")
    return AMP_DTYPES[amp]


def _local_states(model: Model, source: Any, reducers: Sequence[Reducer], batch_size: int, preprocessing: Preprocessing,
                  start: int, workers: int | None, layers: list[str], inputs_of: list[str], amp_dtype: torch.dtype | None,
                  info: RunInfo) -> Iterator[tuple[int, int, list, int, Callable[[tuple], tuple], tuple[int, int] | None]]:
    """The local engine: per batch (start, stop, skipped, scored, fn(committed states) -> new states, input size).

    The new states are computed before they are committed; computing them never changes the committed ones.
    """
    for batch, fwd in forward_batches(model, source, batch_size, preprocessing=preprocessing, start=start, workers=workers,
                                      layers=layers, inputs_of=inputs_of, amp_dtype=amp_dtype,
                                      needs_output=any(r.needs_output for r in reducers)):
        if fwd is None:
            yield batch.start, batch.stop, batch.skipped, 0, (lambda states: states), None
            continue
        size = tuple(int(s) for s in fwd.x.shape[-2:])
        if info.input_size is not None and size != tuple(info.input_size):
            raise EngineError(f"input {batch.start} is {size}, earlier inputs were {tuple(info.input_size)}; "
                              "every input must have the same size")

        def advance(states: tuple, fwd: Forward = fwd) -> tuple:
            return tuple(r.step(s, fwd) for r, s in zip(reducers, states))

        yield batch.start, batch.stop, batch.skipped, int(fwd.x.shape[0]), advance, size


def forward_batches(model: Model, source: Any, batch_size: int, *, preprocessing: Preprocessing = MODEL_PREPROCESSING,
                    start: int = 0, stop: int | None = None, workers: int | None = None, layers: Sequence[str] = (),
                    inputs_of: Sequence[str] = (), amp_dtype: torch.dtype | None = None, needs_output: bool = False
                    ) -> Iterator[tuple[Batch, Forward | None]]:
    """Batches of ``source`` from ``start`` and what their forward pass recorded (``None`` for a batch whose every
    image was unreadable). One :class:`~convscope.probe.Capture` for the whole stream (the model is restored when
    the iterator ends or is closed); passes stop right after the last recorded layer unless the output or a
    layer's input is needed."""
    module = model.module
    loader = Loader(model, source, batch_size, preprocessing=preprocessing, workers=workers, start=start, stop=stop)
    stop_early = not needs_output and not inputs_of and bool(layers)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    batches = iter(loader)
    try:
        with torch.no_grad(), Capture(module, list(layers), stop=stop_early) as cap:
            for name in inputs_of:
                handles.append(resolve_layer(module, name).register_forward_pre_hook(_input_hook(name, seen)))
            autocast = (torch.autocast(model.device.type, dtype=amp_dtype) if amp_dtype is not None
                        else contextlib.nullcontext())
            for batch in batches:
                if batch.x is None:
                    yield batch, None
                    continue
                seen.clear()
                with autocast:
                    out = forward_fast(module, batch.x, cap.forward)
                acts = {}
                for name in layers:
                    act = cap.activations.get(name)
                    if act is None:
                        raise LayerKindError(f"layer {name!r} is never called in the model's forward pass")
                    acts[name] = act.float() if amp_dtype is not None else act
                for name in inputs_of:
                    if name not in seen:
                        raise LayerKindError(f"layer {name!r} is never called in the model's forward pass")
                logits = None
                if needs_output:
                    logits = output_logits(out)
                    logits = logits.float() if amp_dtype is not None else logits
                yield batch, Forward(x=batch.x, index=batch.index.to(batch.x.device), activations=acts,
                                     inputs={k: (v.float() if amp_dtype is not None else v) for k, v in seen.items()},
                                     output=logits, labels=batch.labels)
    finally:
        for h in handles:
            h.remove()
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _input_hook(name: str, seen: dict[str, torch.Tensor]) -> Callable:
    def hook(_m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen[name] = args[0].detach()

    return hook


def feature_maps(act: torch.Tensor, layer: str) -> torch.Tensor:
    """``act`` checked to be feature maps (N, C, H, W) (a clear error names the layer otherwise)."""
    if act.ndim != 4:
        raise LayerKindError(f"layer {layer!r} outputs shape {tuple(act.shape)}, not feature maps (N, C, H, W); "
                             "choose a convolutional layer (see `convscope summary`)")
    return act


# ============================================================================ channel statistics


class ChannelStats(Reducer):
    """Per-channel statistics of a layer over a dataset: mean, standard deviation and maximum over every position
    of every image; ``sparsity`` (fraction of positions <= 0); ``fires`` (fraction of images where the channel's
    maximum is > 0); ``never_fires`` (no image at all). Sums in float64; state size = channels."""

    def __init__(self, layer: str, *, name: str | None = None):
        super().__init__()
        self.layer = layer
        self.layers = (layer,)
        self.name = name or f"stats:{layer}"

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer}

    def step(self, state: dict[str, Any] | None, batch: Forward) -> dict[str, Any]:
        act = feature_maps(batch.activations[self.layer], self.layer).float()
        n, c, h, w = act.shape
        flat = act.transpose(0, 1).reshape(c, -1)
        part = {"images": n, "positions": n * h * w, "sum": flat.sum(1, dtype=torch.float64),
                "sumsq": (flat.double() ** 2).sum(1), "max": flat.amax(1),
                "min": flat.amin(1), "nonpositive": (flat <= 0).sum(1, dtype=torch.float64),
                "fired": (act.amax(dim=(2, 3)) > 0).sum(0, dtype=torch.float64)}
        return self.merge_states(state, part)

    def merge_states(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        if a is None or b is None:
            return b if a is None else a
        return {"images": a["images"] + b["images"], "positions": a["positions"] + b["positions"],
                "sum": a["sum"] + b["sum"], "sumsq": a["sumsq"] + b["sumsq"], "max": torch.maximum(a["max"], b["max"]),
                "min": torch.minimum(a["min"], b["min"]), "nonpositive": a["nonpositive"] + b["nonpositive"],
                "fired": a["fired"] + b["fired"]}

    def finish(self, state: dict[str, Any] | None, run: RunInfo) -> Stats:
        if state is None:
            z = torch.zeros(0)
            return Stats(self.layer, 0, z, z, z, z, z, z)
        n = float(state["positions"])
        mean = state["sum"] / n
        var = (state["sumsq"] / n - mean ** 2).clamp_min(0)
        return Stats(self.layer, int(state["images"]), mean.float().cpu(), var.sqrt().float().cpu(),
                     state["max"].float().cpu(), state["min"].float().cpu(),
                     (state["nonpositive"] / n).float().cpu(), (state["fired"] / state["images"]).float().cpu())


@dataclass
class Stats:
    """Channel statistics of ``layer`` over ``images`` images (see :class:`ChannelStats`); tensors (C,)."""

    layer: str
    images: int
    mean: torch.Tensor
    std: torch.Tensor
    max: torch.Tensor
    min: torch.Tensor
    sparsity: torch.Tensor
    fires: torch.Tensor

    @property
    def never_fires(self) -> list[int]:
        """Channels whose response is <= 0 everywhere on every image."""
        return [int(c) for c in (self.fires == 0).nonzero().flatten()]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "images": self.images, "never_fires": self.never_fires,
                "channels": [{"channel": c, "mean": _f(self.mean[c]), "std": _f(self.std[c]), "max": _f(self.max[c]),
                              "min": _f(self.min[c]), "sparsity": _f(self.sparsity[c]), "fires": _f(self.fires[c])}
                             for c in range(len(self.mean))]}


def _f(v: torch.Tensor) -> float | None:
    x = float(v)
    return x if math.isfinite(x) else None

