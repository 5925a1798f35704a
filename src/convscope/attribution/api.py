"""``cs.attribute``: one entry point for every attribution method (dispatch from the registry)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError, TargetError
from ..models import default_layer
from ..models.model import Model, as_model, resolve_class
from ..probe import guard, resolve_layer
from .contract import Context, MethodOutput
from .registry import MethodSpec, check_options, get_method
from .result import Attribution, display_map

__all__ = ["Context", "MethodOutput", "attribute", "model_for_input", "resolve_targets"]


def attribute(
    model: Any,
    x: Any,
    method: str = "gradcam",
    target: int | str | Sequence[int] | torch.Tensor | None = None,
    layer: str | None = None,
    *,
    progress: bool = True,
    **options: Any,
) -> Attribution:
    """Explain the prediction for each image of ``x`` with ``method`` (see ``convscope.attribution.METHODS``).

    ``model``: a :class:`~convscope.Model` or a plain ``nn.Module``. ``x``: a preprocessed tensor
    (N, 3, H, W) or, with a Model, an image (path, PIL, array, ``sample:NAME``). ``target``: one class
    per image (int, label, list or tensor); ``None`` explains each image's top prediction. ``layer``: for
    layer methods (CAM family), default: the model's last spatial layer. ``options``: the method's
    options (e.g. ``steps`` and ``baseline`` for integrated gradients), checked against their declared
    types and bounds. ``progress``: long loops draw a bar on a terminal. The user's model is left exactly
    as it was, also when the call fails.
    """
    spec = get_method(method)
    values = check_options(spec, options)
    model = model_for_input(model, x)
    xt = model.as_input(x).detach()
    with guard(model.module, eval=True, freeze=True, no_inplace=False):
        tgt = None if target is None else resolve_targets(target, xt.shape[0], model.labels).to(xt.device)
        layer_name = _layer_for(spec, model, layer)
        ctx = Context(model=model, x=xt, target=tgt, layer=layer_name, progress=progress)
        out = spec.fn(ctx, **values)
        tgt = ctx.resolve_target()  # every method so far chose its targets; this costs nothing then
    raw = out.raw.detach()
    display = out.extras.pop("map", None)
    if display is None:
        display = display_map(raw, spec.family, tuple(xt.shape[-2:]))
    return Attribution(
        method=spec.name,
        raw=raw,
        map=display.detach(),
        target=tgt.detach().cpu(),
        layer=layer_name,
        forward_passes=out.forward_passes + ctx.extra_forward_passes,
        backward_passes=out.backward_passes,
        options=values,
        extras=out.extras,
        input=xt,
        model=model,
    )


def model_for_input(model: Model | nn.Module, x: Any) -> Model:
    """:func:`~convscope.models.as_model` for a call on ``x``: a plain module is read at the input
    tensor's size (its layer table and class count), a :class:`Model` comes back as it is."""
    return as_model(model, input_size=tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) else None)


def resolve_targets(target: Any, n: int, labels: Sequence[str]) -> torch.Tensor:
    """One class index per image from an int, a label, a sequence or a tensor (a single value serves
    every image); checks each against the model's ``labels`` (range, names) and the batch length."""
    if isinstance(target, torch.Tensor):
        values = target.reshape(-1).tolist()
    elif isinstance(target, (list, tuple)):
        values = list(target)
    else:
        values = [target]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise TargetError(f"got {len(values)} targets for a batch of {n} images")
    return torch.tensor([resolve_class(v, list(labels)) for v in values], dtype=torch.long)


def _layer_for(spec: MethodSpec, model: Model, layer: str | None) -> str | None:
    if not spec.uses_layer:
        if layer is not None and spec.family == "gradient":
            raise ConvscopeError(f"method {spec.name!r} works on the input and takes no layer")
        return layer
    if layer is None:
        return default_layer(model)
    resolve_layer(model.module, layer)
    return layer
