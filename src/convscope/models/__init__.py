"""Models: the built-in EfficientNet-Lite0, torchvision and timm architectures, local files, any module."""

from .labels import imagenet_labels
from .loaders import builtin_module, load_model, pick_device, wrap_module
from .model import (
    PLAIN_MODULE_DEFAULTS,
    Model,
    Prediction,
    as_model,
    check_input,
    count_classes,
    default_layer,
    model_fingerprint,
    output_logits,
    resolve_class,
    same_model,
)

__all__ = [
    "PLAIN_MODULE_DEFAULTS",
    "Model",
    "as_model",
    "count_classes",
    "model_fingerprint",
    "same_model",
    "default_layer",
    "Prediction",
    "builtin_module",
    "check_input",
    "imagenet_labels",
    "load_model",
    "output_logits",
    "pick_device",
    "resolve_class",
    "wrap_module",
]
