"""Inspection views: each an API function returning a result object that shows itself as a picture.

- :func:`summary` -> :class:`Summary`: layer table (output shape, parameters, receptive field), totals.
- :func:`filters` -> :class:`FilterSet`: a convolution's kernels, their norms, near-zero (dead) filters.
- :func:`feature_maps` -> :class:`FeatureMaps`: one layer's output for one image, as a grid.
- :func:`channel_means` -> :class:`ChannelResponse`: mean activation of every channel, per image.
- :func:`filter_health` -> :class:`FilterHealth` / :class:`ModelHealth`: dead and aliased (high-frequency)
  filters of one convolution or of every one.
"""

from __future__ import annotations

from ..errors import LayerKindError, ViewOptionError
from .channels import ChannelResponse, channel_means
from .diagnostics import FilterHealth, ModelHealth, aliasing_scores, filter_health
from .features import FeatureMaps, feature_maps, layer_output, stage_layers
from .filters import DEAD_FRACTION, FilterSet, conv_layers, dead_filters, filters
from .summary import Summary, summary

__all__ = [
    "ChannelResponse",
    "FeatureMaps",
    "FilterHealth",
    "FilterSet",
    "ModelHealth",
    "aliasing_scores",
    "filter_health",
    "LayerKindError",
    "Summary",
    "ViewOptionError",
    "channel_means",
    "conv_layers",
    "feature_maps",
    "filters",
    "dead_filters",
    "DEAD_FRACTION",
    "layer_output",
    "stage_layers",
    "summary",
]
