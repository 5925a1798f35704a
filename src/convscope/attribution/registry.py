"""The one registry of attribution methods: name, family, options (type, default, bounds, help), pass
count, cheap preview settings and how a result is drawn.

``cs.attribute`` dispatches from it, the CLI builds ``--method`` choices and options from it, the report,
the web explorer (:meth:`MethodSpec.to_json`) and the tests iterate over it. A method module registers
its functions with :func:`register_method`::

    @register_method("smoothgrad", family="gradient", passes="samples x (1 forward + 1 backward)",
                     options={"samples": Option(int, 25, "noisy copies per image", minimum=1, maximum=4096)},
                     preview={"samples": 8})
    def smoothgrad(ctx: Context, samples: int) -> MethodOutput: ...

The function receives a :class:`~convscope.attribution.contract.Context` and the options (defaults
filled in, types and bounds checked) and returns a :class:`~convscope.attribution.contract.MethodOutput`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ConvscopeError, suggestion
from ..options import Option, OptionError
from .contract import MethodOutput

#: Families and the shape of ``raw`` each returns.
FAMILIES = {
    "gradient": "(N, C, H, W) at input size",
    "cam": "(N, h, w) at the layer's resolution",
    "perturbation": "(N, H, W) at input size",
}

#: How a result can be drawn: the map over the image, the map alone, the image with only its
#: important region kept, or (pixel methods) the signed attribution as an RGB image, grey at zero
#: (Springenberg et al.'s and Zeiler & Fergus's pictures).
VIEWS = ("overlay", "heatmap", "mask", "signed")

#: Largest seed any method accepts (NumPy's and torch's generators take 32-bit seeds everywhere).
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class MethodSpec:
    """One registered method. ``view``: how its result reads best (pixel-level gradient maps as a heatmap
    of their own, region maps over the image, ``drawn_as`` when the method's paper draws it otherwise, e.g.
    ``"signed"`` for guided backprop), ``cmap`` the colormap of its heatmap, ``preview``: cheaper option
    values for side-by-side previews (``explain --method all``, the report)."""

    name: str
    family: str
    fn: Callable[..., MethodOutput]
    options: dict[str, Option]
    passes: str
    uses_layer: bool
    paper: str
    summary: str
    preview: dict[str, Any] = field(default_factory=dict)
    drawn_as: str | None = None

    @property
    def view(self) -> str:
        if self.drawn_as is not None:
            return self.drawn_as
        return "heatmap" if self.family == "gradient" else "overlay"

    @property
    def cmap(self) -> str:
        return "inferno" if self.family == "gradient" else "jet"

    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def draw(self, a: Any, image: Any = None, *, view: str | None = None, alpha: float = 0.5,
             threshold: float = 0.5) -> Image.Image:
        """The picture of an :class:`~convscope.attribution.Attribution` of this method: ``view``
        ``"heatmap"``, ``"overlay"`` (on ``image``, default: the input), ``"mask"`` (map >= ``threshold``
        kept), ``"signed"`` (the raw pixel attribution as RGB, grey at zero; gradient family only) or
        ``None``/``"auto"``: the method's own :attr:`view`."""
        chosen = self.view if view in (None, "auto") else view
        if chosen == "signed":
            if self.family != "gradient":
                raise OptionError(f"view 'signed' draws pixel attributions; {self.name!r} gives a {self.family} map")
            return a.signed()
        if chosen == "heatmap":
            return a.heatmap(cmap=self.cmap)
        if chosen == "mask":
            return a.mask(image, threshold=threshold)
        if chosen == "overlay":
            return a.overlay(image, alpha=alpha)
        raise OptionError(f"view must be one of auto, {', '.join(VIEWS)}, got {view!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description (the web explorer builds its method forms from it)."""
        return {
            "name": self.name,
            "family": self.family,
            "passes": self.passes,
            "uses_layer": self.uses_layer,
            "summary": self.summary,
            "paper": self.paper,
            "view": self.view,
            "preview": dict(self.preview),
            "options": [{"name": key, **opt.to_json()} for key, opt in self.options.items()],
        }


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    family: str,
    passes: str,
    options: dict[str, Option] | None = None,
    uses_layer: bool = False,
    paper: str = "",
    preview: dict[str, Any] | None = None,
    view: str | None = None,
) -> Callable[[Callable[..., MethodOutput]], Callable[..., MethodOutput]]:
    """Decorator adding a method to :data:`METHODS` (names must be unique; ``preview`` values are
    checked against the options now, so a typo fails at import). ``view``: how the result is drawn by
    default when not the family's usual (one of :data:`VIEWS`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    if view is not None and view not in VIEWS:
        raise ValueError(f"view of {name!r} must be one of {', '.join(VIEWS)}, got {view!r}")
    opts = dict(options or {})
    cheap = dict(preview or {})
    for key, value in cheap.items():
        if key not in opts:
            raise ValueError(f"preview setting {key!r} of {name!r} is not one of its options")
        opts[key].check(key, value, name)

    def decorate(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        if name in METHODS:
            raise ValueError(f"attribution method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS[name] = MethodSpec(name, family, fn, opts, passes, uses_layer, paper, doc[0] if doc else "", cheap, view)
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    _load_all()
    if name not in METHODS:
        raise ConvscopeError(f"unknown attribution method {name!r}{suggestion(name, METHODS)}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_all()
    return list(METHODS)


def check_options(spec: MethodSpec, options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check names, types, choices and bounds of a method's options."""
    values = spec.defaults()
    for key, value in options.items():
        values[key] = _option(spec, key).check(key, value, spec.name)
    return values


def parse_option(spec: MethodSpec, text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (command line, web form) into the option's type and check its bounds."""
    if "=" not in text:
        raise OptionError(f"option {text!r} must look like key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    return key, _option(spec, key).parse(key, raw, spec.name)


def _option(spec: MethodSpec, key: str) -> Option:
    if key not in spec.options:
        valid = ", ".join(spec.options) or "none"
        raise OptionError(f"method {spec.name!r} has no option {key!r} (its options: {valid})")
    return spec.options[key]


def _load_all() -> None:
    """Import every method module once so their registrations run."""
    for m in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if m.name not in ("registry", "api", "contract", "result", "metrics"):
            importlib.import_module(f"{__package__}.{m.name}")
