"""DeepDream (Mordvintsev, Olah & Tyka 2015): amplify what a layer sees in a given image.

Gradient *ascent* on the image itself, octave by octave (coarse to fine). At each step the image is
rolled by a random offset (jitter), the objective's gradient g is taken and the step is
``step_size / mean|g| * g`` (normalised gradient), in pixel units, then the image is clipped to
[0, 1]. The details added at a coarser octave are upscaled and carried to the next one. The default
objective is the mean of squares of one layer; a channel objective dreams one feature.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from ..progress import tqdm

from ..errors import ConvscopeError
from ..images import ImageLike, load_image
from .network import NotDifferentiableError, network
from .objectives import Objective, as_objective, layer
from .render import capture_for, objective_values, pixels_to_pil


@dataclass
class Dream:
    """A dreamed image: ``pixels`` (1, 3, H, W) in [0, 1], ``input`` the same in the model's input space."""

    input: torch.Tensor
    pixels: torch.Tensor
    history: list[float]
    objective_name: str
    octave_sizes: list[tuple[int, int]]
    forward_passes: int
    backward_passes: int
    seconds: float
    interrupted: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return pixels_to_pil(self.pixels)[0]


def default_dream_layer(model: Any) -> str:
    """A layer about 60% of the way through the network's spatial layers (textures and object parts)."""
    from ..probe import layer_table

    rows = model.layers() if hasattr(model, "layers") and callable(model.layers) else layer_table(model)
    spatial = [r for r in rows if r.is_spatial and r.depth <= 2 and r.output_shape is not None]
    if not spatial:
        raise ConvscopeError("the model has no spatial layer to dream on")
    return spatial[int(0.6 * (len(spatial) - 1))].name


def _pixels_of(image: ImageLike | torch.Tensor, size: int | None, net) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
        return net.to_pixels(x.detach().to(net.device, net.dtype)).clamp(0, 1)
    img = load_image(image)
    if size:
        scale = size / min(img.size)
        img = img.resize((max(16, round(img.size[0] * scale)), max(16, round(img.size[1] * scale))), Image.Resampling.BICUBIC)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return a.to(net.device, net.dtype)


def dream(
    model: Any,
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
        objective = layer(default_dream_layer(model))
    obj = as_objective(objective, model)
    if octaves < 1 or octave_scale < 1 or steps < 0 or not step_size > 0 or jitter < 0:
        raise ConvscopeError("dream needs octaves >= 1, octave_scale >= 1, steps >= 0, step_size > 0, jitter >= 0")
    base = _pixels_of(image, size, net)
    gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
    h, w = base.shape[2:]
    sizes = [(max(16, round(h / octave_scale**i)), max(16, round(w / octave_scale**i))) for i in range(octaves)][::-1]
    history: list[float] = []
    passes = 0
    interrupted = False
    t0 = time.perf_counter()
    detail = torch.zeros_like(base[:, :, : sizes[0][0], : sizes[0][1]])
    result = base
    bar = tqdm(total=octaves * steps, desc=f"dream {obj.name}", disable=None if progress is None else not progress, leave=False)
    try:
        with capture_for(net, obj) as cap:
            for hs, ws in sizes:
                octave_base = F.interpolate(base, size=(hs, ws), mode="bilinear", align_corners=False) if (hs, ws) != (h, w) else base
                detail = F.interpolate(detail, size=(hs, ws), mode="bilinear", align_corners=False)
                src = (octave_base + detail).clamp(0, 1)
                for _ in range(steps):
                    src = _step(net, cap, obj, src, gen, jitter, step_size, history)
                    passes += 1
                    bar.update(1)
                detail = src - octave_base
                result = src
    except KeyboardInterrupt:
        interrupted = True
        result = src if "src" in locals() and src.shape == base.shape else result
    finally:
        bar.close()
    pixels = result.detach()
    return Dream(input=net.normalize(pixels), pixels=pixels, history=history, objective_name=obj.name,
                 octave_sizes=sizes, forward_passes=passes, backward_passes=passes,
                 seconds=time.perf_counter() - t0, interrupted=interrupted)


def _step(net, cap, obj: Objective, src: torch.Tensor, gen: torch.Generator, jitter: int, step_size: float,
          history: list[float]) -> torch.Tensor:
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
