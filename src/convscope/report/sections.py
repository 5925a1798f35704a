"""Report sections: each a function that turns a :class:`ReportContext` into an HTML fragment.

Adding a section is one small file ``sec_<name>.py`` in this package with one decorated function::

    @section("Attribution", order=30)
    def attribution(ctx: ReportContext) -> str:
        return "<p>...</p>"

Sections are discovered automatically and shown in ``order``. Fragments embed images as data URIs
(``convscope.render.data_uri``) so the report stays one self-contained file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class ReportContext:
    """Everything a section may use: the model, the image (as the network sees it), its input tensor, and
    whether long loops may draw progress bars (``progress``: pass it on as ``progress=``)."""

    model: Any
    image: Image.Image
    image_name: str
    x: Any  # torch.Tensor (1, 3, H, W)
    options: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # results shared between sections
    progress: bool = True


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    order: int
    build: Callable[[ReportContext], str]


SECTIONS: dict[str, Section] = {}


def section(title: str, *, order: int = 100, key: str | None = None) -> Callable[[Callable[[ReportContext], str]], Callable[[ReportContext], str]]:
    """Register a report section (``key`` defaults to the function's name)."""

    def decorate(fn: Callable[[ReportContext], str]) -> Callable[[ReportContext], str]:
        k = key or fn.__name__
        if k in SECTIONS:
            raise ValueError(f"report section {k!r} registered twice")
        SECTIONS[k] = Section(k, title, order, fn)
        return fn

    return decorate


def all_sections() -> list[Section]:
    """Every registered section, in order (imports every ``sec_*`` module once)."""
    for m in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if m.name.startswith("sec_"):
            importlib.import_module(f"{__package__}.{m.name}")
    return sorted(SECTIONS.values(), key=lambda s: s.order)
