"""Feature inversion (Mahendran & Vedaldi, CVPR 2015): which images share a layer's representation?

Given the features phi0 = phi(x0) of an image at one layer, find pixels x minimising

    ||phi(J(x)) - phi0||^2 / ||phi0||^2  +  l_a * mean |2(x - 0.5)|^alpha  +  l_tv * mean (dx^2 + dy^2)^(beta/2)

(pixels in [0, 1]; the loss is normalised by the target's feature norm so one set of weights fits
every layer; the alpha-norm keeps values in range, total variation favours natural images; J is a
random translation of up to ``jitter`` pixels per step, Mahendran & Vedaldi 2016's jitter). As in
:func:`~convscope.synthesis.render.visualize`, x is parameterised by a decorrelated-colour Fourier
spectrum through a sigmoid (Olah et al. 2017): optimising raw pixels of a modern network (no
max-pooling, depthwise convolutions, stride-2 layers) from deep layers gives high-frequency rainbow
noise with edge outlines, because nothing in the loss prefers low frequencies that the features
cannot see; the 1/f spectrum does, so deep reconstructions come out blurry but keep layout and colour.
``param="pixel"`` (with or without ``decorrelate``) keeps a per-pixel parameterisation for comparison.
:func:`invert_layers` reconstructs from several depths with the same settings;
:func:`perturbation_study` inverts perturbed features (signs kept and binarised at constant norm; half
of the feature maps dropped and the rest rescaled to the original norm) and reports the errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConvscopeError
from ..images import ImageLike
from ..models import Model, as_model
from ..probe import Capture
from ..render import grid, png_bytes
from .bounds import check_size
from .network import Network, NotDifferentiableError, network
from .params import image_param
from .regularizers import total_variation
from .result import ShortRepr, SynthesisResult, interruptible, seeded
from .transforms import jitter as jitter_transform


@dataclass(repr=False)
class Inversion(SynthesisResult):
    """A reconstruction from one layer's features.

    ``error``: final ||phi(x) - phi_target||^2 / ||phi_target||^2; ``history``: that error per step
    (on the jittered copy the step saw);
    ``pixel_error``: root-mean-square difference to the original image in [0, 1] pixel units.
    """

    layer: str
    error: float
    pixel_error: float
    steps: int
    forward_passes: int
    backward_passes: int


def _input_of(net: Network, image: ImageLike | torch.Tensor, size: int | None) -> torch.Tensor:
    x = net.preprocess(image)
    if size and not isinstance(image, torch.Tensor) and tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def features(model: Any, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The activation of ``layer`` for the preprocessed input ``x`` (forward stops at the layer)."""
    with torch.no_grad(), Capture(model, [layer], stop=True) as cap:
        cap.forward(x)
        return cap.activations[layer].detach().clone()


def invert(
    model: Model | Any,
    image: ImageLike | torch.Tensor,
    layer: str,
    *,
    steps: int = 200,
    lr: float = 0.05,
    alpha: float = 6.0,
    alpha_weight: float = 1e-3,
    tv_weight: float = 0.5,
    tv_beta: float = 2.0,
    jitter: int | None = None,
    param: str = "fourier",
    decorrelate: bool = True,
    size: int | None = None,
    target: torch.Tensor | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Inversion:
    """Reconstruct an image from its ``layer`` features (Mahendran & Vedaldi 2015).

    ``image``: path / PIL / ``sample:NAME`` (preprocessed by the model, optionally resized to ``size``)
    or a preprocessed tensor (1, 3, H, W). ``target``: features to invert instead of the image's own
    (used by :func:`perturbation_study`). ``param``: ``"fourier"`` (default) or ``"pixel"``, both
    through a sigmoid, with ImageNet-decorrelated colour unless ``decorrelate=False`` (see the module
    docstring). ``jitter``: largest random shift in pixels per step (default: side / 32, e.g. 7 px at
    224; 0 turns it off); the image is optimised on a canvas ``jitter`` pixels larger and its centre is
    returned. Optimiser: Adam with learning rate ``lr``, divided by 10 at 60% and again at 85% of the
    steps, from grey plus N(0, 0.01^2) coefficients. Cost: ``steps`` forward and backward passes up
    to ``layer`` plus one forward for the target and one for the final error.
    """
    net = network(model, mean=mean, std=std)
    if steps < 1 or not lr > 0:
        raise ConvscopeError("inversion needs steps >= 1 and a positive learning rate")
    check_size(size, "invert")
    x0 = _input_of(net, image, size)
    phi0 = features(net.module, x0, layer) if target is None else target.detach().to(net.device)
    norm0 = phi0.pow(2).sum().clamp_min(1e-12)
    h, w = x0.shape[2:]
    j = max(1, round(min(h, w) / 32)) if jitter is None else int(jitter)
    if j < 0 or j >= min(h, w) // 2:
        raise ConvscopeError(f"jitter must be between 0 and {min(h, w) // 2 - 1} px for a {h}x{w} image, got {j}")
    gen = seeded(seed)
    p = image_param(param, (x0.shape[0], h + j, w + j), decorrelate=decorrelate, generator=gen, device=net.device)
    shift = jitter_transform(j)
    opt = torch.optim.Adam(p.tensors, lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.6 * steps), int(0.85 * steps)], gamma=0.1)
    history: list[float] = []
    with interruptible(steps, f"invert {layer}", progress) as run, \
            Capture(net.module, [layer], grads=True, stop=True) as cap:
        for _ in range(steps):
            canvas = p.image().to(net.dtype)
            cap.forward(net.normalize(shift(canvas, gen)))
            phi = cap.activations[layer]
            if phi.shape != phi0.shape:
                raise ConvscopeError(f"target features have shape {tuple(phi0.shape)}, layer {layer!r} gives {tuple(phi.shape)}")
            if not phi.requires_grad:
                raise NotDifferentiableError(f"layer {layer!r} does not depend differentiably on the input")
            err = (phi - phi0).pow(2).sum() / norm0
            loss = err
            if alpha_weight:
                loss = loss + alpha_weight * (2 * (canvas - 0.5)).abs().pow(alpha).mean()
            if tv_weight:
                loss = loss + tv_weight * total_variation(canvas, tv_beta).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(float(err.detach()))
            run.tick()
    done = len(history)
    with torch.no_grad():
        pixels = p.image().to(net.dtype)[:, :, j // 2:j // 2 + h, j // 2:j // 2 + w].clamp(0, 1)
    x = net.normalize(pixels)
    phi = features(net.module, x, layer)
    error = float((phi - phi0).pow(2).sum() / norm0)
    pixel_error = float((pixels - net.to_pixels(x0).clamp(0, 1)).pow(2).mean().sqrt())
    return Inversion(layer=layer, input=x, pixels=pixels, error=error, pixel_error=pixel_error, history=history,
                     steps=done, forward_passes=done + 2, backward_passes=done, seconds=run.seconds,
                     interrupted=run.interrupted)


def invert_layers(model: Model | Any, image: ImageLike | torch.Tensor, layers: Sequence[str], **options: Any) -> list[Inversion]:
    """:func:`invert` from each of ``layers`` with the same settings and seed (shallow to deep, side by side).

    After Ctrl-C the list ends with the interrupted inversion (its ``interrupted`` is set)."""
    if not layers:
        raise ConvscopeError("no layers to invert")
    model = as_model(model)
    out: list[Inversion] = []
    for name in layers:
        out.append(invert(model, image, name, **options))
        if out[-1].interrupted:
            break
    return out


def binarize(phi: torch.Tensor) -> torch.Tensor:
    """Keep each feature's sign, give every non-zero feature the same magnitude, keep the total L2 norm."""
    s = torch.sign(phi)
    nz = s.abs().sum().clamp_min(1)
    return s * (phi.norm() / nz.sqrt())


def drop_maps(phi: torch.Tensor, fraction: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a random ``fraction`` of the feature maps (channels), rescale the rest to the original L2 norm."""
    c = phi.shape[1]
    keep = torch.randperm(c, generator=generator)[: max(1, round(c * (1 - fraction)))]
    mask = torch.zeros(c, dtype=phi.dtype)
    mask[keep] = 1
    shape = (1, c) + (1,) * (phi.ndim - 2)
    out = phi * mask.to(phi.device).view(shape)
    return out * (phi.norm() / out.norm().clamp_min(1e-12))


PERTURBATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "original": lambda phi, g: phi,
    "binarized": lambda phi, g: binarize(phi),
    "dropout": lambda phi, g: drop_maps(phi, 0.5, g),
}


@dataclass(repr=False)
class PerturbationStudy(ShortRepr):
    """Inversions of perturbed features; ``errors[name]`` = (error to the perturbed target, error to the
    original features, pixel RMSE to the original image). Shows as a labelled row of pictures in Jupyter."""

    layer: str
    inversions: dict[str, Inversion]
    errors: dict[str, tuple[float, float, float]]

    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C ended one of the inversions (the study then stops there)."""
        return any(inv.interrupted for inv in self.inversions.values())

    def picture(self) -> Image.Image:
        """The reconstructions side by side, labelled with the perturbation."""
        return grid([inv.image for inv in self.inversions.values()], labels=[f"{self.layer} {k}" for k in self.inversions])

    def _repr_png_(self) -> bytes:
        return png_bytes(self.picture())


def perturbation_study(model: Model | Any, image: ImageLike | torch.Tensor, layer: str, *, seed: int | None = 0,
                       **options: Any) -> PerturbationStudy:
    """Invert ``layer``'s original, binarised and 50%-dropped features (Mahendran & Vedaldi 2015, Sec. 4)."""
    net = network(model, mean=options.get("mean"), std=options.get("std"))
    x0 = _input_of(net, image, options.get("size"))
    phi0 = features(net.module, x0, layer)
    gen = seeded(seed)
    inversions: dict[str, Inversion] = {}
    errors: dict[str, tuple[float, float, float]] = {}
    for name, perturb in PERTURBATIONS.items():
        target = perturb(phi0, gen)
        inv = invert(net.model, x0, layer, target=target, seed=seed, **{k: v for k, v in options.items() if k != "size"})
        phi = features(net.module, inv.input, layer)
        to_original = float((phi - phi0).pow(2).sum() / phi0.pow(2).sum().clamp_min(1e-12))
        inversions[name] = inv
        errors[name] = (inv.error, to_original, inv.pixel_error)
        if inv.interrupted:
            break
    return PerturbationStudy(layer, inversions, errors)
