"""Rows of float32 vectors on disk at their input positions: an embedding's features, never all in memory.

A :class:`RowFile` is a ``.npy`` file (``numpy.load(path, mmap_mode="r")`` reads it) holding an (R, C) float32
array whose row ``i`` belongs to input ``i``. Its header is padded to a fixed size (:data:`HEADER` bytes), so
the row count grows in place as batches arrive and a source of unknown length needs no size up front. Rows
are written with plain file writes at their offsets, a batch at a time; writing a row again writes the same
bytes at the same place, so a batch written but not yet committed by an interrupted run is simply written
again when the run resumes. Rows never written (unreadable images) read as zeros. Reading maps the file
(:meth:`RowFile.map`, copy-on-write): the rows come from the page cache, not from the Python heap.

Durability: like the engine's state file (written atomically, not fsync'ed), rows reach the kernel at once,
so a killed process (Ctrl-C, ``kill -9``) loses nothing; a power cut may lose what the OS had not flushed.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write
from .folder import StateFileError

#: Bytes before the first row: magic, version, header length and the header dict padded with spaces.
HEADER = 128
#: Rows copied at a time when rows are gathered (bounded memory: COPY_ROWS x C floats).
COPY_ROWS = 4096
_MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(rows: int, cols: int) -> bytes:
    """The ``.npy`` (format 1.0) header of a C-order float32 array (rows, cols), padded to :data:`HEADER` bytes."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}"
    body = text.ljust(HEADER - len(_MAGIC) - 2 - 1) + "\n"
    if len(body) != HEADER - len(_MAGIC) - 2:
        raise ValueError(f"shape ({rows}, {cols}) does not fit a {HEADER}-byte header")
    return _MAGIC + struct.pack("<H", len(body)) + body.encode("latin1")


class RowFile:
    """An on-disk float32 array (R, C) at ``path``, row ``i`` for input ``i`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RowFile({str(self.path)!r})"

    def shape(self) -> tuple[int, int] | None:
        """(rows, cols) from the header; ``None`` when the file is missing or is not a row file."""
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version != (1, 0):
                    return None
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                if f.tell() != HEADER:
                    return None
        except (OSError, ValueError, SyntaxError):
            return None
        if fortran or dtype != np.dtype("<f4") or len(shape) != 2:
            return None
        return int(shape[0]), int(shape[1])

    def create(self, cols: int) -> None:
        """An empty array (0, ``cols``), replacing whatever was at the path by a new file (arrays that still map
        the old one keep reading it: a file is never cut under a live memory map, which would crash its reader)."""
        atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(npy_header(0, cols)))

    def ensure(self, cols: int) -> None:
        """Keep the file when it is a row file of ``cols`` columns (its rows are rewritten as batches come),
        else :meth:`create` it."""
        got = self.shape()
        if got is None or got[1] != cols:
            self.create(cols)

    def check(self, cols: int, rows: int, what: str = "features") -> None:
        """Raise :class:`~convscope.dataset.folder.StateFileError` unless the file holds at least ``rows`` rows of
        ``cols`` values (a saved state says they were written)."""
        got = self.shape()
        if got is None:
            raise StateFileError(f"{self.path}: the {what} file of this run is missing or is not a row file; delete the "
                                 "state file to start again (or pass the file the rows were written to)")
        size = self.path.stat().st_size
        if got[1] != cols or got[0] < rows or size < HEADER + rows * cols * 4:
            raise StateFileError(f"{self.path}: the {what} file holds {got[0]} x {got[1]} values, the state says {rows} "
                                 f"x {cols} were written; it was changed or replaced: delete the state file to start again")

    def write(self, positions: np.ndarray, rows: np.ndarray) -> None:
        """Write ``rows`` (m, C) at ``positions`` (m,), increasing; the header grows to the last position + 1."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return
        rows = np.ascontiguousarray(rows, dtype="<f4")
        got = self.shape()
        if got is None or got[1] != rows.shape[1]:
            raise StateFileError(f"{self.path}: not a row file of {rows.shape[1]} columns")
        cols = rows.shape[1]
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # runs of consecutive positions: one write each
        with open(self.path, "r+b") as f:
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(positions)]):
                f.seek(HEADER + int(positions[lo]) * cols * 4)
                f.write(rows[lo:hi].tobytes())
            need = int(positions[-1]) + 1
            if need > got[0]:  # after the rows: a header never counts rows that are not there
                f.seek(0)
                f.write(npy_header(need, cols))

    def resize(self, rows: int) -> None:
        """Exactly ``rows`` rows: the header says so and a shorter file is extended with zeros. A longer file (rows
        of an earlier, longer run) is not cut, since an earlier result may still map them: readers stop at the
        header's count."""
        got = self.shape()
        if got is None:
            raise StateFileError(f"{self.path}: not a row file")
        with open(self.path, "r+b") as f:
            end = HEADER + rows * got[1] * 4
            if f.seek(0, os.SEEK_END) < end:
                f.truncate(end)
            f.seek(0)
            f.write(npy_header(rows, got[1]))

    def zero(self, positions: np.ndarray) -> None:
        """Zeros at ``positions`` (rows of unreadable inputs, which an earlier run may have filled)."""
        got = self.shape()
        positions = np.asarray(positions, dtype=np.int64)
        if got is None or len(positions) == 0:
            return
        positions = positions[positions < got[0]]
        self.write(positions, np.zeros((len(positions), got[1]), np.float32))

    def map(self, rows: int) -> np.ndarray:
        """The first ``rows`` rows, memory-mapped copy-on-write (changing the array never changes the file)."""
        got = self.shape()
        if got is None:
            raise StateFileError(f"{self.path}: not a row file")
        if rows == 0:
            return np.zeros((0, got[1]), np.float32)
        return np.memmap(self.path, dtype="<f4", mode="c", offset=HEADER, shape=(rows, got[1]))

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions``, in that order, as a compact memory-mapped copy in a temporary row file
        (copied :data:`COPY_ROWS` rows at a time; the file is deleted when the array is no longer used)."""
        positions = np.asarray(positions, dtype=np.int64)
        got = self.shape()
        if got is None:
            raise StateFileError(f"{self.path}: not a row file")
        if len(positions) == 0:
            return np.zeros((0, got[1]), np.float32)
        src = self.map(int(positions.max()) + 1)
        tmp = Temporary()
        out = RowFile(tmp.path)
        out.create(got[1])
        for lo in range(0, len(positions), COPY_ROWS):
            hi = min(lo + COPY_ROWS, len(positions))
            out.write(np.arange(lo, hi), np.asarray(src[positions[lo:hi]]))
        return keep_alive(out.map(len(positions)), tmp)


class Temporary:
    """A temporary file path (in ``TMPDIR``), deleted, with the files named by :meth:`also`, when this object is
    garbage-collected or at exit."""

    def __init__(self, prefix: str = "convscope-rows-", suffix: str = ".npy"):
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix)
        os.close(fd)
        self.path = path
        self._paths = [path]
        self._finalizer = weakref.finalize(self, _remove, self._paths)

    def also(self, path: str) -> None:
        """Delete ``path`` too (a companion file)."""
        self._paths.append(path)


def _remove(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # already gone; or still mapped on Windows (then left to the OS)
            os.unlink(path)


def keep_alive(array: np.ndarray, owner: Any) -> np.ndarray:
    """``array`` holding a reference to ``owner`` (a :class:`Temporary`): every view of the array, and every
    tensor made from one with ``torch.from_numpy``, keeps the file until the last of them is gone."""
    if isinstance(array, np.memmap):
        array._convscope_owner = owner  # type: ignore[attr-defined]
    return array
