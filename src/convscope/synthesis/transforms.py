"""Random transforms that make a synthesised image robust (Mordvintsev et al. 2015; Olah et al. 2017).

Each transform maps pixels (N, 3, H, W) in [0, 1] to pixels and draws a *different* random value for
every image of the batch from the given ``torch.Generator`` (peers shared one draw per batch, which
couples the images of a batched rendering). Compose them with :func:`compose`; :func:`standard` is
Lucid's set: pad 12, jitter 8, scale 0.90-1.10, rotate +-10 degrees, jitter 4 (at 128 px; pixel
amounts scale with the image size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError


class Transform:
    """A callable ``t(pixels, generator) -> pixels``."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _choice(values: Sequence[float], n: int, generator: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(values), (n,), generator=generator)
    return torch.as_tensor(list(values), dtype=torch.float32)[idx]


class pad(Transform):
    """Pad ``width`` pixels on every side with a constant ``value`` (grey by default) or ``mode="reflect"``."""

    def __init__(self, width: int, value: float = 0.5, mode: str = "constant"):
        self.width, self.value, self.mode = int(width), float(value), mode

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.width <= 0:
            return x
        p = (self.width,) * 4
        return F.pad(x, p, mode=self.mode, value=self.value) if self.mode == "constant" else F.pad(x, p, mode=self.mode)


class jitter(Transform):
    """Crop (H - d, W - d) at a random offset in [0, d] per image: translations of up to ``d`` pixels."""

    def __init__(self, d: int):
        self.d = int(d)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d = self.d
        if d <= 0:
            return x
        n, _, h, w = x.shape
        if d >= min(h, w):
            raise ConvscopeError(f"jitter {d} is too large for a {h}x{w} image")
        oy = torch.randint(d + 1, (n,), generator=generator).tolist()
        ox = torch.randint(d + 1, (n,), generator=generator).tolist()
        return torch.stack([x[i, :, oy[i]:oy[i] + h - d, ox[i]:ox[i] + w - d] for i in range(n)])


def _affine(x: torch.Tensor, scale: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Zoom by ``scale`` and rotate by ``angle_deg`` about the centre, per image; grey fill outside."""
    a = angle_deg * (math.pi / 180)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


class random_scale(Transform):
    """Zoom each image by a factor drawn from ``scales`` (same output size, bilinear)."""

    def __init__(self, scales: Sequence[float]):
        self.scales = list(scales)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = _choice(self.scales, x.shape[0], generator)
        return _affine(x, s, torch.zeros_like(s))


class random_rotate(Transform):
    """Rotate each image by an angle in degrees drawn from ``angles`` (about the centre, bilinear)."""

    def __init__(self, angles: Sequence[float]):
        self.angles = list(angles)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        a = _choice(self.angles, x.shape[0], generator)
        return _affine(x, torch.ones_like(a), a)


class compose(Transform):
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x


def standard(size: int = 128) -> compose:
    """Lucid's standard robustness set, pixel amounts scaled by ``size / 128`` (at least 1 px)."""
    f = max(size / 128, 0.25)
    px = lambda v: max(1, round(v * f))  # noqa: E731
    return compose([
        pad(px(12)),
        jitter(px(8)),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),
        random_rotate(list(range(-10, 11))),
        jitter(px(4)),
    ])


def strong(size: int = 128) -> compose:
    """The wide set for class images, pixel amounts scaled by ``size / 128`` (at least 1 px).

    On the built-in EfficientNet, ``logit:385`` (Indian elephant) at 128 px and 256 steps shows an
    elephant's head, ear, eye and skin with this set; the standard set gives mostly skin texture."""
    f = max(size / 128, 0.25)
    px = lambda v: max(1, round(v * f))  # noqa: E731
    return compose([
        pad(px(16)),
        jitter(px(16)),
        random_scale([0.6 + i / 20 for i in range(17)]),
        random_rotate(list(range(-15, 16))),
        jitter(px(8)),
    ])


def resolve(transforms: str | Transform | Sequence[Transform] | None, size: int, *, logits: bool = False) -> Transform | None:
    """``"auto"`` (``"strong"`` when the objective reads the ``logits``, else ``"standard"``), ``"standard"``,
    ``"strong"``, ``"none"``/``None``, a transform or a list of transforms -> one transform."""
    if transforms is None or transforms == "none":
        return None
    if transforms == "auto":
        transforms = "strong" if logits else "standard"
    if transforms == "standard":
        return standard(size)
    if transforms == "strong":
        return strong(size)
    if isinstance(transforms, Transform):
        return transforms
    if isinstance(transforms, (list, tuple)):
        return compose(transforms)
    raise ConvscopeError(f"unknown transforms {transforms!r}; use 'auto', 'standard', 'strong', 'none' or a list of transforms")
