"""Interrupt a resumable analysis at every line of one batch's update, resume it, and compare with an uninterrupted run.

The issue's demand for every reducer of the dataset engine: "a test must interrupt at every point of an update
and check the resumed result equals the uninterrupted one". :func:`interrupt_everywhere` does it with
``sys.settrace``:

1. it runs the analysis once with a tracer that counts the *line events* of the frames chosen by ``counts``
   (a predicate on the code object: its ``co_filename``, ``co_qualname``...) inside the *window* of batch
   ``batch``: from the ``batch``-th call of a function chosen by ``starts`` (e.g. the reducer's ``step``, a plain
   function) to its next call (so the window holds the step, the engine's commit, the progress report, the
   periodic save and the loading of the next batch);
2. for each chosen point n (every event, or the first event of every distinct line; optionally the lines
   ``always`` chooses plus at most ``limit`` others, spread evenly), it runs the analysis with a fresh state
   file and a tracer that raises ``KeyboardInterrupt`` at the n-th counted event (what Ctrl-C does there), then
   runs it again with the same state file and no tracer, and calls ``same(expected, resumed)``, which must raise
   when they differ.

Only the calling thread is traced (decode threads are not). The analysis must be deterministic in the lines it
runs (the same inputs, batch size, ``save_every``). Ctrl-C handled by the analysis (it returns, interrupted) and
Ctrl-C that escapes it (the resumed run must then still be right) are both accepted; ``interrupted`` may check
the partial result.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

Where = tuple[str, int, str]  # (file name, line, function qualname)


class _Tracer:
    def __init__(self, counts: Callable[[CodeType], bool], starts: Callable[[CodeType], bool], batch: int,
                 stop_at: int | None = None):
        self.counts, self.starts, self.batch, self.stop_at = counts, starts, batch, stop_at
        self.calls = 0
        self.events: list[Where] = []
        self.fired: Where | None = None

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:  # global tracer: "call" events
        code = frame.f_code
        if event == "call" and self.starts(code):
            self.calls += 1
        return self._local if self.counts(code) else None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and self.calls == self.batch and self.fired is None:
            code = frame.f_code
            where = (os.path.basename(code.co_filename), frame.f_lineno, code.co_qualname)
            if len(self.events) == self.stop_at:
                self.fired = where
                raise KeyboardInterrupt(f"test interrupt at {where}")
            self.events.append(where)
        return self._local


def _traced(analysis: Callable[[Path], Any], state: Path, tracer: _Tracer) -> tuple[Any, bool]:
    """(result, whether a KeyboardInterrupt escaped the analysis)."""
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return analysis(state), False
    except KeyboardInterrupt:
        return None, True
    finally:
        sys.settrace(previous)


@dataclass
class Report:
    """What :func:`interrupt_everywhere` did: the uninterrupted result, every counted event of the window, the
    points tried, and where each interrupt fired (and whether the analysis returned or let the ``KeyboardInterrupt``
    escape)."""

    expected: Any
    events: list[Where]
    points: list[int]
    fired: list[tuple[Where, bool]] = field(default_factory=list)


def interrupt_everywhere(analysis: Callable[[Path], Any], folder: Path, *, counts: Callable[[CodeType], bool],
                         starts: Callable[[CodeType], bool], batch: int, same: Callable[[Any, Any], None],
                         every: str = "line", always: Callable[[Where], bool] | None = None, limit: int | None = None,
                         interrupted: Callable[[Any], None] | None = None) -> Report:
    """Interrupt ``analysis(state_path)`` at each point of the update of batch ``batch`` (the ``batch``-th call of the
    ``starts`` function, counted from 1), resume, compare (see the module docstring). ``folder``: where the state
    files go. ``every``: ``"event"`` (every counted line event) or ``"line"`` (the first event of each distinct line:
    every line of the update once). ``always``: points (file name, line, qualname) always tried; ``limit``: at most
    this many of the other points, spread evenly over the window. ``same(expected, resumed)``: raises when the
    results differ. ``interrupted(result)``: checks the partial result of an interrupted run that returned."""
    if every not in ("event", "line"):
        raise ValueError(f"every must be 'event' or 'line', got {every!r}")
    folder.mkdir(parents=True, exist_ok=True)
    counter = _Tracer(counts, starts, batch)
    expected, escaped = _traced(analysis, folder / "reference.state", counter)
    assert not escaped, "the uninterrupted run raised KeyboardInterrupt"
    assert counter.calls >= batch, f"the start function ran {counter.calls} times, batch {batch} never came"
    assert counter.events, "no line event was counted in the window: check the predicates"
    if every == "event":
        points = list(range(len(counter.events)))
    else:
        first: dict[tuple[str, int], int] = {}
        for n, (name, line, _) in enumerate(counter.events):
            first.setdefault((name, line), n)
        points = sorted(first.values())
    if limit is not None:
        kept = [n for n in points if always is not None and always(counter.events[n])]
        others = [n for n in points if n not in kept]
        if len(others) > limit:
            others = [others[round(i * (len(others) - 1) / max(1, limit - 1))] for i in range(limit)] if limit else []
        points = sorted(set(kept) | set(others))
    report = Report(expected, counter.events, points)
    for n in points:
        state = folder / f"interrupted-{n}.state"
        tracer = _Tracer(counts, starts, batch, stop_at=n)
        partial, escaped = _traced(analysis, state, tracer)
        assert tracer.fired == counter.events[n], f"point {n}: fired at {tracer.fired}, expected {counter.events[n]}"
        report.fired.append((tracer.fired, escaped))
        if not escaped and interrupted is not None:
            interrupted(partial)
        try:
            same(expected, analysis(state))
        except AssertionError as exc:
            raise AssertionError(f"resumed after an interrupt at {tracer.fired} (point {n}): {exc}") from exc
    return report
