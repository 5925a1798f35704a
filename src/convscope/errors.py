"""Exceptions convscope raises for problems a user can fix.

Every error a user can cause (a bad image, an unknown layer, an unsafe model file, a class index out
of range) is a :class:`ConvscopeError`. The command line prints such errors as one line and exits
with code 2; anything else is a bug and exits with code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConvscopeError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class ImageError(ConvscopeError, ValueError):
    """An image could not be read or is not usable."""


class ModelLoadError(ConvscopeError, RuntimeError):
    """A model could not be built or its weights could not be loaded."""


class UnsafeModelFileError(ModelLoadError):
    """A model file needs pickle execution, which the user has not allowed."""


class LayerNotFoundError(ConvscopeError, KeyError):
    """A layer name that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class LayerKindError(ConvscopeError, ValueError):
    """A layer that exists but does not fit the view or analysis: not a convolution for ``filters``, no
    feature maps (an (N, C, H, W) output) for ``feature_maps``, ``channel_means`` or a dataset analysis."""


class ViewOptionError(ConvscopeError, ValueError):
    """An option value a view cannot use (``depth=0``, ``max_filters=0``, an unknown ``sort``...)."""


class TargetError(ConvscopeError, ValueError):
    """A class index or target that does not fit the model or the batch."""


class InputShapeError(ConvscopeError, ValueError):
    """A tensor whose shape, dtype or values the method cannot use."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Names among ``candidates`` that look like ``name`` (best first)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(found) < n:  # also offer names that contain the query, e.g. "conv" -> "conv_stem"
        found += [c for c in candidates if name and name in c and c not in found][: n - len(found)]
    return found


def suggestion(name: str, candidates: Iterable[str]) -> str:
    """A ``"; did you mean a, b?"`` suffix, or an empty string when nothing is close."""
    found = close_matches(name, candidates)
    return f"; did you mean {', '.join(found)}?" if found else ""
