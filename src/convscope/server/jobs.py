"""Jobs of the web explorer: a bounded queue in front of one worker thread, with ids, progress and cancel.

Every long model call (explanations, visualisations) is a :class:`Job`. One worker thread runs them in
order (the model is shared, its hooks are not thread-safe), so the HTTP side never waits for it: the page
and ``/api/info`` answer while a job runs. A job reports progress through the library's own progress
bars: while a job runs, the ``tqdm`` the attribution and synthesis loops draw with is a :class:`JobBar`
for that thread, which counts steps into the job and raises :class:`JobCancelled` at the next step once
the job is cancelled (a button on the page, or its client gone: nobody asked about it for
``abandon_after`` seconds, or the HTTP request waiting for it was closed).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..attribution import contract as _attribution_contract
from ..progress import tqdm as _real_tqdm
from ..synthesis import result as _synthesis_result

#: Jobs waiting at most (a 503 beyond), finished jobs remembered, seconds before an unwatched job is dropped.
MAX_QUEUED = 32
KEEP_FINISHED = 64
ABANDON_AFTER = 30.0


class JobCancelled(Exception):
    """Raised inside a running job at its next progress step once it has been cancelled."""


class OverBudget(JobCancelled):
    """Raised inside a job with a time budget once its first steps say it would take longer."""


class QueueFull(Exception):
    """The queue holds :data:`MAX_QUEUED` jobs already."""


@dataclass(eq=False)
class Job:
    """One queued model call: ``kind`` (an endpoint name such as ``explain``) and its query parameters."""

    id: str
    kind: str
    params: dict[str, list[str]]
    client: str = ""
    status: str = "queued"  # queued, running, done, error, cancelled, estimate (over its budget: not run)
    stage: str = ""
    done: int = 0
    total: int = 0
    status_code: int = 0
    result: dict[str, Any] | None = None
    reason: str = ""
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    last_seen: float = field(default_factory=time.monotonic)
    abandon_after: float = ABANDON_AFTER
    #: seconds this job may take; its first steps give an estimate, over it the job stops (status "estimate")
    budget: float | None = None
    estimate: float | None = None
    stage_started: float = 0.0
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def abandoned(self) -> bool:
        """Nobody asked about this job for ``abandon_after`` seconds (its page went away): cancel it."""
        if time.monotonic() - self.last_seen > self.abandon_after:
            self.reason = f"nobody asked about it for {self.abandon_after:g} s (the page went away)"
            self.cancel_requested.set()
        return self.cancel_requested.is_set()

    def step(self, n: int = 1) -> None:
        """Count ``n`` steps of the current stage; raise :class:`JobCancelled` once cancelled or abandoned."""
        self.done += n
        if self.cancel_requested.is_set() or self.abandoned():
            raise JobCancelled(self.reason or "cancelled")
        if self.budget is not None and self.total and self.estimate is None:
            spent = time.monotonic() - self.stage_started
            if spent >= 0.5 or self.done >= self.total // 20:  # enough steps timed to extrapolate
                self.estimate = spent / self.done * self.total + (self.stage_started - (self.started or self.stage_started))
                if self.estimate > self.budget:
                    raise OverBudget(f"about {self.estimate:.0f} s")

    def begin(self, stage: str, total: int) -> None:
        if self.cancel_requested.is_set():
            raise JobCancelled(self.reason or "cancelled")
        self.stage, self.done, self.total = stage, 0, max(0, int(total))
        self.stage_started = time.monotonic()

    def to_json(self, position: int | None = None) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {
            "id": self.id, "kind": self.kind, "status": self.status, "stage": self.stage,
            "done": self.done, "total": self.total,
            "fraction": (min(1.0, self.done / self.total) if self.total else (1.0 if self.status == "done" else 0.0)),
            "elapsed": 0.0 if self.started is None else (self.finished or now) - self.started,
        }
        if position is not None:
            out["position"] = position
        if self.status == "done":
            out["result"] = self.result
        elif self.status == "error":
            out["error"] = (self.result or {}).get("error", "error")
            out["status_code"] = self.status_code
        elif self.status == "cancelled":
            out["reason"] = self.reason or "cancelled"
        elif self.status == "estimate":
            out["estimate_seconds"] = self.estimate
            out["budget"] = self.budget
        return out


# ---------------------------------------------------------------------- progress through the library's bars
_local = threading.local()


class JobBar:
    """A stand-in for ``tqdm`` in the library's loops: in a job's thread it counts into the job (and
    stops a cancelled one); in any other thread it *is* the real ``tqdm`` (``__new__`` returns one)."""

    def __new__(cls, iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "job", None) is None:
            return _real_tqdm(iterable, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, iterable: Any = None, desc: str | None = None, total: int | None = None, **kwargs: Any):
        self.job: Job = _local.job
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = 0
        self.n = 0
        self.total = total or 0
        self.job.begin(str(desc or kwargs.get("unit") or ""), self.total)

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.job.step(n)

    def close(self) -> None:
        pass

    def __enter__(self) -> JobBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Callable[..., None]:  # set_postfix, set_description, refresh ...
        return lambda *args, **kwargs: None


def install_progress_hook() -> None:
    """Point the ``tqdm`` of the attribution and synthesis loops at :class:`JobBar` (idempotent; outside
    a job thread it still draws the real bar). The library takes ``progress=`` as a flag only, so this is
    how the server hears about steps without a change to every method."""
    for module in (_attribution_contract, _synthesis_result):
        if getattr(module, "tqdm", None) is not JobBar:
            module.tqdm = JobBar


# ---------------------------------------------------------------------- the queue
class JobQueue:
    """Jobs by id; one worker thread runs them in order with ``run(job) -> (status, payload)``."""

    def __init__(self, run: Callable[[Job], tuple[int, dict[str, Any]]], *, max_queued: int = MAX_QUEUED,
                 keep: int = KEEP_FINISHED, abandon_after: float = ABANDON_AFTER, name: str = "convscope-jobs"):
        self.run_job = run
        self.max_queued = max_queued
        self.keep = keep
        self.abandon_after = abandon_after
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.current: Job | None = None
        install_progress_hook()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- client side
    def submit(self, kind: str, params: dict[str, list[str]], client: str = "", budget: float | None = None) -> Job:
        """Queue a job; ``budget``: seconds it may take, judged from its first steps (over: status "estimate")."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"the job queue is full ({self.max_queued} waiting): wait for one to finish or cancel one")
            job = Job(secrets.token_hex(8), kind, params, client, abandon_after=self.abandon_after, budget=budget)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._forget_old()
            self._cond.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None:
                job.last_seen = time.monotonic()
            return job

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1.. for waiting ones, None when finished."""
        with self._cond:
            if job is self.current:
                return 0
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return None

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        with self._cond:
            if not job.active:
                return
            job.reason = reason
            job.cancel_requested.set()
            if job.status == "queued":
                with contextlib.suppress(ValueError):
                    self._waiting.remove(job)
                self._finish(job, "cancelled", 0, None)

    def jobs(self, client: str | None = None) -> list[Job]:
        with self._cond:
            return [j for j in self._jobs.values() if client is None or j.client == client]

    def busy(self) -> dict[str, int]:
        with self._cond:
            return {"running": int(self.current is not None), "queued": len(self._waiting)}

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the worker (it ends at the running job's next step)."""
        with self._cond:
            self._closed = True
            jobs = [j for j in self._jobs.values() if j.active]
        for job in jobs:
            self.cancel(job, "the server stopped")
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # -------------------------------------------------------------- worker side
    def _finish(self, job: Job, status: str, code: int, payload: dict[str, Any] | None) -> None:
        job.status, job.status_code, job.result = status, code, payload
        job.finished = time.monotonic()
        job.ended.set()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]

    def _reap(self) -> None:
        """Cancel jobs nobody asked about for ``abandon_after`` seconds (their page went away)."""
        for job in [j for j in self._jobs.values() if j.active]:
            if job.abandoned() and job.status == "queued":
                self._waiting.remove(job)
                self._finish(job, "cancelled", 0, None)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._reap()
                    self._cond.wait(1.0)
                if self._closed and not self._waiting:
                    return
                self._reap()
                if not self._waiting:
                    continue
                job = self._waiting.popleft()
                self.current = job
                job.status, job.started = "running", time.monotonic()
            _local.job = job
            try:
                if job.cancel_requested.is_set():
                    raise JobCancelled(job.reason)
                code, payload = self.run_job(job)
                status = "done" if code == 200 else "error"
            except OverBudget:
                code, payload, status = 0, None, "estimate"
            except JobCancelled:
                code, payload, status = 0, None, "cancelled"
            finally:
                _local.job = None
            with self._cond:
                self.current = None
                if job.cancel_requested.is_set() and status not in ("done", "estimate"):
                    status = "cancelled"
                self._finish(job, status, code, payload)
                self._cond.notify_all()
            # stop the watchdog's reaper from mistaking a just-finished job for an abandoned one
            job.last_seen = time.monotonic()
