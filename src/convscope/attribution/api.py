"""``cs.attribute``: one entry point for every attribution method (dispatch from the registry)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError, InputShapeError, TargetError
from ..models.model import check_input, output_logits, resolve_class
from ..probe import default_layer, forward_fast, guard, layer_table, module_of, resolve_layer
from .registry import MethodSpec, check_options, get_method
from .result import Attribution, display_map


class Context:
    """What a method function gets: the module, the validated input batch, one target per image, the layer.

    ``target`` is (N,) class indices. When the caller asked for the top prediction (``target=None``),
    it is found lazily: a method that runs its own forward pass on ``x`` calls :meth:`choose_target`
    with those logits and saves a pass; otherwise the first read of ``target`` costs one forward pass
    (counted in ``extra_forward_passes``).
    """

    def __init__(
        self,
        module: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        layer: str | None = None,
        model: Any = None,
        batch_size: int = 32,
    ):
        self.module = module
        self.x = x
        self._target = None if target is None else target.to(x.device)
        self.layer = layer
        self.model = model
        self.batch_size = batch_size
        self.extra_forward_passes = 0

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def target(self) -> torch.Tensor:
        """The class explained for each image, (N,) long on the input's device."""
        if self._target is None:
            with torch.no_grad():
                logits = self.logits(self.x)
            self.extra_forward_passes += 1
            self._target = logits.argmax(dim=1)
        return self._target

    @target.setter
    def target(self, value: torch.Tensor) -> None:
        self._target = value.to(self.x.device)

    @property
    def target_known(self) -> bool:
        """True when the targets are fixed (given by the caller or already chosen)."""
        return self._target is not None

    def choose_target(self, logits: torch.Tensor) -> torch.Tensor:
        """The targets, taking the top class of ``logits`` (the method's own pass on ``x``) when none was given."""
        if self._target is None:
            self._target = logits.detach().argmax(dim=1)
        return self._target

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of a batch (with the autograd graph when grad is enabled)."""
        return output_logits(forward_fast(self.module, x))

    def target_scores(self, logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The score of each image's target class, shape (N,)."""
        t = self.target if target is None else target
        return logits.gather(1, t.view(-1, 1).to(logits.device)).squeeze(1)


def attribute(
    model: Any,
    x: Any,
    method: str = "gradcam",
    target: int | str | Sequence[int] | torch.Tensor | None = None,
    layer: str | None = None,
    **options: Any,
) -> Attribution:
    """Explain the prediction for each image of ``x`` with ``method`` (see ``convscope.attribution.METHODS``).

    ``model``: a :class:`~convscope.Model` or a plain ``nn.Module``. ``x``: a preprocessed tensor
    (N, 3, H, W) or, with a Model, an image (path, PIL, array, ``sample:NAME``). ``target``: one class
    per image (int, label, list or tensor); ``None`` explains each image's top prediction. ``layer``: for
    layer methods (CAM family), default: the model's last spatial layer. ``options``: the method's
    options (e.g. ``steps`` and ``baseline`` for integrated gradients). The user's model is left
    exactly as it was, also when the call fails.
    """
    spec = get_method(method)
    values = check_options(spec, options)
    module = module_of(model)
    wrapped = model if not isinstance(model, nn.Module) else None
    if wrapped is not None:
        xt = wrapped.as_input(x)
    else:
        if not isinstance(x, torch.Tensor):
            raise InputShapeError("with a plain nn.Module, pass a preprocessed tensor (N, C, H, W)")
        xt = check_input(x, channels=None)
        device = next((p.device for p in module.parameters()), xt.device)
        xt = xt.to(device)
    xt = xt.detach()
    with guard(module, eval=True, freeze=True, no_inplace=False):
        tgt = None
        if target is not None:
            num_classes = _num_classes(wrapped, module, xt)
            tgt = resolve_targets(target, xt.shape[0], num_classes, getattr(wrapped, "labels", None)).to(xt.device)
        layer_name = _layer_for(spec, model, module, layer, xt)
        ctx = Context(module=module, x=xt, target=tgt, layer=layer_name, model=wrapped)
        out = spec.fn(ctx, **values)
        tgt = ctx.target
        extra_forward = ctx.extra_forward_passes
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
        forward_passes=out.forward_passes + extra_forward,
        backward_passes=out.backward_passes,
        options=values,
        extras=out.extras,
        input=xt,
        model=wrapped,
    )


def resolve_targets(target: Any, n: int, num_classes: int | None, labels: Sequence[str] | None = None) -> torch.Tensor:
    """One class index per image from an int, a label, a sequence or a tensor; checks range and length."""
    if isinstance(target, torch.Tensor):
        values = target.reshape(-1).tolist()
    elif isinstance(target, (list, tuple)):
        values = list(target)
    else:
        values = [target] * n
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise TargetError(f"got {len(values)} targets for a batch of {n} images")
    if labels is not None:
        indices = [resolve_class(v, list(labels)) for v in values]
    else:
        indices = []
        for v in values:
            if isinstance(v, (str, bool)) or (not isinstance(v, int) and not hasattr(v, "__index__")):
                raise TargetError(f"target {v!r} must be a class index with a plain module")
            v = int(v)
            if num_classes is not None and not 0 <= v < num_classes:
                raise TargetError(f"class index {v} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
            indices.append(v)
    return torch.tensor(indices, dtype=torch.long)


def _num_classes(wrapped: Any, module: nn.Module, x: torch.Tensor) -> int | None:
    if wrapped is not None:
        return len(wrapped.labels)
    with torch.no_grad():
        return int(output_logits(module(x[:1])).shape[1])


def _layer_for(spec: MethodSpec, model: Any, module: nn.Module, layer: str | None, x: torch.Tensor) -> str | None:
    if not spec.uses_layer:
        if layer is not None and spec.family == "gradient":
            raise ConvscopeError(f"method {spec.name!r} works on the input and takes no layer")
        return layer
    if layer is None:
        return default_layer(model if not isinstance(model, nn.Module) else _TableView(module, x))
    resolve_layer(module, layer)
    return layer


class _TableView:
    """Lets :func:`default_layer` use the layer table of a plain module at the input's size."""

    def __init__(self, module: nn.Module, x: torch.Tensor):
        self.module = module
        self._shape = (1, *x.shape[1:])

    def layers(self):
        return layer_table(self.module, self._shape)
