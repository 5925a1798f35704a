"""convscope: a microscope for convolutional networks.

Load a model (``load_model``), read images (``load_image``, ``sample_image``), look inside
(``summary``, ``filters``, ``feature_maps``, ``channel_means``), explain predictions (``attribute``)
and render results (``convscope.render``). See the README for a tour.
"""

from __future__ import annotations

from .attribution import Attribution, attribute
from .errors import (
    ConvscopeError,
    ImageError,
    InputShapeError,
    LayerNotFoundError,
    ModelLoadError,
    TargetError,
    UnsafeModelFileError,
)
from .images import SAMPLES, load_image, sample_image
from .inspect import (
    ChannelResponse,
    FeatureMaps,
    FilterSet,
    Summary,
    channel_means,
    feature_maps,
    filters,
    summary,
)
from .models import Model, Prediction, as_model, default_layer, load_model
from .probe import Capture, LayerInfo, ReceptiveField, guard, layer_table, resolve_layer
from .synthesis import adversarial, visualize

__version__ = "0.1.0"

__all__ = [
    "SAMPLES",
    "ChannelResponse",
    "FeatureMaps",
    "FilterSet",
    "Summary",
    "channel_means",
    "feature_maps",
    "filters",
    "summary",
    "adversarial",
    "visualize",
    "Attribution",
    "as_model",
    "attribute",
    "Capture",
    "ConvscopeError",
    "ImageError",
    "InputShapeError",
    "LayerInfo",
    "LayerNotFoundError",
    "Model",
    "ModelLoadError",
    "Prediction",
    "ReceptiveField",
    "TargetError",
    "UnsafeModelFileError",
    "__version__",
    "default_layer",
    "guard",
    "layer_table",
    "load_image",
    "load_model",
    "resolve_layer",
    "sample_image",
]
