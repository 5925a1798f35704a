"""What every synthesis method shares: its result type, the seeded generator and the interruptible loop.

:class:`SynthesisResult` holds the image (``pixels`` in [0, 1] and ``input`` in the model's space),
the history of the optimised quantity, the time taken and whether Ctrl-C ended it early; it shows as a
picture in Jupyter and has a one-line ``repr``. :func:`interruptible` runs a loop with a progress bar and turns
Ctrl-C into ``interrupted=True`` so that every method keeps the image it had.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..progress import tqdm
from ..render import grid, png_bytes


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> list of 8-bit RGB images."""
    a = (pixels.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype("uint8")
    return [Image.fromarray(x) for x in a]


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (1, 3, H, W) float tensor in [0, 1] (on the CPU)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def seeded(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (``None``: 0), the one source of randomness of a method."""
    return torch.Generator().manual_seed(int(seed) if seed is not None else 0)


def short(value: Any) -> str:
    """A value in a few characters: tensors by shape, lists by length, floats to 4 digits."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return f"{float(value):.4g}"
        return "tensor(" + "x".join(map(str, value.shape)) + ")"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{len(value)} items]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(map(str, value)) + "}"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    text = repr(value)
    return text if len(text) <= 60 else f"<{type(value).__name__}>"


class ShortRepr:
    """A one-line ``repr`` of a dataclass: its ``repr=True`` fields (keyword-only ones last), each made :func:`short`."""

    def __repr__(self) -> str:
        shown = sorted((f for f in fields(self) if f.repr), key=lambda f: f.kw_only is True)  # type: ignore[arg-type]
        parts = [f"{f.name}={short(getattr(self, f.name))}" for f in shown]
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(repr=False)
class SynthesisResult(ShortRepr):
    """An image made by optimisation: ``pixels`` (N, 3, H, W) in [0, 1], ``input`` the same in the model's
    input space (ready to feed), ``history`` of the optimised quantity, ``seconds`` taken, ``interrupted``
    (Ctrl-C ended the run; the image is the last iterate) and method-specific ``extras``.

    Shows as a picture in Jupyter (:meth:`picture`: the image, or a grid for a batch).
    """

    input: torch.Tensor = field(repr=False)
    pixels: torch.Tensor
    history: list[float] = field(default_factory=list, kw_only=True)
    seconds: float = field(default=0.0, kw_only=True)
    interrupted: bool = field(default=False, kw_only=True)
    extras: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the batch as a PIL image (8-bit)."""
        return pixels_to_pil(self.pixels)

    @property
    def image(self) -> Image.Image:
        """The first (often the only) image."""
        return self.images[0]

    def picture(self) -> Image.Image:
        """The image, or a grid of the batch."""
        images = self.images
        return images[0] if len(images) == 1 else grid(images)

    def _repr_png_(self) -> bytes:
        return png_bytes(self.picture())


@dataclass
class Run:
    """The state of a loop under :func:`interruptible`: its progress bar, start time and whether Ctrl-C ended it."""

    bar: Any
    start: float
    interrupted: bool = False

    def tick(self, n: int = 1) -> None:
        self.bar.update(n)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


@contextmanager
def interruptible(total: int, description: str, progress: bool | None) -> Iterator[Run]:
    """``with interruptible(n, "render", progress) as run:`` a progress bar of ``n`` steps; Ctrl-C inside the
    block ends it with ``run.interrupted = True`` (the caller keeps what it has); the bar always closes.
    ``progress``: ``False`` hides the bar, ``None`` shows it only on a terminal."""
    run = Run(tqdm(total=total, desc=description, disable=None if progress is None else not progress, leave=False),
              time.perf_counter())
    try:
        yield run
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        run.bar.close()
