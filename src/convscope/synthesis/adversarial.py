"""Adversarial examples (FGSM, PGD) and fooling images grown from noise.

- FGSM (Goodfellow et al. 2015): one step of size eps along sign(grad) (L-inf) or grad/||grad||_2 (L2).
- PGD (Madry et al. 2018): ``steps`` such steps of size ``step_size`` (default 2.5 eps / steps), each
  followed by projection onto the eps-ball around the original image and onto valid pixels [0, 1].

Budgets are in *pixel units* (images in [0, 1]; eps = 4/255 changes no pixel by more than 4 grey
levels); the model's normalisation is applied after the perturbation. Targeted attacks minimise the
cross-entropy of the target class; untargeted ones maximise that of the class predicted before.
Fooling images (Nguyen et al. 2015, gradient-ascent variant) start from noise and maximise the
target's log-probability until the model is ``confidence`` sure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError, TargetError
from ..models import Model, Prediction, check_input, output_logits
from ..probe import guard
from .bounds import check_size
from .network import Network, NotDifferentiableError, network
from .objectives import LOGITS, Objective
from .params import pixel_image
from .render import Rendering, render
from .result import SynthesisResult, interruptible, seeded


def predictions(net: Network, logits: torch.Tensor, top: int = 5) -> list[Prediction]:
    """Top-``top`` softmax predictions of each row of ``logits``."""
    probs = logits.detach().float().softmax(dim=1)
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    return [Prediction(idx, [net.model.label(i) for i in idx], val) for val, idx in zip(values.tolist(), indices.tolist())]


@dataclass(repr=False)
class AdversarialResult(SynthesisResult):
    """An adversarial batch: ``input`` (N, 3, H, W) in the model's input space, ready to feed.

    ``perturbation``: ``{"linf": (N,), "l2": (N,)}`` norms of (adversarial - original) in pixel units;
    ``before``/``after``: top-5 predictions; ``success``: (N,) target reached (targeted) or the
    prediction changed (untargeted); ``target_probability``: (N,) after the attack (targeted only);
    ``history``: the loss per step.
    """

    original: torch.Tensor
    perturbation: dict[str, torch.Tensor]
    before: list[Prediction]
    after: list[Prediction]
    success: torch.Tensor
    target: torch.Tensor | None
    method: str
    norm: str
    eps: float
    steps: int
    forward_passes: int
    backward_passes: int
    target_probability: torch.Tensor | None = None


def _project(delta: torch.Tensor, p0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / n, max=1.0)
    return (p0 + delta).clamp(0, 1) - p0


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def adversarial(
    model: Model | Any,
    x: Any,
    target: int | str | Sequence[int] | torch.Tensor | None = None,
    *,
    eps: float = 4 / 255,
    norm: str = "linf",
    method: str = "pgd",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = False,
    early_stop: bool = False,
    seed: int | None = 0,
    progress: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> AdversarialResult:
    """Perturb ``x`` within an ``eps`` budget (pixel units) to reach ``target`` or leave the current class.

    ``x``: a preprocessed tensor (N, 3, H, W) or, with a Model, an image. ``target``: a class (index or
    label), one per image, or ``None`` for an untargeted attack. ``norm``: ``"linf"`` or ``"l2"``.
    ``method``: ``"fgsm"`` (one step of size eps) or ``"pgd"`` (``steps`` steps of ``step_size``,
    default 2.5 eps / steps; ``random_start`` draws the start uniformly in the L-inf box / scaled
    Gaussian in the L2 ball). ``early_stop`` ends once every image succeeds. Cost: one forward before,
    ``steps`` forward + backward, one forward after.
    """
    net = network(model, mean=mean, std=std)
    if norm not in ("linf", "l2"):
        raise ConvscopeError(f"unknown norm {norm!r}; choose linf or l2")
    if method not in ("fgsm", "pgd"):
        raise ConvscopeError(f"unknown method {method!r}; choose fgsm or pgd")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ConvscopeError(f"the budget eps must be positive (pixel units, e.g. 4/255), got {eps}")
    if norm == "linf" and eps >= 1:
        raise ConvscopeError(f"an L-inf budget of {eps} pixel units allows any image; use a value below 1 (e.g. 4/255)")
    if method == "fgsm":
        steps, step_size, random_start = 1, float(eps), False
    if steps < 1:
        raise ConvscopeError(f"steps must be >= 1, got {steps}")
    alpha = float(step_size) if step_size is not None else 2.5 * eps / steps
    if not alpha > 0:
        raise ConvscopeError(f"step size must be positive, got {alpha}")
    if isinstance(x, torch.Tensor):
        x0 = check_input(x, device=net.device, channels=net.model.channels).detach()
    else:
        x0 = net.preprocess(x)
    n = x0.shape[0]
    p0 = net.to_pixels(x0).clamp(0, 1)
    gen = seeded(seed)
    history: list[float] = []
    with guard(net.module, eval=True, freeze=True, no_inplace=True):
        with torch.no_grad():
            logits0 = output_logits(net.module(net.normalize(p0)))
        targets = _targets(net, target, n, logits0.shape[1])
        labels = targets if targets is not None else logits0.argmax(1)
        delta = torch.zeros_like(p0)
        if random_start:
            r = torch.rand(p0.shape, generator=gen) * 2 - 1 if norm == "linf" else torch.randn(p0.shape, generator=gen)
            delta = _project(r.to(p0) * (eps if norm == "linf" else eps / (r[0].numel() ** 0.5)), p0, eps, norm)
        done = 0
        with interruptible(steps, f"{method} {norm}", progress) as run:
            for _ in range(steps):
                d = delta.detach().requires_grad_(True)
                logits = output_logits(net.module(net.normalize(p0 + d)))
                if not logits.requires_grad:
                    raise NotDifferentiableError("the model's output does not depend differentiably on its input")
                loss = F.cross_entropy(logits, labels, reduction="sum")
                (g,) = torch.autograd.grad(loss, d)
                sign = -1.0 if targets is not None else 1.0
                delta = _project(delta + sign * alpha * _direction(g, norm), p0, eps, norm)
                done += 1
                run.tick()
                history.append(float(loss.detach()) / n)
                if early_stop:
                    pred = logits.detach().argmax(1)
                    ok = (pred == targets) if targets is not None else (pred != labels)
                    if bool(ok.all()):
                        # the check ran on the previous iterate; keep it only if it is the current one
                        delta = d.detach()
                        break
        pixels = (p0 + delta).detach()
        xa = net.normalize(pixels)
        with torch.no_grad():
            logits1 = output_logits(net.module(xa))
    pred1 = logits1.argmax(1)
    success = (pred1 == targets) if targets is not None else (pred1 != labels)
    diff = (pixels - p0).flatten(1)
    return AdversarialResult(
        input=xa, original=x0, pixels=pixels,
        perturbation={"linf": diff.abs().amax(1).cpu(), "l2": diff.norm(dim=1).cpu()},
        before=predictions(net, logits0), after=predictions(net, logits1), success=success.cpu(),
        target=targets.cpu() if targets is not None else None, method=method, norm=norm, eps=float(eps),
        steps=done, forward_passes=done + 2, backward_passes=done, seconds=run.seconds,
        history=history, interrupted=run.interrupted,
        target_probability=logits1.softmax(1).gather(1, targets.view(-1, 1)).squeeze(1).cpu() if targets is not None else None,
    )


def _targets(net: Network, target: Any, n: int, classes: int) -> torch.Tensor | None:
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        items = target.flatten().tolist()
    elif isinstance(target, (list, tuple)):
        items = list(target)
    else:
        items = [target]
    idx = [net.class_index(t) for t in items]
    for i in idx:
        if not 0 <= i < classes:
            raise TargetError(f"class index {i} is out of range: the model has {classes} classes (0..{classes - 1})")
    if len(idx) == 1:
        idx = idx * n
    if len(idx) != n:
        raise TargetError(f"{len(idx)} targets for a batch of {n} images")
    return torch.tensor(idx, dtype=torch.long, device=net.device)


def log_probability(cls: int) -> Objective:
    """log softmax(logits)[cls] per image: the objective of fooling images."""

    def fn(acts):
        z = acts[LOGITS]
        if not 0 <= cls < z.shape[1]:
            raise TargetError(f"class index {cls} is out of range: the model has {z.shape[1]} classes (0..{z.shape[1] - 1})")
        return z.log_softmax(dim=1)[:, cls]

    return Objective(fn, [], needs_logits=True, name=f"log p({cls})")


def fooling_image(
    model: Model | Any,
    target: int | str,
    *,
    confidence: float = 0.99,
    steps: int = 200,
    size: int | None = None,
    lr: float = 0.05,
    param: str = "pixel",
    seed: int | None = 0,
    progress: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Rendering:
    """An image grown from noise that the model assigns to ``target`` with probability >= ``confidence``.

    Gradient ascent on log p(target) (Nguyen, Yosinski & Clune 2015, Sec. 3's gradient-ascent
    variant) over a sigmoid pixel parameterisation started from N(0, 1) noise, no transforms, until
    the confidence is reached or ``steps`` run out. ``r.extras["probability"]``: the final probability.
    """
    net = network(model, mean=mean, std=std)
    if not 0 < confidence < 1:
        raise ConvscopeError(f"confidence must be in (0, 1), got {confidence}")
    cls = net.class_index(target)
    obj = log_probability(cls)
    goal = float(torch.log(torch.tensor(confidence)))
    h, w = check_size(size, "fooling_image") or net.input_size
    p = pixel_image((1, h, w), sd=1.0, decorrelate=False, generator=seeded(seed), device=net.device) if param == "pixel" else param
    r = render(net.model, obj, param=p, steps=steps, lr=lr, transforms=None, seed=seed, progress=progress,
               mean=mean, std=std, redirect_relu=0, until=lambda v: bool((v >= goal).all()))
    r.extras["probability"] = float(torch.exp(r.objectives).mean())
    r.extras["target"] = cls
    return r
