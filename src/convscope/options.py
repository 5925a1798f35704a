"""Options with declared types, defaults, bounds and help: checked the same way by every front end.

An :class:`Option` says once what values an option takes: its type(s), default, a line of help, its
choices, and for numbers an inclusive ``minimum``/``maximum`` and whether it must be finite (NaN and
infinities are refused unless ``finite=False``). The Python API checks keyword values with
:meth:`Option.check`, the command line parses text with :meth:`Option.parse` (or uses
:meth:`Option.argtype` as an argparse ``type=``), and the web server does the same, so a value out of
range gets one message that names the option and its range wherever it comes from.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConvscopeError


class OptionError(ConvscopeError, ValueError):
    """An option value of the wrong type, out of its declared range, or not among its choices."""


#: Largest integer any option accepts unless it declares its own maximum (seeds, counts).
INT_LIMIT = 2**63 - 1

_ORDER = {bool: 0, int: 1, float: 2, str: 3}


@dataclass(frozen=True)
class Option:
    """One option: type(s), default, help, choices and (for numbers) inclusive bounds.

    ``minimum``/``maximum``: inclusive limits of int and float values (``None``: no limit, but ints
    never exceed :data:`INT_LIMIT`). ``finite``: refuse NaN and infinite floats (default).
    """

    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    finite: bool = True

    @property
    def types(self) -> tuple[type, ...]:
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def range_text(self) -> str:
        """The allowed values in words: ``"an int in 1..4096"``, ``"one of a, b"``, ``"a float >= 0"``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        kind = type_name(self.type)
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"{kind} in {_num(lo)}..{_num(hi)}"
        if lo is not None:
            return f"{kind} >= {_num(lo)}"
        if hi is not None:
            return f"{kind} <= {_num(hi)}"
        return kind

    def check(self, name: str, value: Any, owner: str = "") -> Any:
        """``value`` if it fits the type, choices and bounds; else an :class:`OptionError` naming the
        option (``owner``: the method or command it belongs to) and its range. ``None`` passes (default)."""
        if value is None or isinstance(value, torch.Tensor):
            return value
        where = f"option {name!r}" + (f" of {owner!r}" if owner else "")
        if not _fits(value, self.types):
            raise OptionError(f"{where} must be {self.range_text()}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and self.finite and not math.isfinite(value):
                raise OptionError(f"{where} must be a finite number ({self.range_text()}), got {value!r}")
            too_low = self.minimum is not None and value < self.minimum
            too_high = (self.maximum is not None and value > self.maximum) or (isinstance(value, int) and abs(value) > INT_LIMIT)
            if too_low or too_high:
                raise OptionError(f"{where} must be {self.range_text()}, got {value!r}")
        return value

    def parse(self, name: str, text: str, owner: str = "") -> Any:
        """Text (command line, web form) -> a checked value of the option's type. Bools take
        true/false/1/0/yes/no/on/off; with several types the first that parses wins (bool, int, float, str)."""
        raw = str(text).strip()
        for t in sorted(self.types, key=lambda t: _ORDER.get(t, 4)):
            if t is bool:
                low = raw.lower()
                if low in ("1", "true", "yes", "on"):
                    return self.check(name, True, owner)
                if low in ("0", "false", "no", "off"):
                    return self.check(name, False, owner)
                continue
            if t in (int, float, str):
                try:
                    value = t(raw)
                except (ValueError, OverflowError):
                    continue
                return self.check(name, value, owner)
        where = f"option {name!r}" + (f" of {owner!r}" if owner else "")
        raise OptionError(f"{where} must be {self.range_text()}, got {raw!r}")

    def argtype(self, name: str) -> Callable[[str], Any]:
        """An argparse ``type=`` that parses and checks, reporting the range in argparse's one-line error
        (``argument --steps: must be an int in 1..4096, got 0``: argparse names the option already)."""
        named = f"option {name!r} "

        def parse(text: str) -> Any:
            try:
                return self.parse(name, text)
            except OptionError as exc:
                message = str(exc)
                raise argparse.ArgumentTypeError(message.removeprefix(named)) from None

        parse.__name__ = type_name(self.type)
        parse.option = self  # type: ignore[attr-defined]  # lets tests and help texts read the bounds
        return parse

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description (the web explorer builds its forms from it)."""
        default = self.default if isinstance(self.default, (bool, int, float, str)) or self.default is None else str(self.default)
        return {
            "type": [t.__name__ for t in self.types],
            "default": default,
            "help": self.help,
            "choices": list(self.choices) if self.choices is not None else None,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "range": self.range_text(),
        }


def bounded(kind: type, minimum: float | None = None, maximum: float | None = None, *, name: str = "value",
            finite: bool = True) -> Callable[[str], Any]:
    """An argparse ``type=`` for a number in ``minimum..maximum`` (inclusive), e.g. ``bounded(int, 1, 4096)``."""
    return Option(kind, None, "", minimum=minimum, maximum=maximum, finite=finite).argtype(name)


def check_range(name: str, value: Any, kind: type, minimum: float | None = None, maximum: float | None = None) -> Any:
    """Check a function argument against bounds, raising :class:`OptionError` with its range."""
    return Option(kind, None, "", minimum=minimum, maximum=maximum).check(name, value)


def type_name(t: type | tuple[type, ...]) -> str:
    types = t if isinstance(t, tuple) else (t,)
    names = [x.__name__ for x in types]
    article = "an" if names[0][0] in "aeiou" else "a"
    return f"{article} " + " or ".join(names)


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"
