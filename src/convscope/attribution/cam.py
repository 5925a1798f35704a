"""The CAM family: one capture of a layer's activations A (N, K, h, w) (and, for gradient variants, the
gradient G = dS_c/dA of the target logit), then a per-variant strategy that weights the channels.

Every map is ``ReLU(sum_k w_k A_k)`` with ``w`` (N, K) from the variant, except HiResCAM and LayerCAM
whose weights are per position, CAM (Zhou et al.) which keeps its sign, and Eigen-CAM (a projection):

- ``cam`` (Zhou et al. 2016): ``w_k`` = the linear classifier's weight of class c (GAP + linear heads).
- ``gradcam`` (Selvaraju et al. 2017): ``w_k = mean_ij G_kij``.
- ``gradcam++`` (Chattopadhay et al. 2018): ``w_k = sum_ij a_kij ReLU(G_kij)``,
  ``a = G^2 / (2 G^2 + sum_ij A_kij * G^3)`` (the exponential-score closed form).
- ``xgradcam`` (Fu et al. 2020): ``w_k = sum_ij G_kij A_kij / sum_ij A_kij``.
- ``hirescam`` (Draelos & Carin 2020): ``sum_k G_k * A_k`` elementwise.
- ``layercam`` (Jiang et al. 2021): ``sum_k ReLU(G_k) * A_k`` elementwise.
- ``scorecam`` (Wang et al. 2020): ``w = softmax_k S_c(x * M_k)``, ``M_k`` = A_k upsampled (bilinear,
  corner-aligned, as pytorch-grad-cam) and min-max scaled to [0, 1]. Channels with identical masks (e.g. the constant ones,
  whose mask is all zero) share one forward pass.
- ``ablationcam`` (Desai & Ramaswamy 2020): ``w_k = (S_c - S_c(A with channel k zeroed)) / S_c``. Only the
  network after the layer runs for each ablation, and all-zero channels need no pass (zeroing them
  changes nothing).
- ``eigencam`` (Muhammad & Yeasin 2020): the positions' centred activations projected on their first
  principal component, sign chosen so the map correlates positively with the channel-mean activation.
- ``guided_gradcam``: guided backpropagation times the upsampled, [0, 1]-scaled Grad-CAM map (pixel level).

``raw`` is (N, h, w) at the layer's resolution (``guided_gradcam``: (N, C, H, W)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvscopeError, InputShapeError
from ..models.model import output_logits
from ..probe import GUIDED_RULES, Capture, forward_fast
from .contract import Context, MethodOutput
from .gradients import input_gradients
from .registry import Option, register_method
from .result import minmax

# ============================================================================ the capture


@dataclass
class LayerCapture:
    """One pass through the network with the layer's activation (and gradient) recorded."""

    activations: torch.Tensor  # (N, K, h, w), values as the layer produced them
    gradients: torch.Tensor | None  # (N, K, h, w): dS_c/dA, or None
    logits: torch.Tensor | None  # (N, classes), or None when the pass stopped at the layer
    target: torch.Tensor | None  # (N,)


def capture_layer(ctx: Context, *, grads: bool = False, stop: bool = False) -> LayerCapture:
    """Run ``ctx.x`` through the network once, keeping the activation of ``ctx.layer``.

    ``grads=True``: the activation becomes a leaf of the autograd graph, so the backward pass of the
    target logit stops at the layer (cheaper than a full backward) and gives G = dS_c/dA. ``stop=True``:
    the forward pass ends right after the layer (no logits). A layer that runs several times in one
    forward pass gives its last run.
    """
    if ctx.layer is None:
        raise ConvscopeError("CAM methods need a layer")
    seen: list[torch.Tensor] = []

    def keep(out: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(out, torch.Tensor):
            raise InputShapeError(f"layer {ctx.layer!r} does not output a single tensor; pick another layer")
        _check_spatial(ctx.layer, out)
        if grads:
            leaf = out.detach().requires_grad_(True)
            seen.append(leaf)
            return leaf.clone()  # later in-place ops (x += shortcut) touch the clone, not the leaf
        seen.append(out.detach().clone())
        return None

    layers = [ctx.layer] if stop else []
    with Capture(ctx.module, layers, stop=stop, edit={ctx.layer: keep}) as cap, torch.set_grad_enabled(grads):
        out = forward_fast(ctx.module, ctx.x, cap.forward)
        if not seen:
            raise ConvscopeError(f"layer {ctx.layer!r} did not run in the forward pass")
        if out is None:
            return LayerCapture(seen[-1], None, None, None)
        logits = output_logits(out)
        target = ctx.choose_target(logits)
        gradients = None
        if grads:
            score = logits.gather(1, target.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(score, seen[-1], allow_unused=True)
            if gradients is None:
                raise ConvscopeError(f"the class score does not depend on layer {ctx.layer!r}")
    return LayerCapture(seen[-1].detach(), gradients, logits.detach(), target)


def _check_spatial(name: str, out: torch.Tensor) -> None:
    if out.ndim != 4 or out.shape[-1] * out.shape[-2] <= 1:
        raise InputShapeError(
            f"layer {name!r} has output shape {tuple(out.shape)}: CAM methods need a spatial layer (N, C, h, w) "
            "with more than one position; pick a convolutional layer (see `convscope summary`)"
        )


def weighted_sum(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k w_k A_k): (N, K, h, w) and (N, K) -> (N, h, w)."""
    return torch.einsum("nk,nkhw->nhw", weights, activations).clamp(min=0)


# ============================================================================ gradient strategies

Strategy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``strategy(A, G) -> raw map (N, h, w)``."""


def gradcam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (N, h, w): ReLU(sum_k w_k A_k) with w_k the spatial mean of dS_c/dA_k (S_c: target logit)."""
    return weighted_sum(a, g.mean(dim=(2, 3)))


def gradcam_pp_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (N, h, w): channel weights sum_ij alpha_kij ReLU(dS_c/dA_kij) with the closed-form alpha.

    alpha = G^2 / (2 G^2 + sum_ij(A_k) G^3)."""
    g2 = g * g
    g3 = g2 * g
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(g != 0, g2 / (denom + 1e-7), torch.zeros_like(g))
    return weighted_sum(a, (alpha * g.clamp(min=0)).sum(dim=(2, 3)))


def xgradcam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (N, h, w): channel weights sum_ij G_kij A_kij / sum_ij A_kij."""
    w = (g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + 1e-7)
    return weighted_sum(a, w)


def hirescam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM (N, h, w): ReLU(sum_k dS_c/dA_k * A_k), elementwise (no spatial averaging of the gradient)."""
    return (g * a).sum(dim=1).clamp(min=0)


def layercam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM (N, h, w): ReLU(sum_k ReLU(dS_c/dA_k) * A_k)."""
    return (g.clamp(min=0) * a).sum(dim=1).clamp(min=0)


def gradient_cam(strategy: Strategy) -> Callable[[Context], MethodOutput]:
    """A CAM method from a channel-weighting ``strategy``: one capture of A and G = dS_c/dA at the layer
    (1 forward + 1 backward down to the layer), then ``strategy(A, G)``."""

    def method(ctx: Context) -> MethodOutput:
        cap = capture_layer(ctx, grads=True)
        return MethodOutput(raw=strategy(cap.activations, cap.gradients), forward_passes=1, backward_passes=1)

    method.__doc__ = strategy.__doc__
    return method


# name, strategy, paper: each method's summary is its strategy's first docstring line
for _name, _strategy, _paper in (
    ("gradcam", gradcam_map, "Selvaraju et al. 2017, Grad-CAM"),
    ("gradcam++", gradcam_pp_map, "Chattopadhay et al. 2018, Grad-CAM++"),
    ("xgradcam", xgradcam_map, "Fu et al. 2020, Axiom-based Grad-CAM"),
    ("hirescam", hirescam_map, "Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM"),
    ("layercam", layercam_map, "Jiang et al. 2021, LayerCAM"),
):
    register_method(_name, family="cam", passes="1 forward + 1 backward (down to the layer only)", uses_layer=True,
                    paper=_paper)(gradient_cam(_strategy))


# ============================================================================ CAM (Zhou et al.)


def _classifier_for(module: nn.Module, channels: int) -> nn.Linear:
    linear = [m for m in module.modules() if isinstance(m, nn.Linear) and m.in_features == channels]
    if not linear:
        raise ConvscopeError(
            f"cam needs global average pooling followed by one linear layer with {channels} inputs after the "
            "chosen layer; this model has none (use gradcam, which works for any head)"
        )
    return linear[-1]


@register_method("cam", family="cam", passes="1 forward", uses_layer=True,
                 paper="Zhou et al. 2016, Learning Deep Features for Discriminative Localization")
def cam(ctx: Context) -> MethodOutput:
    """Class activation map (N, h, w): sum_k W[c, k] A_k with W the linear classifier after global average
    pooling, signed. Checked: the map's spatial mean plus the bias must equal the target logit."""
    cap = capture_layer(ctx)
    a = cap.activations
    fc = _classifier_for(ctx.module, a.shape[1])
    w = fc.weight.detach()[cap.target].to(a.dtype)
    raw = torch.einsum("nk,nkhw->nhw", w, a)
    bias = fc.bias.detach()[cap.target] if fc.bias is not None else torch.zeros_like(raw[:, 0, 0])
    predicted = raw.mean(dim=(1, 2)) + bias
    actual = cap.logits.gather(1, cap.target.view(-1, 1)).squeeze(1)
    if not torch.allclose(predicted, actual, rtol=1e-3, atol=1e-3 * (1 + actual.abs().max().item())):
        raise ConvscopeError(
            f"cam needs layer {ctx.layer!r} to feed global average pooling and one linear classifier directly "
            "(the class score is not the mean of the map); use gradcam for other heads"
        )
    return MethodOutput(raw=raw, forward_passes=1)


# ============================================================================ Eigen-CAM


def first_component_projection(a: torch.Tensor) -> torch.Tensor:
    """Per image, the positions' centred activation vectors (hw, K) projected on their first right singular
    vector, (N, h, w); the sign makes the map correlate positively with the channel-mean activation."""
    n, k, h, w = a.shape
    m = a.reshape(n, k, h * w).transpose(1, 2).double()  # (N, hw, K)
    m = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    proj = m @ vh[:, 0, :].unsqueeze(-1)  # (N, hw, 1)
    proj = proj.squeeze(-1)
    mean_act = a.reshape(n, k, h * w).mean(dim=1).double()
    mean_act = mean_act - mean_act.mean(dim=1, keepdim=True)
    sign = torch.sign((proj * mean_act).sum(dim=1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj * sign.unsqueeze(1)).reshape(n, h, w).to(a.dtype)


@register_method("eigencam", family="cam", passes="1 forward (up to the layer)", uses_layer=True,
                 paper="Muhammad & Yeasin 2020, Eigen-CAM")
def eigencam(ctx: Context) -> MethodOutput:
    """Eigen-CAM (N, h, w): projection of the layer's centred activations on their first principal component.
    Class-agnostic: the target does not change the map."""
    cap = capture_layer(ctx)
    return MethodOutput(raw=first_component_projection(cap.activations), forward_passes=1)


# ============================================================================ Score-CAM


def normalized_maps(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each channel min-max scaled over its positions: (A - min) / (max - min + eps), (N, K, h, w)."""
    flat = a.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(a)


@register_method(
    "scorecam",
    family="cam",
    passes="1 forward + 1 per distinct channel mask",
    uses_layer=True,
    options={"batch_size": Option(int, 16, "masked images per forward pass", minimum=1, maximum=4096)},
    paper="Wang et al. 2020, Score-CAM",
)
def scorecam(ctx: Context, batch_size: int) -> MethodOutput:
    """Score-CAM (N, h, w): ReLU(sum_k w_k A_k), w = softmax over channels of the target logit of x * M_k,
    M_k = A_k upsampled (bilinear, corners aligned) to the input and min-max scaled to [0, 1].

    Upsampling is linear, so the mask depends only on the channel's min-max scaled map: channels whose
    scaled maps are equal (all
    constant channels, whose mask is zero, and e.g. channels active at a single identical position) are
    scored by one forward pass. ``extras["distinct_masks"]`` (N,) counts the passes per image.
    """
    cap = capture_layer(ctx)
    a = cap.activations
    x = ctx.x
    n, k = a.shape[:2]
    target = cap.target
    norm = normalized_maps(a.float())
    size = tuple(x.shape[-2:])
    weights = torch.empty(n, k, device=a.device, dtype=torch.float32)
    distinct = []
    total = 0
    with torch.inference_mode():
        for i in range(n):
            unique, inverse = torch.unique(norm[i].flatten(1), dim=0, return_inverse=True)
            distinct.append(unique.shape[0])
            maps = unique.view(-1, 1, *a.shape[-2:])
            scores = torch.empty(unique.shape[0], device=a.device, dtype=torch.float32)
            starts = range(0, unique.shape[0], batch_size)
            for s in ctx.bar(starts, desc=f"scorecam {i + 1}/{n}"):
                masks = normalized_maps(F.interpolate(maps[s : s + batch_size], size=size, mode="bilinear", align_corners=True))
                logits = ctx.logits(x[i : i + 1] * masks.to(x.dtype))
                scores[s : s + batch_size] = logits[:, target[i]].float()
            total += unique.shape[0]
            weights[i] = torch.softmax(scores[inverse], dim=0)
    raw = weighted_sum(a.float(), weights).to(a.dtype)
    return MethodOutput(
        raw=raw,
        forward_passes=1 + math.ceil(total / n),
        extras={"distinct_masks": torch.tensor(distinct), "weights": weights.cpu()},
    )


# ============================================================================ Ablation-CAM


def is_shape_mismatch(exc: RuntimeError) -> bool:
    """True for torch's size/shape mismatch errors (a batch that does not broadcast through the rest of
    the network), False for out-of-memory (CUDA's ``OutOfMemoryError``, the CPU allocator's "can't
    allocate memory") and anything else."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    text = str(exc).lower()
    if "out of memory" in text or "allocate" in text:
        return False
    return "size" in text or "shape" in text


def _tail_runner(ctx: Context) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``run(i, acts)`` -> logits (B, classes) of image i with the layer's output replaced by ``acts``
    (B, K, h, w). Runs the layers before ``ctx.layer`` once on the single image and lets the batch of
    replaced activations broadcast through the rest (residual additions broadcast); when the architecture
    does not allow that, the image is repeated B times instead."""
    broadcast_ok = [True]

    def run(i: int, acts: torch.Tensor) -> torch.Tensor:
        b = acts.shape[0]
        with Capture(ctx.module, edit={ctx.layer: lambda _out: acts}):
            if broadcast_ok[0]:
                try:
                    logits = ctx.logits(ctx.x[i : i + 1])
                    if logits.shape[0] == b:
                        return logits
                except RuntimeError as exc:
                    if not is_shape_mismatch(exc):
                        raise  # out of memory, or a real failure: never retried with a B times larger batch
                broadcast_ok[0] = False
            return ctx.logits(ctx.x[i : i + 1].expand(b, *ctx.x.shape[1:]))

    return run


@register_method(
    "ablationcam",
    family="cam",
    passes="1 forward + 1 pass of the layers after the layer per non-zero channel",
    uses_layer=True,
    options={"batch_size": Option(int, 32, "ablated copies per forward pass", minimum=1, maximum=4096)},
    paper="Desai & Ramaswamy 2020, Ablation-CAM",
)
def ablationcam(ctx: Context, batch_size: int) -> MethodOutput:
    """Ablation-CAM (N, h, w): ReLU(sum_k w_k A_k), w_k = (S_c - S_c^k) / S_c where S_c^k is the target logit
    with channel k of the layer set to zero. Channels that are already zero keep S_c^k = S_c (w_k = 0)
    without a pass. ``extras["ablated"]`` (N,) counts the ablations run per image."""
    cap = capture_layer(ctx)
    a = cap.activations
    target = cap.target
    base = cap.logits.gather(1, target.view(-1, 1)).squeeze(1)
    n, k = a.shape[:2]
    run = _tail_runner(ctx)
    weights = torch.zeros(n, k, device=a.device, dtype=torch.float32)
    counts = []
    with torch.no_grad():
        for i in range(n):
            active = (a[i].flatten(1) != 0).any(dim=1).nonzero().squeeze(1)
            counts.append(int(active.numel()))
            scores = torch.empty(active.numel(), device=a.device, dtype=torch.float32)
            starts = range(0, active.numel(), batch_size)
            for s in ctx.bar(starts, desc=f"ablationcam {i + 1}/{n}"):
                chans = active[s : s + batch_size]
                acts = a[i : i + 1].repeat(chans.numel(), 1, 1, 1)
                acts[torch.arange(chans.numel(), device=a.device), chans] = 0
                scores[s : s + batch_size] = run(i, acts)[:, target[i]].float()
            s0 = base[i].float()
            s0 = s0 if s0.abs() > 1e-12 else s0.new_tensor(1e-12)
            weights[i, active] = (s0 - scores) / s0
    raw = weighted_sum(a.float(), weights).to(a.dtype)
    return MethodOutput(
        raw=raw,
        forward_passes=1 + math.ceil(sum(counts) / n),
        extras={"ablated": torch.tensor(counts), "weights": weights.cpu()},
    )


# ============================================================================ Guided Grad-CAM


@register_method("guided_gradcam", family="gradient", passes="2 forward + 2 backward", uses_layer=True,
                 options={"batch_size": Option(int, 16, "images per guided backprop pass", minimum=1, maximum=4096)},
                 paper="Selvaraju et al. 2017, Grad-CAM (guided Grad-CAM)")
def guided_gradcam(ctx: Context, batch_size: int) -> MethodOutput:
    """Guided Grad-CAM (N, C, H, W): guided backpropagation times the Grad-CAM map upsampled bilinearly to the
    input and scaled to [0, 1] per image. ``extras["gradcam"]``: the Grad-CAM raw map (N, h, w)."""
    cap = capture_layer(ctx, grads=True)
    heat = gradcam_map(cap.activations, cap.gradients)
    up = F.interpolate(heat.unsqueeze(1).float(), size=tuple(ctx.x.shape[-2:]), mode="bilinear", align_corners=False)
    up = minmax(up.squeeze(1)).to(ctx.x.dtype)
    guided, _ = input_gradients(ctx, ctx.x, cap.target, rules=GUIDED_RULES, batch_size=batch_size, desc="guided backprop")
    return MethodOutput(raw=guided * up.unsqueeze(1), forward_passes=2, backward_passes=2, extras={"gradcam": heat})
