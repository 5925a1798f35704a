"""The optimisation loop of feature visualisation: objective + parameterisation + transforms + regularisers.

:func:`visualize` (``cs.visualize``) maximises an objective (Erhan et al. 2009; Olah et al. 2017) by
gradient ascent on an image parameterisation, feeding randomly transformed copies of the image through
the model (each image of the batch gets its own transform). The forward pass stops right after the
deepest layer the objective reads (unless it needs the logits). :func:`render_channels` renders many
channels of one layer in one batched optimisation, one image per channel. :func:`multiscale` is the
coarse-to-fine procedure (start small, upscale between rounds, optionally blur), in decorrelated colour
with the same transforms.

Every call leaves the model as it found it (modes, ``requires_grad``, in-place flags, hooks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvscopeError, TargetError
from ..models import as_model, output_logits
from ..probe import Capture
from .bounds import BATCH, check_size
from .network import Network, NotDifferentiableError, network
from .objectives import LOGITS, Objective, as_objective, channel
from .objectives import diversity as diversity_term
from .params import ImageParam, image_param, pixel_image
from .regularizers import Regularizer, gaussian_blur
from .result import SynthesisResult, interruptible, pixels_to_pil, seeded
from .transforms import Transform, resolve

__all__ = ["Rendering", "evaluate", "multiscale", "optimize", "pixels_to_pil", "render", "render_channels", "visualize"]


@dataclass(repr=False)
class Rendering(SynthesisResult):
    """A synthesised image batch and how it was made.

    ``input``: the tensor fed to the model (N, 3, H, W) in its preprocessed space (no transform), so
    evaluating the objective on it reproduces ``objectives``. ``pixels``: the same in [0, 1].
    ``history``: mean objective per step, measured on the transformed copies the optimiser saw.
    """

    objectives: torch.Tensor
    objective_name: str
    steps: int
    forward_passes: int
    backward_passes: int

    @property
    def objective(self) -> float:
        """The final objective value (mean over the batch) measured on ``input``."""
        return float(self.objectives.mean())


# ============================================================================ evaluating objectives


def capture_for(net: Network, objective: Objective, *, rules: dict | None = None) -> Capture:
    """A :class:`~convscope.Capture` reading the objective's layers; stops early unless logits are needed."""
    stop = bool(objective.layers) and not objective.needs_logits
    return Capture(net.module, list(objective.layers), grads=True, stop=stop, rules=rules)


def objective_values(cap: Capture, objective: Objective, x: torch.Tensor) -> torch.Tensor:
    """Run the captured model on ``x`` and return the objective per image (N,)."""
    out = cap.forward(x)
    acts: dict[str, torch.Tensor] = dict(cap.activations)
    if objective.needs_logits:
        if out is None:
            raise ConvscopeError("the objective needs the logits but the forward pass stopped early")
        acts[LOGITS] = output_logits(out)
    return objective(acts)


def evaluate(model: Any, objective: Objective | str, x: torch.Tensor, *, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> torch.Tensor:
    """The objective per image (N,) for a preprocessed input ``x`` (one forward pass, no gradient)."""
    net = network(model, mean=mean, std=std)
    obj = as_objective(objective, net.model)
    with torch.no_grad(), capture_for(net, obj) as cap:
        return objective_values(cap, obj, x.to(net.device)).detach()


def _redirect(upper: float):
    """ReLU (``upper`` = inf) / ReLU6 backward with Lucid's redirect for units that pass no gradient.

    Per image: where the ordinary gradient (grad * 1[0 < input < upper]) is zero everywhere, pass
    instead the gradient components that would move saturated inputs back into the active range
    (input <= 0 and a descent step raises it; input >= upper and a step lowers it). Otherwise the
    ordinary gradient, unchanged. Used for the first steps so that dead units can wake up.
    """

    def rule(inp: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        normal = grad * ((inp > 0) & (inp < upper)).to(grad.dtype)
        dead = normal.flatten(1).abs().amax(dim=1) == 0 if normal.ndim > 1 else normal.abs().amax().view(1) == 0
        if not bool(dead.any()):
            return normal
        wake = grad * (((inp <= 0) & (grad < 0)) | ((inp >= upper) & (grad > 0))).to(grad.dtype)
        shape = (-1,) + (1,) * (normal.ndim - 1)
        return torch.where(dead.view(shape), wake, normal)

    return rule


def _redirect_rules(module: nn.Module) -> dict[type, Any]:
    rules: dict[type, Any] = {}
    for m in module.modules():
        if type(m) is nn.ReLU:
            rules[nn.ReLU] = _redirect(float("inf"))
        elif type(m) is nn.ReLU6:
            rules[nn.ReLU6] = _redirect(6.0)
    return rules


# ============================================================================ the loop


def optimize(
    net: Network,
    objective: Objective,
    param: ImageParam,
    *,
    steps: int,
    transform: Transform | None = None,
    regularizers: Sequence[Regularizer] = (),
    lr: float = 0.05,
    optimizer: str = "adam",
    generator: torch.Generator,
    redirect_relu: int = 16,
    progress: bool | None = None,
    description: str = "render",
    until: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[list[float], int, bool]:
    """Gradient ascent on ``objective`` - penalties over ``param``; returns (history, steps run, interrupted).

    Each step: pixels = param.image(); x = normalize(transform(pixels)); loss = -sum_i objective_i(x) +
    sum_i penalty_i(pixels); one optimiser step; then the regularisers' step operations. During the
    first ``redirect_relu`` steps, ReLU/ReLU6 units pass gradients that would switch them on.
    ``until(values)`` may end the loop early (checked on each step's objective values).
    Ctrl-C stops the loop and keeps the image as it is.
    """
    if steps < 0:
        raise ConvscopeError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ConvscopeError(f"learning rate must be positive, got {lr}")
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(param.tensors, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(param.tensors, lr=lr, momentum=0.9)
    else:
        raise ConvscopeError(f"unknown optimizer {optimizer!r}; choose adam or sgd")
    history: list[float] = []
    done = 0
    phases = [(min(redirect_relu, steps), _redirect_rules(net.module)), (steps - min(redirect_relu, steps), None)]
    with interruptible(steps, description, progress) as run:
        for count, rules in phases:
            if count <= 0:
                continue
            with capture_for(net, objective, rules=rules or None) as cap:
                for _ in range(count):
                    pixels = param.image()
                    seen = transform(pixels, generator) if transform is not None else pixels
                    values = objective_values(cap, objective, net.normalize(seen))
                    if not values.requires_grad:
                        raise NotDifferentiableError(
                            f"the objective {objective.name!r} does not depend differentiably on the input "
                            "(a layer or the model output is computed without autograd)")
                    loss = -values.sum()
                    for r in regularizers:
                        p = r.penalty(pixels)
                        if p is not None:
                            loss = loss + p.sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if any(t.grad is None for t in param.tensors):
                        raise NotDifferentiableError("no gradient reached the image: the model is not differentiable")
                    opt.step()
                    for r in regularizers:
                        r.after_step(param, done)
                    history.append(float(values.detach().mean()))
                    done += 1
                    run.tick()
                    if until is not None and until(values.detach()):
                        return history, done, False
    return history, done, run.interrupted


def render(
    model: Any,
    objective: Objective | str,
    *,
    param: str | ImageParam = "fourier",
    size: int | tuple[int, int] | None = None,
    batch: int = 1,
    steps: int = 256,
    lr: float = 0.05,
    optimizer: str = "adam",
    transforms: str | Transform | Sequence[Transform] | None = "auto",
    regularizers: Sequence[Regularizer] = (),
    decorrelate: bool = True,
    redirect_relu: int = 16,
    seed: int | None = 0,
    progress: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    until: Callable[[torch.Tensor], bool] | None = None,
) -> Rendering:
    """Optimise an image batch to maximise ``objective``; the engine behind :func:`visualize`.

    ``param``: ``"fourier"`` (default), ``"pixel"`` or an :class:`~convscope.synthesis.params.ImageParam`.
    ``transforms``: ``"auto"`` (default: the wide ``"strong"`` set for objectives that read the logits,
    Lucid's ``"standard"`` set otherwise), ``"standard"``, ``"strong"``, ``"none"`` or transforms.
    ``size``: output side in pixels (default: the model's input size). ``batch``: images optimised
    together (each with its own transforms). ``seed``: seeds the initial image and every transform
    (same seed, same image). ``mean``/``std``: normalisation instead of the model's (a plain
    ``nn.Module`` otherwise gets :data:`~convscope.models.PLAIN_MODULE_DEFAULTS`). ``until``: see
    :func:`optimize`.
    """
    net = network(model, mean=mean, std=std)
    obj = as_objective(objective, net.model)
    h, w = check_size(size, "render") or net.input_size
    BATCH.check("batch", batch, "render")
    gen = torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**63))
    p = param if isinstance(param, ImageParam) else image_param(param, (batch, h, w), decorrelate=decorrelate,
                                                              generator=gen, device=net.device)
    transform = resolve(transforms, min(h, w), logits=obj.needs_logits)
    start = time.perf_counter()
    history, done, interrupted = optimize(
        net, obj, p, steps=steps, transform=transform, regularizers=regularizers, lr=lr, optimizer=optimizer,
        generator=gen, redirect_relu=redirect_relu, progress=progress, description=f"visualize {obj.name}",
        until=until)
    return _finish(net, obj, p.image().detach(), history, done, interrupted, start)


def _finish(net: Network, obj: Objective, pixels: torch.Tensor, history: list[float], done: int,
            interrupted: bool, start: float, **extras: Any) -> Rendering:
    x = net.normalize(pixels)
    with torch.no_grad(), capture_for(net, obj) as cap:
        values = objective_values(cap, obj, x).detach()
    return Rendering(
        input=x, pixels=pixels, objectives=values, history=history, objective_name=obj.name, steps=done,
        forward_passes=done + 1, backward_passes=done, seconds=time.perf_counter() - start,
        interrupted=interrupted, extras=dict(extras))


def visualize(
    model: Any,
    objective: Objective | str,
    *,
    steps: int = 256,
    size: int | tuple[int, int] | None = None,
    seed: int | None = 0,
    batch: int = 1,
    diversity: float = 0.0,
    **options: Any,
) -> Rendering:
    """Feature visualisation: an image that maximises ``objective`` (``cs.visualize``).

    ``objective``: a string (``"conv_head:286"``, ``"bn2:3@3,3"``, ``"blocks.5.0"``, ``"logit:385"``,
    ``"0.5*bn2:3 - bn2:4"``) or an :class:`Objective`. ``diversity`` > 0 with ``batch`` > 1 adds
    ``diversity * diversity(layer)`` on the objective's first layer so the samples differ (Olah et al.
    2017). Other options go to :func:`render` (``param``, ``lr``, ``transforms``, ``regularizers``,
    ``decorrelate``, ``progress``, ``mean``, ``std``...). Returns a :class:`Rendering`; ``r.image`` is
    a PIL image, ``r.input`` the tensor fed to the model, ``r.objective`` the final objective value.
    """
    model = as_model(model)
    obj = as_objective(objective, model)
    if diversity:
        if not obj.layers:
            raise ConvscopeError("diversity needs an objective that reads a layer")
        obj = obj + diversity * diversity_term(obj.layers[0])
    return render(model, obj, steps=steps, size=size, seed=seed, batch=batch, **options)


def layer_channels(net: Network, layer: str, size: tuple[int, int]) -> int:
    """How many channels ``layer`` outputs for one ``size`` image (one forward pass that stops there)."""
    x = torch.full((1, 3, *size), 0.5, device=net.device, dtype=net.dtype)
    with torch.no_grad(), Capture(net.module, [layer], stop=True) as cap:
        cap.forward(net.normalize(x))
        act = cap.activations[layer]
    return int(act.shape[1]) if act.ndim >= 2 else 1


def render_channels(model: Any, layer: str, channels: Sequence[int], **options: Any) -> Rendering:
    """Render ``channels`` of ``layer`` in one batched optimisation: image i maximises channel i.

    The images are independent (eval-mode model, per-image transforms), so this gives what separate
    renderings give, for a fraction of the cost. Options as in :func:`render`. A channel outside the
    layer's range raises :class:`~convscope.TargetError` naming the range, before anything is allocated.
    """
    model = as_model(model)
    channels = [int(c) for c in channels]
    if not channels:
        raise ConvscopeError("no channels to render")
    net = network(model, mean=options.get("mean"), std=options.get("std"))
    size = check_size(options.get("size"), "render_channels") or net.input_size
    count = layer_channels(net, layer, size)
    bad = [c for c in channels if not 0 <= c < count]
    if bad:
        raise TargetError(f"channel {bad[0]} is out of range: layer {layer!r} has {count} channels (0..{count - 1})")
    options.setdefault("seed", 0)
    return render(model, channel(layer, channels), batch=len(channels), **options)


# ============================================================================ coarse-to-fine


def multiscale(
    model: Any,
    objective: Objective | str,
    *,
    start: int = 56,
    factor: float = 1.2,
    rounds: int = 10,
    steps: int = 25,
    lr: float = 0.2,
    blur: int | None = None,
    decorrelate: bool = True,
    transforms: str | Transform | Sequence[Transform] | None = "auto",
    regularizers: Sequence[Regularizer] = (),
    seed: int | None = 0,
    progress: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Rendering:
    """Coarse-to-fine optimisation: ``steps`` steps at ``start`` px, then upscale by ``factor``, ``rounds`` times.

    The seeds' recipe (Mordvintsev et al. 2015; Nguyen et al. 2016): start small, where the network
    sees only coarse structure, upscale (bicubic) between rounds and, with ``blur=k``, blur by a
    Gaussian of width k/4 px (the size of the old k x k box blur, without its ringing), so each round
    adds detail to the layout found at the coarser scale. Each round is one :func:`optimize` run on a
    per-pixel parameterisation in ImageNet-decorrelated colour through a sigmoid (``decorrelate``;
    optimising the model's raw input gave saturated rainbow texture), seen through ``transforms``
    (by default Lucid's standard set, or :func:`~convscope.synthesis.transforms.strong` for class
    objectives, scaled to the round's size), with Adam at ``lr``, from grey plus
    small noise. Final side: ``start * factor**(rounds - 1)``.
    """
    net = network(model, mean=mean, std=std)
    obj = as_objective(objective, net.model)
    if start < 16 or factor < 1 or rounds < 1:
        raise ConvscopeError("multiscale needs start >= 16, factor >= 1 and rounds >= 1")
    if steps < 1 or not lr > 0:
        raise ConvscopeError("multiscale needs steps >= 1 and a positive learning rate")
    check_size(round(start * factor ** (rounds - 1)), "multiscale")
    if blur is not None and not 1 <= blur <= start:
        raise ConvscopeError(f"blur must be between 1 and the start size ({start}), got {blur}")
    gen = seeded(seed)
    pixels = (0.5 + 0.02 * torch.randn((1, 3, start, start), generator=gen)).clamp(0, 1).to(net.device, net.dtype)
    history: list[float] = []
    done = 0
    interrupted = False
    size = float(start)
    t0 = time.perf_counter()
    for r in range(rounds):
        side = int(pixels.shape[-1])
        param = pixel_image((1, side, side), init=pixels, decorrelate=decorrelate, device=net.device)
        hist, n, interrupted = optimize(
            net, obj, param, steps=steps, transform=resolve(transforms, side, logits=obj.needs_logits), regularizers=regularizers, lr=lr,
            generator=gen, redirect_relu=16 if r == 0 else 0, progress=progress,
            description=f"multiscale {obj.name} {side} px ({r + 1}/{rounds})")
        history += hist
        done += n
        with torch.no_grad():
            pixels = param.image().detach()
        if interrupted:
            break
        if r < rounds - 1:
            size *= factor
            pixels = F.interpolate(pixels, size=(int(size), int(size)), mode="bicubic", align_corners=False).clamp(0, 1)
            if blur:
                pixels = gaussian_blur(pixels, blur / 4)
    return _finish(net, obj, pixels.detach(), history, done, interrupted, t0, sizes=(start, int(pixels.shape[-1])))
