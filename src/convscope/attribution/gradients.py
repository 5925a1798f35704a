"""Gradient methods: one engine (the target score's gradient with respect to the input, batched), with
optional backward rules for ReLU-like modules and a post-processing per method.

- ``saliency`` (Simonyan et al. 2014): ``dS_c/dx``, signed, (N, C, H, W).
- ``gradient_x_input`` (Shrikumar et al. 2016): ``x * dS_c/dx``.
- ``integrated_gradients`` (Sundararajan et al. 2017): ``(x - x') * integral_0^1 dS_c/dx(x' + a (x - x')) da``.
- ``smoothgrad`` (Smilkov et al. 2017): the mean of a gradient method over noisy copies of ``x``.
- ``guided_backprop`` (Springenberg et al. 2015) and ``deconvnet`` (Zeiler & Fergus 2014): the gradient
  with the backward rule of every ReLU / ReLU6, module (``nn.ReLU``) or functional call (``F.relu``),
  replaced (the probe's :data:`GUIDED_RULES`, :data:`DECONV_RULES`), applied through :class:`convscope.probe.Capture`, which turns in-place
  activations off for the call and restores them.

``S_c`` is always the pre-softmax score (logit) of the target class. Passes are counted per image.
Parameter gradients are never computed (the guard freezes parameters; ``torch.autograd.grad`` is taken
with respect to the input only). Long loops show a tqdm bar on a terminal (``progress=False``: never)
and can be interrupted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConvscopeError, InputShapeError
from ..probe import (
    DECONV_RULES,
    GUIDED_RULES,
    BackwardRule,
    Capture,
    NoSwitchesWarning,
    backward_rules,
    deconv_relu,
    guided_relu,
    guided_relu6,
    max_pooling_layers,
    no_switches_note,
)
from .contract import Context, MethodOutput
from .registry import SEED_MAX, Option, register_method

_RULES: dict[str, dict[type | str, BackwardRule] | None] = {
    "saliency": backward_rules("gradient"),
    "gradient_x_input": backward_rules("gradient"),
    "guided_backprop": backward_rules("guided"),
    "deconvnet": backward_rules("deconvnet"),
}


# ============================================================================ the engine


def input_gradients(
    ctx: Context,
    inputs: torch.Tensor,
    target: torch.Tensor | None,
    *,
    rules: dict[type | str, BackwardRule] | None = None,
    batch_size: int = 16,
    desc: str = "gradients",
    bar: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each row's target logit with respect to that row of ``inputs`` (M, C, H, W).

    Runs ``ceil(M / batch_size)`` forward + backward passes. ``target``: (M,) classes, or ``None`` to
    use each row's top prediction (only sensible when ``inputs`` is ``ctx.x``; the choice is recorded in
    ``ctx``). ``rules`` replace backward rules of ReLU-like modules and functional calls for the call.
    ``bar``: show a progress bar over the batches (off when the caller shows its own).
    Returns the gradients (M, C, H, W) and the targets used (M,).
    """
    m = inputs.shape[0]
    grads = torch.empty_like(inputs)
    used = torch.empty(m, dtype=torch.long, device=inputs.device)
    starts = range(0, m, batch_size)
    capture = Capture(ctx.module, rules=rules) if rules else nullcontext()
    with capture as cap, torch.enable_grad():
        # through the capture's forward, so rules for functional calls (F.relu) apply as well as module rules
        forward = cap.forward if cap is not None else None
        for s in (ctx.bar(starts, desc=desc) if bar else starts):
            xb = inputs[s : s + batch_size].detach().requires_grad_(True)
            logits = ctx.logits(xb, forward)
            if target is None:
                tb = logits.detach().argmax(1)
            else:
                tb = target[s : s + batch_size]
            score = logits.gather(1, tb.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(score, xb)
            grads[s : s + batch_size] = g
            used[s : s + batch_size] = tb
    if target is None and inputs is ctx.x:
        ctx.target = used
    return grads, used


# ============================================================================ plain gradients


_BATCH = Option(int, 16, "images per forward/backward pass (bounds memory)", minimum=1, maximum=4096)


def _plain_gradient(name: str, times_input: bool) -> Callable[..., MethodOutput]:
    """The method ``name``: the input gradient under the method's backward rules (times ``x`` for
    gradient x input), one forward + one backward pass per image."""

    def method(ctx: Context, batch_size: int) -> MethodOutput:
        g, _ = input_gradients(ctx, ctx.x, ctx.target, rules=_RULES[name], batch_size=batch_size, desc=name.replace("_", " "))
        extras = {}
        note = no_switches_note(ctx.module) if name == "deconvnet" else None
        if note is not None:
            extras["note"] = note
            warnings.warn(note, NoSwitchesWarning, stacklevel=3)
        return MethodOutput(raw=g * ctx.x if times_input else g, forward_passes=1, backward_passes=1, extras=extras)

    method.__name__ = name
    return method


# name, times the input, paper, summary: the rules come from the probe (:data:`_RULES`)
for _name, _times_input, _paper, _summary in (
    ("saliency", False, "Simonyan, Vedaldi & Zisserman 2014, Deep Inside Convolutional Networks",
     "Vanilla gradient dS_c/dx of the target logit, signed (N, C, H, W); shown as max |.| over channels."),
    ("gradient_x_input", True, "Shrikumar et al. 2016, Not Just a Black Box",
     "Input times gradient, x * dS_c/dx (N, C, H, W): a first-order Taylor contribution of each input value."),
    ("guided_backprop", False, "Springenberg et al. 2015, Striving for Simplicity: The All Convolutional Net",
     "Guided backpropagation (N, C, H, W): the input gradient where every ReLU/ReLU6 (module or functional call) "
     "passes back only positive gradients at positions where its input was active (0 < x, and x < 6 for ReLU6)."),
    ("deconvnet", False, "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks",
     "DeconvNet reconstruction (N, C, H, W): backpropagation where every ReLU/ReLU6 (module or functional call) "
     "applies a ReLU to the backward signal instead of masking it by the forward activation."),
):
    _method = _plain_gradient(_name, _times_input)
    _method.__doc__ = _summary
    # guided backprop and DeconvNet are drawn as their papers draw them: signed RGB, grey at zero
    register_method(_name, family="gradient", passes="1 forward + 1 backward", options={"batch_size": _BATCH},
                    paper=_paper, view="signed" if _name in ("guided_backprop", "deconvnet") else None)(_method)


# ============================================================================ integrated gradients

#: Quadrature rules of the path integral (names as in Captum).
IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def quadrature(steps: int, rule: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``alpha`` in [0, 1] and weights summing to 1 for ``integral_0^1 f(a) da ~ sum w_i f(alpha_i)``."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.tensor(0.5 * (nodes + 1)), torch.tensor(0.5 * weights)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ConvscopeError("the trapezoid rule needs at least 2 steps")
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return torch.linspace(0, 1, steps, dtype=torch.float64), w
    w = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "riemann_left":
        return torch.linspace(0, 1 - 1 / steps, steps, dtype=torch.float64), w
    if rule == "riemann_right":
        return torch.linspace(1 / steps, 1, steps, dtype=torch.float64), w
    if rule == "riemann_middle":
        return torch.linspace(0.5 / steps, 1 - 0.5 / steps, steps, dtype=torch.float64), w
    raise ConvscopeError(f"unknown integration rule {rule!r}; valid: {', '.join(IG_RULES)}")


def make_baseline(ctx: Context, baseline: str | float | torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The reference input x' of integrated gradients, same shape as ``ctx.x``.

    ``"zero"``: all zeros in the model's input space (Captum's default); ``"black"``: a black image (pixel
    value 0 through the model's normalisation, a plain module's being the documented default of
    :func:`convscope.models.as_model`; zeros for inputs without three channels); ``"blur"``: ``x`` blurred with
    a Gaussian of sigma = min(H, W) / 20 pixels (radius floor(3 sigma)); ``"noise"``: uniform random pixels
    (seeded); a number: that constant; a tensor: broadcast to ``x``'s shape.
    """
    x = ctx.x
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(device=x.device, dtype=x.dtype)
        try:
            b = b.expand_as(x) if b.shape != x.shape else b
        except RuntimeError:
            raise InputShapeError(f"baseline of shape {tuple(baseline.shape)} does not fit input {tuple(x.shape)}") from None
        if not torch.isfinite(b).all():
            raise InputShapeError("baseline holds NaN or infinite values")
        return b
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    model = ctx.model
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "black":
        return model.from_pixels(torch.zeros_like(x)) if x.shape[1] == 3 else torch.zeros_like(x)
    if baseline == "noise":
        g = torch.Generator(device="cpu").manual_seed(seed)
        pixels = torch.rand(x.shape, generator=g).to(device=x.device, dtype=x.dtype)
        if x.shape[1] == 3:
            return model.from_pixels(pixels)
        return pixels * (x.amax() - x.amin()) + x.amin()
    if baseline == "blur":
        sigma = min(x.shape[-2:]) / 20
        return gaussian_blur(x, sigma, radius=int(3 * sigma))
    raise ConvscopeError(f"unknown baseline {baseline!r}; use zero, black, blur, noise, a number or a tensor")


def gaussian_blur(x: torch.Tensor, sigma: float, *, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of a batch (N, C, H, W) with standard deviation ``sigma`` pixels and reflected
    borders. ``radius``: the kernel's half-width in pixels (default ceil(3 sigma)), limited to 1..side - 1."""
    radius = math.ceil(3 * sigma) if radius is None else radius
    radius = max(1, min(radius, x.shape[-1] - 1, x.shape[-2] - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class CompletenessWarning(UserWarning):
    """Integrated gradients stopped at its step cap before completeness reached the tolerance."""


#: Rules whose points at n intervals are all among the points at 2n: refining reuses every gradient.
NESTED_RULES = ("riemann_trapezoid", "riemann_left", "riemann_right")
#: Points of the first adaptive level (intervals of the nested rules).
ADAPTIVE_START = 16


@register_method(
    "integrated_gradients",
    family="gradient",
    passes="steps x (1 forward + 1 backward) + 2 forward; adaptive by default (steps doubled until completeness "
           "is within tolerance, at most max_steps)",
    options={
        "steps": Option(int, None, "fixed number of points on the path from the baseline to the input "
                        "(unset: adaptive, see tolerance and max_steps)", minimum=1, maximum=4096),
        "tolerance": Option(float, 0.05, "adaptive mode: largest completeness error |sum(attr) - (S(x) - S(x'))| / "
                            "|S(x) - S(x')| accepted", minimum=0.0, maximum=1.0),
        "max_steps": Option(int, 512, "adaptive mode: most points on the path (a warning says when reached)",
                            minimum=2, maximum=4096),
        "baseline": Option((str, float, torch.Tensor), "black", "zero, black, blur, noise, a number or a tensor",
                           minimum=-1000.0, maximum=1000.0),
        "rule": Option(str, None, "quadrature rule of the path integral (unset: gausslegendre with fixed steps, "
                       "riemann_trapezoid when adaptive, whose refinements reuse every earlier point)", IG_RULES),
        "batch_size": _BATCH,
        "seed": Option(int, 0, "seed of the noise baseline", minimum=0, maximum=SEED_MAX),
    },
    paper="Sundararajan, Taly & Yan 2017, Axiomatic Attribution for Deep Networks",
    preview={"max_steps": 65},
)
def integrated_gradients(ctx: Context, steps: int | None, tolerance: float, max_steps: int,
                         baseline: str | float | torch.Tensor, rule: str | None, batch_size: int, seed: int) -> MethodOutput:
    """Integrated gradients (N, C, H, W): (x - x') * sum_i w_i dS_c/dx(x' + alpha_i (x - x')).

    Completeness says the attributions sum to S_c(x) - S_c(x'); ``extras["completeness_error"]`` (N,)
    is |sum(attr) - (S_c(x) - S_c(x'))| / |S_c(x) - S_c(x')|, ``extras["delta"]`` the signed gap,
    ``extras["steps"]`` (N,) the points used per image. With ``steps`` given, exactly that many points
    (``rule`` default Gauss-Legendre, as Captum). Without (the default), the number of points is chosen
    per image: start at 16 intervals and double until the error is at most ``tolerance`` or the next
    level would exceed ``max_steps`` points; then a :class:`CompletenessWarning` is issued and
    ``extras["converged"]`` is False for that image. The trapezoid rule (adaptive default) and the left and
    right Riemann rules reuse every earlier gradient when doubling (a level of n intervals costs n/2 new
    passes); Gauss-Legendre and the midpoint rule recompute every point at each level. Points are batched
    ``batch_size`` at a time.
    """
    x = ctx.x
    n = x.shape[0]
    base = make_baseline(ctx, baseline, seed)
    with torch.no_grad():  # endpoints: the completeness check (and the top class when not given)
        ends = ctx.logits(torch.cat([x, base]))
    target = ctx.choose_target(ends[:n])
    gap = ctx.target_scores(ends[:n], target) - ctx.target_scores(ends[n:], target)
    diff = x - base
    if steps is not None:
        avg = _ig_fixed(ctx, base, diff, target, steps, rule or "gausslegendre", batch_size)
        raw = diff * avg
        used = torch.full((n,), steps)
        passes = steps
        converged = None
    else:
        raw, used, passes, converged = _ig_adaptive(ctx, base, diff, target, gap, tolerance, max_steps,
                                                    rule or "riemann_trapezoid", batch_size)
    delta = raw.flatten(1).sum(1) - gap
    error = delta.abs() / gap.abs().clamp(min=1e-12)
    extras = {"completeness_error": error.detach().cpu(), "delta": delta.detach().cpu(), "score_gap": gap.detach().cpu(),
              "baseline": base, "steps": used}
    if converged is not None:
        extras["converged"] = converged
        extras["tolerance"] = tolerance
        if not bool(converged.all()):
            worst = float(error[~converged.to(error.device)].max())
            warnings.warn(
                f"integrated gradients reached max_steps={max_steps} with completeness error {worst:.1%} > "
                f"tolerance {tolerance:.1%}; raise max_steps or use a closer baseline", CompletenessWarning, stacklevel=2)
    return MethodOutput(raw=raw, forward_passes=passes + 2, backward_passes=passes, extras=extras)


def _ig_fixed(ctx: Context, base: torch.Tensor, diff: torch.Tensor, target: torch.Tensor, steps: int, rule: str,
              batch_size: int) -> torch.Tensor:
    """sum_i w_i dS_c/dx(x' + alpha_i (x - x')) over ``steps`` points of ``rule``, shape of ``diff``."""
    alphas, weights = quadrature(steps, rule)
    return _path_gradient_sum(ctx, base, diff, target, alphas, weights, batch_size)


def _path_gradients(ctx: Context, base: torch.Tensor, diff: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor,
                    batch_size: int, bar: bool = True) -> torch.Tensor:
    """Gradients (K, N, C, H, W) of the target logits at the K path points ``alphas`` of every image (for a few
    points: the path's two ends)."""
    k, shape = len(alphas), base.shape
    a = alphas.to(device=base.device, dtype=base.dtype).view(-1, 1, 1, 1, 1)
    path = base.unsqueeze(0) + a * diff.unsqueeze(0)  # rows ordered (step, image): row j*n + i
    g, _ = input_gradients(ctx, path.reshape(-1, *shape[1:]), target.repeat(k), batch_size=batch_size,
                           desc="integrated gradients", bar=bar)
    return g.view(k, *shape)


def _path_gradient_sum(ctx: Context, base: torch.Tensor, diff: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor,
                       weights: torch.Tensor, batch_size: int) -> torch.Tensor:
    """sum_i weights_i * gradient at path point alphas_i, shape of ``base``. The path points are made and their
    gradients summed a chunk of about ``batch_size`` rows at a time, so memory does not grow with the number of
    points (4096 points of one 224 px image would otherwise hold two 2.4 GB tensors)."""
    n = base.shape[0]
    per = max(1, batch_size // max(n, 1))
    total = torch.zeros_like(base)
    w = weights.to(device=base.device, dtype=base.dtype)
    for lo in ctx.bar(range(0, len(alphas), per), desc="integrated gradients"):  # one bar over every chunk
        g = _path_gradients(ctx, base, diff, target, alphas[lo:lo + per], batch_size, bar=False)
        total += (g * w[lo:lo + per].view(-1, 1, 1, 1, 1)).sum(0)
    return total


def _ig_adaptive(ctx: Context, base: torch.Tensor, diff: torch.Tensor, target: torch.Tensor, gap: torch.Tensor,
                 tolerance: float, max_steps: int, rule: str, batch_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Double the points of each image until its completeness error is within ``tolerance`` (or the cap).

    Returns the attributions, the points used per image (N,), the passes per image of the costliest image
    and whether each image converged (N,) bool.
    """
    n = base.shape[0]
    nested = rule in NESTED_RULES
    raw = torch.zeros_like(diff)
    used = torch.zeros(n, dtype=torch.long)
    converged = torch.zeros(n, dtype=torch.bool)
    spent = torch.zeros(n, dtype=torch.long)
    active = torch.arange(n, device=diff.device)
    denom = gap.abs().clamp(min=1e-12)
    # nested rules: the interior sum and the two end gradients carried over levels (active rows only)
    interior = torch.zeros_like(diff)
    g0 = g1 = None
    intervals = max(1, min(ADAPTIVE_START, max_steps - 1 if rule == "riemann_trapezoid" else max_steps))
    while True:
        points = intervals + 1 if rule == "riemann_trapezoid" else intervals
        b, d, t = base[active], diff[active], target[active]
        if nested:
            if g0 is None:  # first level: the ends and every interior point
                ends = _path_gradients(ctx, b, d, t, torch.tensor([0.0, 1.0], dtype=torch.float64), batch_size)
                g0, g1 = ends[0], ends[1]
                new = torch.arange(1, intervals, dtype=torch.float64) / intervals
                cost = (2 if rule == "riemann_trapezoid" else 1) + len(new)
            else:  # the midpoints of the previous level
                new = torch.arange(1, intervals, 2, dtype=torch.float64) / intervals
                cost = len(new)
            if len(new):
                interior[active] = interior[active] + _path_gradient_sum(ctx, b, d, t, new, torch.ones(len(new)), batch_size)
            s = interior[active]
            if rule == "riemann_trapezoid":
                avg = (s + 0.5 * (g0 + g1)) / intervals
            elif rule == "riemann_left":
                avg = (s + g0) / intervals
            else:
                avg = (s + g1) / intervals
        else:
            avg = _ig_fixed(ctx, b, d, t, points, rule, batch_size)
            cost = points
        spent[active.cpu()] += cost
        raw[active] = d * avg
        used[active.cpu()] = points
        err = ((d * avg).flatten(1).sum(1) - gap[active]).abs() / denom[active]
        ok = err <= tolerance
        converged[active[ok].cpu()] = True
        nxt = intervals * 2
        next_points = nxt + 1 if rule == "riemann_trapezoid" else nxt
        if bool(ok.all()) or next_points > max_steps:
            break
        keep = ~ok
        active = active[keep]
        if nested:
            g0, g1 = g0[keep], g1[keep]
        intervals = nxt
    return raw, used, int(spent.max()), converged


# ============================================================================ smoothgrad

SMOOTHGRAD_BASES = ("saliency", "gradient_x_input", "guided_backprop", "deconvnet")


@register_method(
    "smoothgrad",
    family="gradient",
    passes="samples x (1 forward + 1 backward)",
    options={
        "samples": Option(int, 25, "noisy copies per image", minimum=1, maximum=4096),
        "noise": Option(float, 0.15, "noise standard deviation as a fraction of each image's value range",
                        minimum=0.0, maximum=10.0),
        "base": Option(str, "saliency", "gradient method to smooth", SMOOTHGRAD_BASES),
        "square": Option(bool, False, "average the squared maps (SmoothGrad-Squared)"),
        "batch_size": _BATCH,
        "seed": Option(int, 0, "seed of the noise", minimum=0, maximum=SEED_MAX),
    },
    paper="Smilkov et al. 2017, SmoothGrad: removing noise by adding noise",
    preview={"samples": 8},
)
def smoothgrad(ctx: Context, samples: int, noise: float, base: str, square: bool, batch_size: int, seed: int) -> MethodOutput:
    """SmoothGrad (N, C, H, W): mean over ``samples`` copies x + e, e ~ N(0, (noise * (max x - min x))^2),
    of the ``base`` method's map (the gradient; times the noisy input for ``gradient_x_input``)."""
    x = ctx.x
    target = ctx.resolve_target()
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))  # (N,)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn((samples, *x.shape), generator=gen).to(device=x.device, dtype=x.dtype)
    noisy = (x.unsqueeze(0) + eps * sigma.view(1, -1, 1, 1, 1)).reshape(-1, *x.shape[1:])  # row s*n + i
    g, _ = input_gradients(
        ctx, noisy, target.repeat(samples), rules=_RULES[base], batch_size=batch_size, desc="smoothgrad"
    )
    if base == "gradient_x_input":
        g = g * noisy
    g = g.view(samples, *x.shape)
    raw = (g * g).mean(0) if square else g.mean(0)
    return MethodOutput(raw=raw, forward_passes=samples, backward_passes=samples)


def gradient_rules(name: str) -> dict[type | str, BackwardRule] | None:
    """Backward rules used by the gradient method ``name`` (``None``: the plain gradient)."""
    return _RULES[name]


__all__: list[str] = [
    "CompletenessWarning",
    "DECONV_RULES",
    "NoSwitchesWarning",
    "GUIDED_RULES",
    "IG_RULES",
    "deconv_relu",
    "gaussian_blur",
    "gradient_rules",
    "guided_relu",
    "guided_relu6",
    "input_gradients",
    "make_baseline",
    "max_pooling_layers",
    "no_switches_note",
    "quadrature",
]
