"""The one registry of attribution methods: name, family, options (type, default, help) and pass count.

``cs.attribute`` dispatches from it, the CLI builds ``--method`` choices and options from it, the report
and tests iterate over it. A method module registers its functions with :func:`register_method`::

    @register_method("saliency", family="gradient", passes="1 forward + 1 backward",
                     options={"abs": Option(bool, False, "absolute value of the gradient")})
    def saliency(ctx: Context, abs: bool) -> MethodOutput: ...

The function receives a :class:`~convscope.attribution.api.Context` and the options (defaults filled in,
types checked) and returns a :class:`MethodOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConvscopeError, suggestion
from ..options import Option, OptionError

#: Families and the shape of ``raw`` each returns.
FAMILIES = {
    "gradient": "(N, C, H, W) at input size",
    "cam": "(N, h, w) at the layer's resolution",
    "perturbation": "(N, H, W) at input size",
}


@dataclass
class MethodOutput:
    """What a method function returns: the raw tensor, pass counts and method-specific extras."""

    raw: torch.Tensor
    forward_passes: int
    backward_passes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    fn: Callable[..., MethodOutput]
    options: dict[str, Option]
    passes: str
    uses_layer: bool
    paper: str
    summary: str

    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    family: str,
    passes: str,
    options: dict[str, Option] | None = None,
    uses_layer: bool = False,
    paper: str = "",
) -> Callable[[Callable[..., MethodOutput]], Callable[..., MethodOutput]]:
    """Decorator adding a method to :data:`METHODS` (names must be unique)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")

    def decorate(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        if name in METHODS:
            raise ValueError(f"attribution method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS[name] = MethodSpec(name, family, fn, dict(options or {}), passes, uses_layer, paper, doc[0] if doc else "")
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
    unknown = [k for k in options if k not in spec.options]
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise OptionError(f"method {spec.name!r} has no option {unknown[0]!r} (its options: {valid})")
    values = spec.defaults()
    for key, value in options.items():
        values[key] = spec.options[key].check(key, value, spec.name)
    return values


def parse_option(spec: MethodSpec, text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (command line, web form) into the option's type and check its bounds."""
    if "=" not in text:
        raise OptionError(f"option {text!r} must look like key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if key not in spec.options:
        valid = ", ".join(spec.options) or "none"
        raise OptionError(f"method {spec.name!r} has no option {key!r} (its options: {valid})")
    return key, spec.options[key].parse(key, raw, spec.name)


def _load_all() -> None:
    """Import every method module once so their registrations run."""
    import importlib
    import pkgutil

    from .. import attribution

    for m in pkgutil.iter_modules(attribution.__path__):
        if m.name not in ("registry", "api", "result", "metrics"):
            importlib.import_module(f"{attribution.__name__}.{m.name}")
