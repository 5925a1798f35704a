"""Writing files safely: one atomic writer, and output paths checked before any work starts.

Everything convscope writes (pictures, reports, state files, trained networks) goes through
:func:`atomic_write`: the content is written to a temporary file in the target folder and moved into
place, so an interrupted write (Ctrl-C, ``kill -9``, a full disk) never leaves a half-written file under
the real name. :func:`check_output_path` is what front ends call before a long job, so a path that cannot
be written fails in a second with one clear line instead of after the work.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ConvscopeError


class OutputPathError(ConvscopeError, ValueError):
    """An output path that cannot be written: unknown suffix, a directory, a missing or read-only folder."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, suffix: str | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    ``suffix``: the temporary file's suffix (some writers pick the format from it; default: ``path``'s).
    The result gets the permissions a normal new file would get (umask applied). On any exception,
    KeyboardInterrupt included, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=suffix if suffix is not None else (path.suffix or ".tmp"))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a UTF-8 text file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write a binary file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def check_output_path(path: str | os.PathLike, suffixes: Iterable[str] | None = None, *, what: str = "output") -> Path:
    """Check before the work that ``path`` can be written: a known suffix (when ``suffixes`` is given,
    compared case-insensitively), not an existing directory, its folder existing (or creatable) and writable.
    Raises :class:`OutputPathError` with one line; creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{p}: is a directory; give a file name for the {what}")
    if suffixes is not None:
        allowed = tuple(s.lower() for s in suffixes)
        if p.suffix.lower() not in allowed:
            raise OutputPathError(f"{p}: unsupported {what} type {p.suffix or '(no suffix)'!r}; use one of {', '.join(allowed)}")
    folder = p.parent if str(p.parent) else Path(".")
    existing = folder
    while not existing.exists():  # the nearest folder that exists must let us create the rest
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{p}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{p}: folder {existing} is not writable")
    if p.exists() and not os.access(p, os.W_OK) and not os.access(folder, os.W_OK):
        raise OutputPathError(f"{p}: file is not writable")
    return p


def check_output_dir(path: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Check before the work that the folder ``path`` exists as a folder (or can be created) and is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{p}: exists and is not a folder; give a folder for the {what}")
    existing = p
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{p}: {existing} is not a writable folder")
    return p
