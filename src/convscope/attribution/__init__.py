"""Attribution: why the network made this prediction (gradients, CAM family, perturbation, metrics).

Every method is one entry of :data:`METHODS` and is reached through :func:`attribute`.
"""

from .api import Context, attribute, resolve_targets
from .registry import METHODS, MethodOutput, MethodSpec, Option, get_method, method_names, register_method
from .result import Attribution

__all__ = [
    "METHODS",
    "Attribution",
    "Context",
    "MethodOutput",
    "MethodSpec",
    "Option",
    "attribute",
    "get_method",
    "method_names",
    "register_method",
    "resolve_targets",
]
