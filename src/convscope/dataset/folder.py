"""The image sources the dataset engine streams, in a stable order, and the errors every run shares.

:class:`ImageSource` lists image files recursively in a stable order (sorted by their path relative to
the folder, compared as text) and reads each with :func:`convscope.load_image` (:meth:`ImageSource.load`);
:class:`TensorSource` hands out preprocessed tensors in batches. The engine's decode pipeline
(:class:`convscope.dataset.engine.Loader`) turns sources into batches: a file that cannot be read (corrupt,
truncated, not an image) is skipped and counted, never fatal (the batch simply holds fewer images), and one
:class:`SkippedImagesWarning` summarises them when a run ends. A run whose every file is unreadable has
nothing to analyse: the analyses raise :class:`UnreadableImagesError` (:func:`check_any_scored`).

Saved run states are the dataset engine's (:class:`convscope.dataset.engine.StateStore`); their errors live
here: :class:`StateFileError` for a file that is not a state, :class:`StateMismatchError` for a state of
another run. The options every run takes are declared once here (:data:`BATCH_SIZE`,
:data:`SAVE_EVERY`) and checked by the Python API and the command line alike.

Files are chosen by suffix (:data:`IMAGE_SUFFIXES`, any case); hidden files and folders (names starting
with ``.``) are left out. Nothing is kept in memory beyond one batch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ConvscopeError
from ..files import atomic_write, check_output_path
from ..images import IMAGE_SUFFIXES, list_images, load_image  # the one list and lister, re-exported
from ..models import Model, check_input
from ..models import (
    model_fingerprint as model_fingerprint,  # re-exported: topk and dissect store it in their states
)
from ..options import Option
from ..render import normalize

#: Options every streaming analysis takes, declared once (the Python API checks them, the CLI parses them).
BATCH_SIZE = Option(int, 32, "images per forward pass", minimum=1, maximum=4096)
SAVE_EVERY = Option(int, 20, "save the state every N batches", minimum=1, maximum=1_000_000)


class SkippedImagesWarning(UserWarning):
    """Some files of a stream could not be read and were skipped (the run's result lists them)."""


class DatasetError(ConvscopeError, ValueError):
    """A dataset that cannot be streamed: a missing folder, a folder without images, a bad option."""


class UnreadableImagesError(DatasetError):
    """Every image of a run was unreadable: there is nothing to analyse (the reasons of the first few are given)."""


class StateFileError(DatasetError):
    """A saved run state that cannot be read: not a state file at all, truncated, or written by something else."""


class StateMismatchError(DatasetError):
    """A saved state that belongs to a different run (another analysis, other inputs, options or model)."""


@dataclass
class Batch:
    """One batch of a stream.

    ``x``: preprocessed images (n, 3, H, W) on the model's device, or ``None`` when every image of the
    batch was skipped. ``index``: (n,) positions of those images in the source list. ``start``/``stop``:
    the range of source positions the batch covered (skipped ones included), so ``stop`` is how many
    sources are done once the batch is used. ``skipped``: ``(position, reason)`` of the unreadable ones.
    """

    x: torch.Tensor | None
    index: torch.Tensor
    start: int
    stop: int
    skipped: list[tuple[int, str]] = field(default_factory=list)
    #: (n,) class of each image where the source has classes (class sub-folders, a Dataset's labels), -1 for none
    labels: torch.Tensor | None = None


class ImageSource:
    """A fixed, ordered list of images to stream: a folder (listed with :func:`list_images`) or a list.

    ``images``: a folder path, or a sequence of file paths, ``"sample:NAME"`` strings and PIL images
    (arrays too). ``names``: one text per image identifying it (paths relative to the folder, paths as
    given, ``sample:NAME``; ``None`` for in-memory images, which cannot be read back later).
    ``paths``: what to reload each image from (``None`` for in-memory ones). Only the list of names
    is kept for files; in-memory images are held by the caller's own list, not copied.
    """

    def __init__(self, images: Any, *, recursive: bool = True):
        self.root: Path | None = None
        self._items: Sequence[Any]
        if isinstance(images, (str, os.PathLike)) and not str(images).startswith("sample:"):
            path = Path(images)
            if not path.exists():
                raise DatasetError(f"{path}: no such folder or file")
            if path.is_dir():
                self.root = path
                self._items = list_images(path, recursive=recursive)
                if not self._items:
                    raise DatasetError(f"{path}: no image files found ({', '.join(IMAGE_SUFFIXES)})")
            else:
                self._items = [images]
        elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            self._items = images
        else:
            raise DatasetError(f"cannot stream images from a {type(images).__name__}; pass a folder or a list of images")
        if len(self._items) == 0:
            raise DatasetError("no images to stream (empty list)")
        self.names: list[str | None] = [self._name(item) for item in self._items]
        #: a folder whose every image lies in a first-level sub-folder: the sub-folders are classes (sorted names)
        #: and ``classes[i]`` is image i's class number; otherwise both ``None``
        self.class_names: list[str] | None = None
        self.classes: list[int] | None = None
        if self.root is not None:
            parts = [Path(n).parts for n in self.names if n is not None]
            if parts and all(len(p) >= 2 for p in parts):
                self.class_names = sorted({p[0] for p in parts})
                where = {c: i for i, c in enumerate(self.class_names)}
                self.classes = [where[p[0]] for p in parts]

    def _name(self, item: Any) -> str | None:
        if isinstance(item, (str, os.PathLike)):
            if self.root is not None:
                return Path(item).relative_to(self.root).as_posix()
            return str(item)
        return None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def paths(self) -> list[str | None]:
        """Where each image can be read again: a path or ``sample:NAME``; ``None`` for in-memory images."""
        return [str(item) if isinstance(item, (str, os.PathLike)) else None for item in self._items]

    def fingerprint(self) -> str:
        """SHA-256 of the list of names (in-memory images count as ``<memory>``): equal lists, equal text."""
        h = hashlib.sha256()
        for name in self.names:
            h.update((name if name is not None else "<memory>").encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        return h.hexdigest()

    def load(self, position: int) -> Any:
        """The picture at ``position`` as a validated RGB PIL image (raises :class:`ImageError`)."""
        return load_image(self._items[position])


def skipped_summary(skipped: Sequence[tuple[int, str]], show: int = 3) -> str:
    """One line: how many images were skipped and the first ``show`` reasons."""
    return f"skipped {len(skipped)} unreadable image(s): {skipped_reasons(skipped, show)}"


def skipped_reasons(skipped: Sequence[tuple[int, str]], show: int = 3) -> str:
    """The first ``show`` reasons, ``; ``-separated, and how many more there are."""
    first = "; ".join(reason for _, reason in skipped[:show])
    return first + (f"; and {len(skipped) - show} more" if len(skipped) > show else "")


class TensorSource:
    """Preprocessed tensors: one (N, C, H, W) tensor, or an iterable of (C, H, W) / (n, C, H, W) tensors."""

    def __init__(self, images: Any, device: torch.device):
        self.images = images
        self.device = device
        self.root = None
        if isinstance(images, torch.Tensor):
            self.total: int | None = images.shape[0] if images.ndim == 4 else 1
        elif isinstance(images, Sequence):
            self.total = sum((t.shape[0] if isinstance(t, torch.Tensor) and t.ndim == 4 else 1) for t in images)
        else:
            self.total = None
        self.names = None if self.total is None else [None] * self.total
        self.paths = self.names

    def fingerprint(self) -> str | None:
        return None

    def batches(self, batch_size: int, *, start: int = 0) -> Iterator[Batch]:
        """Batches of ``batch_size`` tensors from position ``start`` on (taken as already preprocessed)."""
        BATCH_SIZE.check("batch_size", batch_size)
        items: Iterable[Any] = [self.images] if isinstance(self.images, torch.Tensor) else self.images
        pos = 0
        for t in items:
            if not isinstance(t, torch.Tensor):
                raise DatasetError(f"an iterable of tensors must hold only tensors, got a {type(t).__name__}; "
                                "pass a folder or a list of images/paths instead")
            t = check_input(t, device=None, channels=None)
            n = t.shape[0]
            if pos + n <= start:
                pos += n
                continue
            for lo in range(max(0, start - pos), n, batch_size):
                chunk = t[lo:lo + batch_size].to(self.device)
                idx = torch.arange(pos + lo, pos + lo + chunk.shape[0])
                yield Batch(x=chunk, index=idx, start=pos + lo, stop=pos + lo + chunk.shape[0])
            pos += n


def open_images(images: Any, device: torch.device) -> ImageSource | TensorSource:
    """The source behind ``images``: a folder or a list of paths / PIL images (:class:`ImageSource`), or
    preprocessed tensors (:class:`TensorSource`, moved to ``device`` batch by batch)."""
    if isinstance(images, torch.Tensor):
        return TensorSource(images, device)
    if isinstance(images, (str, os.PathLike)):
        return ImageSource(images)
    if isinstance(images, Sequence) and len(images) and all(isinstance(t, torch.Tensor) for t in images):
        return TensorSource(images, device)
    if isinstance(images, Sequence):
        return ImageSource(images)
    if isinstance(images, Iterable):
        return TensorSource(images, device)
    raise DatasetError(f"cannot read images from a {type(images).__name__}; pass a folder, a list of images or tensors")


# ============================================================================ saved run states


def save_tensors(tensors: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` of plain tensors (and strings) to ``path`` atomically: written to a temporary file
    in the same folder, then moved into place, so an interrupted save never leaves a broken state file.
    Read back with ``torch.load(path, weights_only=True)``."""
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def tensor_picture(model: Model | None, t: torch.Tensor) -> Image.Image:
    """A preprocessed input (C, H, W) or (1, C, H, W) as a picture: the model's :meth:`~convscope.Model.deprocess`
    for three channels; without a model (an embedding read back alone) or for other channel counts (plain
    modules take any), min..max in grey levels."""
    t = t.detach()
    if t.ndim == 4:
        t = t[0]
    if model is not None and t.shape[0] == 3:
        return model.deprocess(t)
    a = normalize(t.float().mean(0, keepdim=True).cpu())
    return Image.fromarray((a[0] * 255 + 0.5).astype("uint8")).convert("RGB")


def check_any_scored(scored: int, skipped: Sequence[tuple[int, str]]) -> None:
    """Raise :class:`UnreadableImagesError` when a run read files but none of them could be used."""
    if scored == 0 and skipped:
        raise UnreadableImagesError(f"none of the {len(skipped)} image(s) could be read: {skipped_reasons(skipped)}")


def check_state_path(state: str | os.PathLike | None) -> Path | None:
    """The state file as a path, checked before any work: not a directory, in a folder that can be written."""
    if state is None:
        return None
    return check_output_path(state, what="state file")
