"""The Ray engine of the dataset runner: ``run(..., engine="ray")`` / ``convscope ... --engine ray``.

The run is the local engine's, cut differently: the driver (the process that called :func:`~convscope.dataset.
engine.run`) splits the inputs still to do into batch ranges ``[lo, hi)`` (the same ranges as the local engine:
``batch_size`` inputs from the resume point on) and hands them to Ray Data as one row per range. A pool of Ray
actors (``map_batches`` with a callable class: one copy of the model per actor, on a GPU with ``num_gpus``)
reads, decodes and preprocesses the range's images with the same code as the local engine
(:func:`~convscope.dataset.engine.forward_batches`), runs the forward pass and computes every reducer's *partial*
state of that range alone (``step(None, batch)``). The driver receives the partial states in input order
(``preserve_order``, plus a small reorder buffer) and merges them into the committed states with
:meth:`~convscope.dataset.engine.Reducer.merge_states`; saving, resuming, Ctrl-C and the list of skipped images
stay the driver's, exactly as in the local engine, so results are the same (top-k ties included).

What travels to the actors, once per actor through the object store: the model (moved to the CPU while it is
serialised when it lives on a GPU), the reducers and the source: a folder or list of files (the paths, read by
the actors: on a cluster every node must see the files at the same paths, e.g. a shared filesystem; relative
paths are taken from the driver's working directory), in-memory PIL images or arrays (shipped, pickled, with
the list), a tensor or a list of tensors (concatenated and shipped; an iterable of unknown length is refused),
or a map-style torch ``Dataset`` (shipped by pickling; one that cannot be pickled is refused with
:class:`~convscope.dataset.engine.EngineError`).

Ray itself: ``address=None`` uses the Ray this process is already connected to, or starts a local instance
(``num_cpus`` = the CPU cores this process may use, no dashboard) and shuts it down when the run ends; a Ray the
caller started (``ray.init`` before the run) is left running. ``address="HOST:6379"`` (or ``"auto"``) connects to
a running cluster (``ray start --head``) and disconnects at the end; the cluster keeps running. Ray is an
optional dependency: ``pip install convscope[ray]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .engine import (
    DatasetSource,
    EngineError,
    Forward,
    Preprocessing,
    Reducer,
    _amp_dtype,
    default_workers,
    forward_batches,
    pack,
    unpack,
)
from .folder import ImageSource, TensorSource

#: Decode threads inside a GPU actor (a CPU actor decodes in its own thread: its one CPU runs the model too).
GPU_ACTOR_DECODE_THREADS = 4


def import_ray() -> Any:
    """The ``ray`` module (with Ray Data), or an :class:`EngineError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate extra of Ray)
    except ImportError as exc:
        raise EngineError(f"engine='ray' needs Ray Data ({exc}); install it with: pip install convscope[ray]") from None
    return ray


def ray_batches(model: Any, source: Any, reducers: Sequence[Reducer], *, batch_size: int, preprocessing: Preprocessing,
                start: int, layers: Sequence[str], inputs_of: Sequence[str], amp: str | None, address: str | None = None,
                num_gpus: float | None = None, actors: int | None = None) -> Iterator[tuple]:
    """The Ray engine's batches for :func:`~convscope.dataset.engine.run`, in input order from ``start``.

    Yields ``(lo, hi, skipped, scored, states_fn, input_size)`` per batch range: ``states_fn(committed)`` merges
    the range's partial states into the committed ones (never changing them). ``num_gpus``: GPUs per actor
    (fractions share a GPU); ``actors``: the pool size (default: the cluster's CPUs, or its GPUs / ``num_gpus``).
    Close the iterator to stop the actors (and the local Ray instance this call started, if any).
    """
    if num_gpus is not None and num_gpus < 0:
        raise EngineError(f"num_gpus must be >= 0, got {num_gpus}")
    if actors is not None and actors < 1:
        raise EngineError(f"actors must be >= 1, got {actors}")
    ray = import_ray()  # a missing Ray is said before anything starts
    shipped, total = _shippable(source)
    ranges = [(lo, min(lo + batch_size, total)) for lo in range(start, total, batch_size)]
    if not ranges:
        return _Stream(iter(()))
    return _Stream(_batches(ray, model, shipped, list(reducers), ranges, batch_size=batch_size, preprocessing=preprocessing,
                            layers=list(layers), inputs_of=list(inputs_of), amp=amp, address=address,
                            num_gpus=num_gpus or 0.0, actors=actors))


class _Stream:
    """An iterator with :meth:`close` (what :func:`~convscope.dataset.engine.run` expects of an engine)."""

    def __init__(self, gen: Iterator[tuple]):
        self._gen = gen

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> tuple:
        return next(self._gen)

    def close(self) -> None:
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()


def _shippable(source: Any) -> tuple[Any, int]:
    """What the actors get of ``source`` (picklable, device-free) and how many inputs it has."""
    if isinstance(source, ImageSource):
        return source, len(source)
    if isinstance(source, DatasetSource):
        return source, len(source)
    if isinstance(source, TensorSource):
        images = source.images
        if isinstance(images, torch.Tensor):
            tensor = images if images.ndim == 4 else images.unsqueeze(0)
        elif isinstance(images, Sequence):
            parts = [t if t.ndim == 4 else t.unsqueeze(0) for t in images]
            if len({tuple(t.shape[1:]) for t in parts}) > 1:
                raise EngineError("every input tensor must have the same size (C, H, W) for engine='ray'")
            tensor = torch.cat([t.detach().cpu() for t in parts])
        else:
            raise EngineError("engine='ray' cannot shard an iterable of tensors of unknown length; pass a tensor, a list "
                              "of tensors, a list of files or a folder, or use engine='local'")
        return _Tensors(tensor.detach().cpu()), int(tensor.shape[0])
    raise EngineError(f"engine='ray' cannot stream a {type(source).__name__}")


class _Tensors:
    """Preprocessed tensors on their way to the actors (rebuilt there as a TensorSource on the actor's device)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _cluster_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _connected(ray: Any, address: str | None) -> Iterator[None]:
    """Ray connected for the block: an existing connection is used as is; one made here is closed afterwards."""
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=_cluster_cores(), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EngineError(f"cannot connect to the Ray cluster at {address!r}: {exc} (start it with "
                                  "`ray start --head`; the address is HOST:6379 or 'auto')") from exc
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's per-run INFO lines and one-time progress-bar notice kept off the user's terminal."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pool_size(ray: Any, num_gpus: float, actors: int | None, n_ranges: int) -> int:
    resources = ray.cluster_resources()
    if num_gpus > 0:
        gpus = float(resources.get("GPU", 0))
        if gpus <= 0:
            raise EngineError(f"num_gpus={num_gpus} asked, but the Ray cluster has no GPU")
        default = max(1, int(gpus // num_gpus)) if num_gpus <= gpus else 1
    else:
        default = max(1, int(resources.get("CPU", 1)))
    return max(1, min(actors or default, n_ranges))


def _batches(ray: Any, model: Any, shipped: Any, reducers: list[Reducer], ranges: list[tuple[int, int]], *, batch_size: int,
             preprocessing: Preprocessing, layers: list[str], inputs_of: list[str], amp: str | None, address: str | None,
             num_gpus: float, actors: int | None) -> Iterator[tuple]:
    device = model.device
    with _connected(ray, address), _quiet_ray_data():
        model_ref = _put_model(ray, model)
        try:
            source_ref = ray.put(shipped)
        except Exception as exc:  # cloudpickle raises many kinds for objects it cannot serialise
            raise EngineError(f"engine='ray' cannot send the inputs to the actors ({type(exc).__name__}: {exc}); "
                              "pass files (a folder or a list of paths) or use engine='local'") from None
        reducers_ref = ray.put(reducers)
        size = _pool_size(ray, num_gpus, actors, len(ranges))
        ds = ray.data.from_items([{"lo": lo, "hi": hi} for lo, hi in ranges], override_num_blocks=len(ranges))
        ctx = ds.context
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        with contextlib.suppress(AttributeError):  # Ray < 2.30 has no such switch
            ctx.print_on_execution_start = False
        ds = ds.map_batches(
            _Worker, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=1, num_gpus=num_gpus if num_gpus > 0 else None,
            fn_constructor_kwargs={"model": model_ref, "source": source_ref, "reducers": reducers_ref,
                                   "config": {"batch_size": batch_size, "preprocessing": preprocessing, "layers": layers,
                                              "inputs_of": inputs_of, "amp": amp, "gpu": num_gpus > 0,
                                              "cwd": os.getcwd()}})
        rows = _rows(ray, ds)
        try:
            expected = ranges[0][0]
            waiting: dict[int, dict[str, Any]] = {}
            first_size: tuple[int, int] | None = None
            for row in rows:
                part = pickle.loads(row["payload"])
                waiting[int(part["lo"])] = part
                while expected in waiting:
                    part = waiting.pop(expected)
                    if part.get("error") is not None:
                        raise part["error"]
                    size_hw = None if part["size"] is None else tuple(part["size"])
                    if size_hw is not None:
                        if first_size is not None and size_hw != first_size:
                            raise EngineError(f"input {part['lo']} is {size_hw}, earlier inputs were {first_size}; "
                                              "every input must have the same size")
                        first_size = first_size or size_hw
                    yield (part["lo"], part["hi"], [tuple(s) for s in part["skipped"]], part["scored"],
                           _merger(reducers, part, device), size_hw)
                    expected = part["hi"]
            if expected != ranges[-1][1]:
                raise EngineError(f"internal: the Ray engine stopped at input {expected} of {ranges[-1][1]}")
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()


def _rows(ray: Any, ds: Any) -> Iterator[dict[str, Any]]:
    """The dataset's rows; Ray's own failures (an actor that cannot start: convscope or the model's code missing on
    a node, a node lost...) become an :class:`EngineError` (errors of the analysis itself travel in the rows)."""
    rows = iter(ds.iter_rows())
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except ray.exceptions.RayError as exc:
                raise EngineError(f"the Ray engine failed ({type(exc).__name__}): {exc}\n(every Ray node needs convscope, "
                                  "the model's code and the image files at the same paths)") from exc
            yield row
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def _merger(reducers: list[Reducer], part: dict[str, Any], device: torch.device) -> Any:
    """``fn(committed states) -> new states``: the range's partial states merged after the committed ones."""
    if part["scored"] == 0:
        return lambda states: states
    partial = [unpack(plain, tensors, device) for plain, tensors in part["states"]]

    def merge(states: tuple) -> tuple:
        return tuple(r.merge_states(s, p) for r, s, p in zip(reducers, states, partial))

    return merge


def _put_model(ray: Any, model: Any) -> Any:
    """The model in the object store, its tensors on the CPU (so CPU-only nodes can load it); the caller's
    model is back on its device afterwards."""
    device = model.device
    if device.type == "cpu":
        return ray.put(model)
    model.to("cpu")
    try:
        return ray.put(model)
    finally:
        model.to(device)


class _Worker:
    """One Ray actor: a copy of the model, the reducers and the inputs; ``__call__`` runs one batch range.

    The row it returns carries, pickled, the range's partial states (packed: plain data + CPU tensors), its
    skipped images, how many images reached the network and the input size, or the exception that stopped it
    (raised again by the driver, with the actor's traceback as a note)."""

    def __init__(self, model: Any, source: Any, reducers: Any, config: dict[str, Any]):
        import ray

        def get(x: Any) -> Any:
            return ray.get(x) if isinstance(x, ray.ObjectRef) else x

        model, source, self.reducers = get(model), get(source), get(reducers)
        cwd = config["cwd"]
        if os.path.isdir(cwd):  # relative paths mean the driver's working directory (same paths on every node)
            os.chdir(cwd)
        gpu = config["gpu"] and torch.cuda.is_available()
        device = torch.device("cuda") if gpu else torch.device("cpu")
        if not gpu:
            torch.set_num_threads(1)  # one CPU per actor: the pool, not the threads, uses the cores
        self.model = model.to(device)
        self.source = TensorSource(source.tensor, device) if isinstance(source, _Tensors) else source
        self.config = config
        self.workers = min(GPU_ACTOR_DECODE_THREADS, default_workers()) if gpu else 0
        self.amp_dtype = _amp_dtype(config["amp"], self.model, self.reducers)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lo, hi = int(rows["lo"][0]), int(rows["hi"][0])
        try:
            part = self._run(lo, hi)
        except Exception as exc:
            with contextlib.suppress(Exception):
                exc.add_note(f"(raised in a Ray actor)\n{traceback.format_exc()}")
            part = {"lo": lo, "hi": hi, "error": exc}
            try:
                payload = pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # an exception that cannot be pickled: its text travels instead
                part["error"] = EngineError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                payload = pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)
            return {"lo": np.array([lo]), "payload": np.array([payload], dtype=object)}
        payload = pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)
        return {"lo": np.array([lo]), "payload": np.array([payload], dtype=object)}

    def _run(self, lo: int, hi: int) -> dict[str, Any]:
        c = self.config
        states: list[Any] = [None] * len(self.reducers)
        skipped: list[tuple[int, str]] = []
        scored, size = 0, None
        fwd: Forward | None
        for batch, fwd in forward_batches(self.model, self.source, c["batch_size"], preprocessing=c["preprocessing"],
                                          start=lo, stop=hi, workers=self.workers, layers=c["layers"],
                                          inputs_of=c["inputs_of"], amp_dtype=self.amp_dtype,
                                          needs_output=any(r.needs_output for r in self.reducers)):
            if batch.start >= hi:
                break
            skipped.extend(batch.skipped)
            if fwd is None:
                continue
            got = tuple(int(s) for s in fwd.x.shape[-2:])
            if size is not None and got != size:
                raise EngineError(f"input {batch.start} is {got}, earlier inputs were {size}; "
                                  "every input must have the same size")
            size = got
            scored += int(fwd.x.shape[0])
            states = [r.step(s, fwd) for r, s in zip(self.reducers, states)]
        return {"lo": lo, "hi": hi, "skipped": skipped, "scored": scored, "size": size,
                "states": [pack(s) for s in states], "error": None}
