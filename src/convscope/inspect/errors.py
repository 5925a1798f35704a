"""Errors of the inspection views (user-fixable, so both are :class:`~convscope.ConvscopeError`)."""

from __future__ import annotations

from ..errors import ConvscopeError


class LayerKindError(ConvscopeError, ValueError):
    """A layer that exists but does not fit the view: not a convolution for ``filters``, no feature maps
    (an (N, C, H, W) output) for ``feature_maps`` or ``channel_means``."""


class ViewOptionError(ConvscopeError, ValueError):
    """An option value a view cannot use (``depth=0``, ``max_filters=0``, an unknown ``sort``...)."""
