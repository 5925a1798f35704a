"""DeepDream (Mordvintsev, Olah & Tyka 2015): amplify what a layer sees in a given image.

Gradient *ascent* on the image itself, octave by octave (coarse to fine). At each step the image is
rolled by a random offset (jitter), the objective's gradient g is taken and the step is
``step_size / mean|g| * g`` (normalised gradient), in pixel units, then the image is clipped to
[0, 1]. The details added at a coarser octave are upscaled and carried to the next one. The default
objective is the mean of squares of one layer; a channel objective dreams one feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConvscopeError
from ..images import ImageLike, load_image
from ..models import Model, as_model
from ..probe import Capture
from .bounds import SIZE
from .network import Network, NotDifferentiableError, network
from .objectives import Objective, as_objective, layer
from .render import capture_for, objective_values
from .result import SynthesisResult, interruptible, pil_to_pixels, seeded


@dataclass(repr=False)
class Dream(SynthesisResult):
    """A dreamed image: ``pixels`` (1, 3, H, W) in [0, 1], ``input`` the same in the model's input space;
    ``history``: the objective at each step; ``octave_sizes``: (H, W) of each octave, coarse to fine."""

    objective_name: str
    octave_sizes: list[tuple[int, int]]
    forward_passes: int
    backward_passes: int


def default_dream_layer(model: Any) -> str:
    """A layer about 60% of the way through the network's spatial layers (textures and object parts)."""
    rows = as_model(model).layers()
    spatial = [r for r in rows if r.is_spatial and r.depth <= 2 and r.output_shape is not None]
    if not spatial:
        raise ConvscopeError("the model has no spatial layer to dream on")
    return spatial[int(0.6 * (len(spatial) - 1))].name


def _pixels_of(image: ImageLike | torch.Tensor, size: int | None, net: Network) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return net.to_pixels(net.preprocess(image)).clamp(0, 1)
    img = load_image(image)
    if size:
        scale = size / min(img.size)
        img = img.resize((max(16, round(img.size[0] * scale)), max(16, round(img.size[1] * scale))), Image.Resampling.BICUBIC)
    return pil_to_pixels(img).to(net.device, net.dtype)


def dream(
    model: Model | Any,
    image: ImageLike | torch.Tensor,
    objective: Objective | str | None = None,
    *,
    octaves: int = 4,
    octave_scale: float = 1.4,
    steps: int = 10,
    step_size: float = 1.5 / 255,
    jitter: int = 32,
    size: int | None = 224,
    seed: int | None = 0,
    progress: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Dream:
    """DeepDream ``image`` with ``objective`` (default: the whole layer from :func:`default_dream_layer`).

    ``image``: a path, PIL image, ``sample:NAME`` (resized so its shorter side is ``size`` px, not
    cropped) or a preprocessed tensor (1, 3, H, W). ``octaves`` scales, each ``octave_scale`` times
    smaller than the next; ``steps`` normalised-gradient steps of ``step_size`` (mean pixel change,
    [0, 1] units) per octave; random roll of up to ``jitter`` px per step. Cost: octaves x steps
    forward and backward passes (the forward pass stops at the objective's layer).
    """
    net = network(model, mean=mean, std=std)
    if objective is None:
        objective = layer(default_dream_layer(net.model))
    obj = as_objective(objective, net.model)
    if octaves < 1 or octave_scale < 1 or steps < 0 or not step_size > 0 or jitter < 0:
        raise ConvscopeError("dream needs octaves >= 1, octave_scale >= 1, steps >= 0, step_size > 0, jitter >= 0")
    SIZE.check("size", size, "dream")
    base = _pixels_of(image, size, net)
    gen = seeded(seed)
    h, w = base.shape[2:]
    sizes = [(max(16, round(h / octave_scale**i)), max(16, round(w / octave_scale**i))) for i in range(octaves)][::-1]
    history: list[float] = []
    passes = 0
    detail = torch.zeros_like(base[:, :, : sizes[0][0], : sizes[0][1]])
    result = src = base
    with interruptible(octaves * steps, f"dream {obj.name}", progress) as run, capture_for(net, obj) as cap:
        for hs, ws in sizes:
            octave_base = F.interpolate(base, size=(hs, ws), mode="bilinear", align_corners=False) if (hs, ws) != (h, w) else base
            detail = F.interpolate(detail, size=(hs, ws), mode="bilinear", align_corners=False)
            src = (octave_base + detail).clamp(0, 1)
            for _ in range(steps):
                src = _step(net, cap, obj, src, gen, jitter, step_size, history)
                passes += 1
                run.tick()
            detail = src - octave_base
            result = src
    if run.interrupted and src.shape == base.shape:
        result = src  # interrupted during the last octave: keep its progress
    pixels = result.detach()
    return Dream(input=net.normalize(pixels), pixels=pixels, history=history, objective_name=obj.name,
                 octave_sizes=sizes, forward_passes=passes, backward_passes=passes, seconds=run.seconds,
                 interrupted=run.interrupted)


def _step(net: Network, cap: Capture, obj: Objective, src: torch.Tensor, gen: torch.Generator, jitter: int,
          step_size: float, history: list[float]) -> torch.Tensor:
    """One normalised-gradient ascent step with a random roll (per image)."""
    n = src.shape[0]
    shifts = torch.randint(-jitter, jitter + 1, (n, 2), generator=gen).tolist() if jitter else [[0, 0]] * n
    rolled = torch.stack([torch.roll(src[i], shifts=(shifts[i][0], shifts[i][1]), dims=(1, 2)) for i in range(n)])
    rolled = rolled.detach().requires_grad_(True)
    values = objective_values(cap, obj, net.normalize(rolled))
    if not values.requires_grad:
        raise NotDifferentiableError(f"the objective {obj.name!r} does not depend differentiably on the input")
    (g,) = torch.autograd.grad(values.sum(), rolled)
    g = g / g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    stepped = (rolled + step_size * g).detach()
    history.append(float(values.detach().mean()))
    out = torch.stack([torch.roll(stepped[i], shifts=(-shifts[i][0], -shifts[i][1]), dims=(1, 2)) for i in range(n)])
    return out.clamp(0, 1)
