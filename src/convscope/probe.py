"""Reading and steering a network: layer addressing, the capture engine and the guard that restores the model.

- :func:`resolve_layer` turns a ``named_modules()`` name into the module (unknown names suggest close ones).
- :func:`layer_table` lists layers in forward order with output shape, parameters and receptive field.
- :class:`guard` snapshots everything convscope may touch (train/eval modes, ``requires_grad``, gradients,
  in-place flags) and restores it on exit, also after an exception or Ctrl-C.
- :class:`Capture` records activations (and gradients) at named layers, can stop the forward pass after
  the deepest one, and can replace the backward rule of chosen module types (guided backprop, DeconvNet).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .errors import InputShapeError, LayerNotFoundError, suggestion

# ============================================================================ layer addressing


def module_of(model: Any) -> nn.Module:
    """The ``nn.Module`` of a :class:`~convscope.Model` or a plain module."""
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a convscope Model or an nn.Module, got {type(model).__name__}")
    return module


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters (or, failing that, its buffers) live; the CPU for an empty module."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# ============================================================================ memory layout

#: Feed convolutional models channels-last (NHWC) inputs where that is faster: ``"auto"`` (on the CPU, where
#: oneDNN's convolutions run 1.6-1.9x faster in NHWC for EfficientNet-Lite0, forward and backward), ``True``
#: (every device) or ``False`` (never). The environment variable ``CONVSCOPE_CHANNELS_LAST=0`` turns it off.
CHANNELS_LAST: str | bool = "auto" if os.environ.get("CONVSCOPE_CHANNELS_LAST", "1") not in ("0", "false", "no") else False

_REJECTS_CHANNELS_LAST: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def wants_channels_last(module: nn.Module, x: Any) -> bool:
    """Whether :func:`forward_fast` would feed ``x`` to ``module`` in the channels-last layout."""
    if CHANNELS_LAST is False or module in _REJECTS_CHANNELS_LAST:
        return False
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point() and x.shape[1] > 1):
        return False
    return CHANNELS_LAST is True or x.device.type == "cpu"


def forward_fast(module: nn.Module, x: torch.Tensor, call: Callable[[torch.Tensor], Any] | None = None) -> Any:
    """``call(x)`` (default ``module(x)``) with ``x`` in the faster memory layout (see :data:`CHANNELS_LAST`).

    Values do not depend on the layout, only the speed does. A model whose forward cannot take it (a
    ``.view`` on convolutional features, say) is run on ``x`` as given, and remembered.
    """
    call = module if call is None else call
    if not wants_channels_last(module, x):
        return call(x)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    try:
        return call(nhwc)
    except RuntimeError as e:
        text = str(e)
        if "view" not in text and "stride" not in text and "contiguous" not in text:
            raise
        _REJECTS_CHANNELS_LAST.add(module)
        return call(x)


def layer_names(module: nn.Module) -> list[str]:
    """Every addressable layer name (those of ``named_modules()``, the root excluded)."""
    return [name for name, _ in module.named_modules() if name]


def resolve_layer(module: nn.Module, name: str | nn.Module) -> nn.Module:
    """The submodule called ``name``. Unknown names raise :class:`LayerNotFoundError` with close matches."""
    module = module_of(module)
    if isinstance(name, nn.Module):
        if any(m is name for m in module.modules()):
            return name
        raise LayerNotFoundError("the given module is not part of this model")
    modules = dict(module.named_modules())
    if name in modules and name:
        return modules[name]
    raise LayerNotFoundError(f"unknown layer {name!r}{suggestion(name, [n for n in modules if n])} (see `convscope summary`)")


def name_of(module: nn.Module, layer: nn.Module) -> str:
    for n, m in module.named_modules():
        if m is layer:
            return n
    raise LayerNotFoundError("the given module is not part of this model")


# ============================================================================ the guard


class guard:
    """Snapshot a module's mutable state and restore it on exit, whatever happened.

    Restores per-module ``training`` flags and ``inplace`` attributes, per-parameter ``requires_grad``
    and ``.grad``. Options applied on entry: ``eval`` (switch to eval mode), ``freeze`` (parameters stop
    requiring gradients, which makes input-gradient passes cheaper) and ``no_inplace`` (activations stop
    working in place, so captured tensors are not overwritten and tensor hooks are safe).
    """

    def __init__(self, module: nn.Module, *, eval: bool = True, freeze: bool = True, no_inplace: bool = True):
        self.module = module_of(module)
        self.options = (eval, freeze, no_inplace)
        self._saved: list[tuple[Any, ...]] | None = None

    def __enter__(self) -> nn.Module:
        modules = list(self.module.modules())
        params = list(self.module.parameters())
        self._saved = [
            [(m, m.training) for m in modules],
            [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)],
            [(p, p.requires_grad, p.grad) for p in params],
        ]
        try:
            eval_, freeze, no_inplace = self.options
            if eval_:
                self.module.eval()
            if freeze:
                for p in params:
                    p.requires_grad_(False)
            if no_inplace:
                for m, _ in self._saved[1]:
                    m.inplace = False
        except BaseException:
            self._restore()
            raise
        return self.module

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is None:
            return
        modes, inplace, params = self._saved
        for m, training in modes:
            m.training = training
        for m, flag in inplace:
            m.inplace = flag
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad
        self._saved = None


# ============================================================================ capture engine

BackwardRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``rule(input, output, grad_output) -> grad_input`` for an elementwise module."""


def guided_relu(inp: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Guided backprop through ReLU (Springenberg et al. 2015): pass the gradient where the input was
    positive AND the gradient is."""
    return grad.clamp(min=0) * (inp > 0)


def guided_relu6(inp: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Guided backprop through ReLU6: pass the gradient where 0 < input < 6 and the gradient is positive."""
    return grad.clamp(min=0) * ((inp > 0) & (inp < 6))


def deconv_relu(inp: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """DeconvNet (Zeiler & Fergus 2014): ReLU applied to the backward signal, ignoring the forward mask."""
    return grad.clamp(min=0)


#: Backward rules of guided backpropagation: ReLU and ReLU6 modules and their functional calls
#: (``F.relu``, ``torch.relu``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``). Both rules are idempotent, so an
#: ``nn.ReLU`` whose forward calls ``F.relu`` is unaffected by getting the rule twice.
GUIDED_RULES: dict[type | str, BackwardRule] = {nn.ReLU: guided_relu, nn.ReLU6: guided_relu6, "relu": guided_relu, "relu6": guided_relu6}
#: Backward rules of the DeconvNet, for the same modules and functional calls.
DECONV_RULES: dict[type | str, BackwardRule] = {nn.ReLU: deconv_relu, nn.ReLU6: deconv_relu, "relu": deconv_relu, "relu6": deconv_relu}

#: Names of the backward-rule sets: the one place that says how each gradient variant treats ReLUs.
RULE_SETS: dict[str, dict[type | str, BackwardRule] | None] = {
    "gradient": None,
    "guided": GUIDED_RULES,
    "deconvnet": DECONV_RULES,
}


def backward_rules(kind: str) -> dict[type | str, BackwardRule] | None:
    """The backward rules of ``kind`` (``"gradient"``: none, ``"guided"``, ``"deconvnet"``) for :class:`Capture`.

    Attribution methods and dataset projections both take their rules from here, so ``explain --method
    guided_backprop`` and ``topk --project guided`` treat a model the same way.
    """
    if kind not in RULE_SETS:
        raise ValueError(f"unknown backward rule set {kind!r}; choose {', '.join(RULE_SETS)}")
    return RULE_SETS[kind]


#: Max-pooling modules: the only place where a DeconvNet's backward pass depends on the image (the
#: "switches"; Zeiler & Fergus 2014). Convolutions and the ReLU-on-the-signal rule do not.
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class NoSwitchesWarning(UserWarning):
    """DeconvNet on a network without max-pooling: the projection does not depend on the image."""


def max_pooling_layers(module: nn.Module) -> list[str]:
    """Names of the max-pooling modules of ``module`` (functional ``F.max_pool2d`` calls are not seen)."""
    return [name for name, m in module.named_modules() if isinstance(m, MAX_POOLS)]


def no_switches_note(module: nn.Module) -> str | None:
    """A sentence saying DeconvNet cannot depend on the image here, or ``None`` when the model max-pools.

    Zeiler & Fergus's projections differ per image through the max-pooling switches; with ReLU applied to
    the backward signal, transposed convolutions and eval-mode batch norm, a network without max-pooling
    (EfficientNet-Lite, most modern CNNs) sends the same signal down for every image (only other
    nonlinearities, e.g. SiLU or squeeze-excitation gates, and the image border bring in the image), so
    every projection of a unit is nearly the same pattern. Guided backpropagation masks by the forward
    activations and depends on the image."""
    if max_pooling_layers(module):
        return None
    return ("the model has no max-pooling, so DeconvNet projections do not depend on the image (no switches; "
            "Zeiler & Fergus's differ through them): use guided backpropagation for image-specific projections")


class _RewiredBackward(torch.autograd.Function):
    """Identity on the module's output in the forward pass; the rule's gradient to its input in backward."""

    @staticmethod
    def forward(ctx, inp: torch.Tensor, out: torch.Tensor, rule: BackwardRule) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inp, out)
        ctx.rule = rule
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inp, out = ctx.saved_tensors
        return ctx.rule(inp, out, grad), None, None


class _StopForward(Exception):
    """Raised by a capture hook once every requested layer has been seen (``stop=True``)."""


class Capture:
    """Record activations at named layers; optionally their gradients, an early stop and backward rules.

    Use as a context manager; on exit every hook is removed and the guard restores the model::

        with Capture(model, ["layer4"], grads=True) as cap:
            out = cap.forward(x)
            out[0, 281].backward()
        cap.activations["layer4"], cap.gradients["layer4"]

    ``grads=True`` keeps the captured activations in the autograd graph inside the context (so
    ``torch.autograd.grad`` can be taken with respect to them; on exit they are detached) and registers tensor hooks that store their gradients. ``stop=True``
    ends the forward pass after the last requested layer has run; :meth:`forward` then returns ``None``.
    ``rules`` maps module types (e.g. ``nn.ReLU``) to a :data:`BackwardRule` applied to every module of
    that type; string keys ``"relu"`` and ``"relu6"`` apply the rule to functional calls too
    (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``, in-place variants
    included) made during :meth:`forward`, so models that never use activation modules are covered. ``edit`` maps a layer name to ``fn(output) -> output`` to change an activation (ablation,
    masking). The guard options (``eval``, ``freeze``, ``no_inplace``) are passed on to :class:`guard`.
    """

    def __init__(
        self,
        model: Any,
        layers: Iterable[str] | str = (),
        *,
        grads: bool = False,
        stop: bool = False,
        rules: Mapping[type, BackwardRule] | None = None,
        edit: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        freeze: bool = True,
    ):
        self.module = module_of(model)
        self.layer_names = [layers] if isinstance(layers, str) else list(layers)
        self._targets = {name: resolve_layer(self.module, name) for name in self.layer_names}
        self._edits = {name: (resolve_layer(self.module, name), fn) for name, fn in (edit or {}).items()}
        self.grads = grads
        self.stop = stop
        rules = dict(rules or {})
        unknown = [k for k in rules if isinstance(k, str) and k not in FUNCTIONAL_ACTIVATIONS]
        if unknown:
            raise ValueError(f"unknown functional activation {unknown[0]!r} (known: {', '.join(FUNCTIONAL_ACTIVATIONS)})")
        self.rules = {k: r for k, r in rules.items() if not isinstance(k, str)}
        self.functional_rules = {k: r for k, r in rules.items() if isinstance(k, str)}
        self.activations: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        self._guard = guard(self.module, eval=True, freeze=freeze, no_inplace=True)

    # -- context management
    def __enter__(self) -> Capture:
        self._guard.__enter__()
        try:
            self._register()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        # keep the values, drop the autograd graph: nothing of the forward pass outlives the context
        for name, act in list(self.activations.items()):
            self.activations[name] = act.detach()
        self._guard.__exit__(None, None, None)

    # -- hooks
    def _register(self) -> None:
        for layer, fn in self._edits.values():
            self._handles.append(layer.register_forward_hook(_edit_hook(fn)))
        if self.rules:
            types = tuple(self.rules)
            for m in self.module.modules():
                if isinstance(m, types):
                    rule = next(r for t, r in self.rules.items() if isinstance(m, t))
                    self._handles.append(m.register_forward_hook(_rule_hook(rule)))
        for name, layer in self._targets.items():
            self._handles.append(layer.register_forward_hook(self._record_hook(name)))

    def _record_hook(self, name: str):
        activations, calls, grads = self.activations, self.calls, self.grads
        names, stop, grad_hook = self.layer_names, self.stop, self._grad_hook(name)

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            out = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            calls[name] = calls.get(name, 0) + 1
            if out is None:
                raise InputShapeError(f"layer {name!r} does not output a tensor")
            if grads and out.requires_grad:
                activations[name] = out
                out.register_hook(grad_hook)
            else:
                activations[name] = out.detach()
            if stop and all(n in activations for n in names):
                raise _StopForward

        return hook

    def _grad_hook(self, name: str):
        store = self.gradients  # not ``self``: a tensor hook that holds the capture would keep the graph alive

        def hook(grad: torch.Tensor) -> None:
            store[name] = grad.detach()

        return hook

    # -- running
    def forward(self, x: torch.Tensor) -> Any:
        """Run the module on ``x``; returns its output, or ``None`` when stopped early."""
        self.activations.clear()
        self.gradients.clear()
        self.calls.clear()
        if self.grads and isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # parameters are frozen: the graph must start at the input
        mode = _FunctionalRules(self.functional_rules) if self.functional_rules else contextlib.nullcontext()
        try:
            with mode:
                return self.module(x)
        except _StopForward:
            return None


#: Functional activations a backward rule can be attached to, by the ``torch`` function names they cover.
FUNCTIONAL_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "relu": ("relu", "relu_"),
    "relu6": ("relu6", "hardtanh", "hardtanh_"),
}


class _FunctionalRules(TorchFunctionMode):
    """Applies backward rules to functional activation calls (not only to activation modules)."""

    def __init__(self, rules: Mapping[str, BackwardRule]):
        super().__init__()
        self.by_function = {fn: rules[key] for key, fns in FUNCTIONAL_ACTIVATIONS.items() if key in rules for fn in fns}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        rule = self.by_function.get(name)
        if rule is None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        if name.startswith("hardtanh"):
            low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            if (low, high) != (0.0, 6.0):
                return func(*args, **kwargs)
        inp = args[0]
        if name.endswith("_") or kwargs.get("inplace") or (name == "relu" and len(args) > 1 and args[1] is True):
            # compute out of place so the input survives for the rule
            out = torch.clamp(inp, 0, 6) if "6" in name or name.startswith("hardtanh") else torch.relu(inp)
        else:
            out = func(*args, **kwargs)
        if not inp.requires_grad:
            return out
        return _RewiredBackward.apply(inp, out.detach(), rule)


def _edit_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        return fn(output)

    return hook


def _rule_hook(rule: BackwardRule):
    def hook(_module: nn.Module, args: tuple, output: Any) -> Any:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return None
        inp = args[0]
        if not (inp.requires_grad or output.requires_grad):
            return None
        return _RewiredBackward.apply(inp, output.detach(), rule)

    return hook


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


# ============================================================================ layer table


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one unit of a layer, in input pixels, per axis (height, width).

    ``size``: pixels that can influence one unit; ``stride``: input pixels between neighbouring units;
    ``start``: centre of the first unit's field (negative when it reaches into padding). ``size`` is
    ``None`` when the layer's units see the whole image (after global pooling).
    """

    size: tuple[int, int] | None
    stride: tuple[float, float]
    start: tuple[float, float]

    @property
    def is_global(self) -> bool:
        return self.size is None

    def __str__(self) -> str:
        if self.size is None:
            return "global"
        (sh, sw), (jh, jw) = self.size, self.stride
        size = f"{sh}" if sh == sw else f"{sh}x{sw}"
        stride = f"{jh:g}" if jh == jw else f"{jh:g}x{jw:g}"
        return f"{size} /{stride}"

    def box(self, y: int, x: int, clip: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """Input box (top, left, bottom, right), end exclusive, that unit (y, x) sees."""
        if self.size is None:
            return (0, 0, clip[0], clip[1]) if clip else (0, 0, 0, 0)
        cy = self.start[0] + y * self.stride[0]
        cx = self.start[1] + x * self.stride[1]
        top = math.floor(cy - (self.size[0] - 1) / 2)
        left = math.floor(cx - (self.size[1] - 1) / 2)
        bottom, right = top + self.size[0], left + self.size[1]
        if clip:
            top, left = max(top, 0), max(left, 0)
            bottom, right = min(bottom, clip[0]), min(right, clip[1])
        return top, left, bottom, right


GLOBAL = ReceptiveField(None, (0.0, 0.0), (0.0, 0.0))


@dataclass
class LayerInfo:
    """One row of the layer table."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    trainable: int
    receptive_field: ReceptiveField | None
    depth: int
    is_leaf: bool
    calls: int = 1

    @property
    def channels(self) -> int | None:
        s = self.output_shape
        return s[1] if s is not None and len(s) >= 2 else None

    @property
    def is_spatial(self) -> bool:
        s = self.output_shape
        return s is not None and len(s) == 4 and s[2] * s[3] > 1

    def __str__(self) -> str:
        return self.name


class _ReceptiveFieldMode(TorchFunctionMode):
    """Follows receptive fields through every torch call of a forward pass (functional ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[int, ReceptiveField | None] = {}
        self._keep: list[torch.Tensor] = []

    def seed(self, x: torch.Tensor) -> None:
        self._set(x, ReceptiveField((1, 1), (1.0, 1.0), (0.0, 0.0)))

    def field(self, t: torch.Tensor) -> ReceptiveField | None:
        return self.fields.get(id(t))

    def _set(self, t: torch.Tensor, rf: ReceptiveField | None) -> None:
        self._keep.append(t)
        self.fields[id(t)] = rf

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("__get__", "dim", "size", "_assert", "__len__", "shape"):
            return out
        inputs = [a for a in _tensors_in(args) if id(a) in self.fields]
        outputs = _tensors_in(out)
        if not inputs or not outputs:
            return out
        rf = self._propagate(name, args, kwargs, inputs, outputs[0])
        for o in outputs:
            if o.is_floating_point() or o.dtype == torch.bool:
                self._set(o, rf)
        return out

    def _propagate(self, name: str, args, kwargs, inputs, out) -> ReceptiveField | None:
        first = self.fields[id(inputs[0])]
        if any(self.fields[id(t)] is GLOBAL for t in inputs):
            return GLOBAL
        if out.ndim < 3 or (out.ndim == 4 and out.shape[-1] == 1 and out.shape[-2] == 1 and name != "conv2d"):
            return GLOBAL if first is not None else None
        if first is None:
            return None
        x = args[0] if args else None
        if name in ("conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices", "lp_pool2d") and isinstance(x, torch.Tensor):
            return _window_field(name, first, args, kwargs)
        if name == "pad":
            pad = kwargs.get("pad", args[1] if len(args) > 1 else (0, 0))
            left = pad[0] if len(pad) > 0 else 0
            top = pad[2] if len(pad) > 2 else 0
            return ReceptiveField(first.size, first.stride, (first.start[0] - top * first.stride[0], first.start[1] - left * first.stride[1]))
        if isinstance(x, torch.Tensor) and x.ndim == 4 and out.ndim == 4 and out.shape[-2:] != x.shape[-2:]:
            return None  # resampling or cropping we do not model
        fields = [self.fields[id(t)] for t in inputs if t.ndim == out.ndim]
        if any(f is None for f in fields):
            return None
        return max(fields, key=lambda f: f.size[0] * f.size[1])  # residual sums, concatenations


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _window_field(name: str, rf: ReceptiveField, args: Sequence, kwargs: Mapping) -> ReceptiveField | None:
    def arg(i: int, key: str, default: Any) -> Any:
        return kwargs.get(key, args[i] if len(args) > i else default)

    if name == "conv2d":
        kernel = tuple(args[1].shape[-2:]) if len(args) > 1 else tuple(kwargs["weight"].shape[-2:])
        stride, padding, dilation = arg(3, "stride", 1), arg(4, "padding", 0), arg(5, "dilation", 1)
    else:
        kernel = _pair(arg(1, "kernel_size", 1))
        stride = arg(2, "stride", None) or kernel
        padding = arg(3, "padding", 0)
        dilation = arg(4, "dilation", 1) if name.startswith("max") else 1
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # 'same' with stride 1
            padding = tuple(dilation[i] * (kernel[i] - 1) // 2 for i in range(2))
    padding = _pair(padding)
    size, jump, start = [], [], []
    for i in range(2):
        k = dilation[i] * (kernel[i] - 1) + 1
        size.append(rf.size[i] + (k - 1) * int(rf.stride[i]))
        start.append(rf.start[i] + ((k - 1) / 2 - padding[i]) * rf.stride[i])
        jump.append(rf.stride[i] * stride[i])
    return ReceptiveField((size[0], size[1]), (jump[0], jump[1]), (start[0], start[1]))


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors_in(o)]
    return []


def layer_table(model: Any, input_shape: Sequence[int] = (1, 3, 224, 224)) -> list[LayerInfo]:
    """Every named layer in forward order with output shape, parameters and receptive field (one dry run).

    Layers that never run in ``forward`` come last with ``output_shape=None``. Receptive fields follow
    convolutions, pooling and padding through every operation of the forward pass, functional calls and
    residual additions included; ``None`` where a resampling op makes them undefined.
    """
    module = module_of(model)
    names = dict(module.named_modules())
    order: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    fields: dict[str, ReceptiveField | None] = {}
    calls: dict[str, int] = {}
    mode = _ReceptiveFieldMode()
    handles = []

    def pre_hook_for(name: str):
        def pre_hook(_m: nn.Module, _args: Any) -> None:
            if name not in calls:  # forward order by first call: a parent comes before its children
                order.append(name)

        return pre_hook

    def hook_for(name: str):
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            out = _first_tensor(output)
            calls[name] = calls.get(name, 0) + 1
            if name not in shapes:
                shapes[name] = tuple(out.shape) if out is not None else None
                fields[name] = mode.field(out) if out is not None else None

        return hook

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    with guard(module, eval=True, freeze=True, no_inplace=True):
        try:
            for name, m in names.items():
                if name:
                    handles.append(m.register_forward_pre_hook(pre_hook_for(name)))
                    handles.append(m.register_forward_hook(hook_for(name)))
            x = torch.zeros(tuple(input_shape), device=device, dtype=dtype)
            with torch.no_grad(), mode:
                mode.seed(x)
                module(x)
        finally:
            for h in handles:
                h.remove()
    rows = []
    for name in order + [n for n in names if n and n not in shapes]:
        m = names[name]
        params = sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        shape = shapes.get(name)
        rf = fields.get(name)
        if shape is not None and len(shape) < 3:
            rf = GLOBAL
        rows.append(
            LayerInfo(
                name=name,
                type=type(m).__name__,
                output_shape=shape,
                params=params,
                trainable=trainable,
                receptive_field=rf,
                depth=name.count(".") + 1,
                is_leaf=not any(True for _ in m.children()),
                calls=calls.get(name, 0),
            )
        )
    return rows


#: Layer kinds :func:`choose_layer` knows: the last spatial layer (CAM methods, feature maps) and the first convolution.
LAYER_KINDS = ("cam", "first_conv")


def choose_layer(rows: Sequence[LayerInfo], kind: str = "cam") -> str:
    """A sensible layer for a method family, from a layer table (``Model.layers()``).

    ``kind="cam"``: the last layer whose output is spatial (more than 1x1) and has the most channels at
    that resolution, preferring a top-level module, e.g. ``bn2`` on EfficientNet-Lite0, ``layer4`` on
    ResNet, ``features`` on VGG. ``kind="first_conv"``: the first ``Conv2d``.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; choose {', '.join(LAYER_KINDS)}")
    if kind == "first_conv":
        for r in rows:
            if r.type in ("Conv2d", "Conv2dSame"):
                return r.name
        raise LayerNotFoundError("the model has no Conv2d layer")
    spatial = [r for r in rows if r.is_spatial and r.output_shape is not None]
    if not spatial:
        raise LayerNotFoundError("the model has no layer with a spatial output")
    last = spatial[-1]
    same = [r for r in spatial if r.output_shape[2:] == last.output_shape[2:] and r.output_shape[1] == last.output_shape[1]]
    # among layers producing the same final tensor shape, the shallowest name (top-level module) is the clearest
    same = [r for r in same if "Pool" not in r.type] or same
    top = [r for r in same if r.depth == min(s.depth for s in same)]
    return top[-1].name
