"""Attribution: why the network made this prediction (gradients, CAM family, perturbation, metrics).

Every method is one entry of :data:`METHODS` and is reached through :func:`attribute`. A method is a
function of a :class:`Context` returning a :class:`MethodOutput` (:mod:`.contract`), registered with
:func:`register_method` (:mod:`.registry`), which also says how its result is drawn and its preview
settings.
"""

from .api import attribute, model_for_input, resolve_targets
from .contract import Context, MethodOutput
from .gradients import CompletenessWarning
from .registry import METHODS, MethodSpec, Option, get_method, method_names, register_method
from .result import Attribution

__all__ = [
    "METHODS",
    "Attribution",
    "CompletenessWarning",
    "Context",
    "MethodOutput",
    "MethodSpec",
    "Option",
    "attribute",
    "get_method",
    "method_names",
    "model_for_input",
    "register_method",
    "resolve_targets",
]
