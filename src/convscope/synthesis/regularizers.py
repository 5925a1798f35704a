"""Regularisers for synthesised images: penalties added to the loss and operations applied between steps.

Penalties (``penalty(pixels) -> (N,)``, pixels in [0, 1], centred at grey 0.5; means over pixels so
the weights do not depend on the image size):

- :class:`L1`: w * mean|p - 0.5|; :class:`L2`: w * mean (p - 0.5)^2 (Simonyan 2014's L2 decay);
- :class:`AlphaNorm`: w * mean |2(p - 0.5)|^alpha (Mahendran & Vedaldi 2015; alpha = 6 bounds the range);
- :class:`TotalVariation`: w * mean (dx^2 + dy^2)^(beta/2) over neighbouring pixels (Mahendran & Vedaldi).

Step operations (``after_step(param, step)``), for the pixel parameterisation (Yosinski et al. 2015):

- :class:`Blur`: every ``every`` steps, Gaussian blur of width ``sigma`` pixels;
- :class:`ClipPixels`: set to grey the pixels whose norm (over colour channels) is below the
  ``norm_percentile`` and those whose contribution |x * grad| is below ``contribution_percentile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError
from .params import ImageParam


class Regularizer:
    """Base class: a loss ``penalty(pixels) -> (N,)`` and/or an ``after_step(param, step)`` operation."""

    def penalty(self, pixels: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_step(self, param: ImageParam, step: int) -> None:
        return None


def _check_weight(weight: float) -> float:
    if not math.isfinite(weight) or weight < 0:
        raise ConvscopeError(f"regulariser weight must be a non-negative number, got {weight}")
    return float(weight)


class L1(Regularizer):
    """w * mean |p - 0.5| per image."""

    def __init__(self, weight: float = 0.05):
        self.weight = _check_weight(weight)

    def penalty(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.weight * (pixels - 0.5).abs().flatten(1).mean(1)


class L2(Regularizer):
    """w * mean (p - 0.5)^2 per image."""

    def __init__(self, weight: float = 0.05):
        self.weight = _check_weight(weight)

    def penalty(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.weight * (pixels - 0.5).pow(2).flatten(1).mean(1)


class AlphaNorm(Regularizer):
    """w * mean |2 (p - 0.5)|^alpha per image (pixels mapped to [-1, 1])."""

    def __init__(self, weight: float = 1e-3, alpha: float = 6.0):
        self.weight, self.alpha = _check_weight(weight), float(alpha)

    def penalty(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.weight * (2 * (pixels - 0.5)).abs().pow(self.alpha).flatten(1).mean(1)


def total_variation(pixels: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """mean over pixels of (dx^2 + dy^2)^(beta/2), per image (N,); forward differences, cropped to (H-1, W-1)."""
    dx = pixels[:, :, :-1, 1:] - pixels[:, :, :-1, :-1]
    dy = pixels[:, :, 1:, :-1] - pixels[:, :, :-1, :-1]
    d2 = dx.pow(2) + dy.pow(2)
    if beta == 2.0:
        return d2.flatten(1).mean(1)
    return (d2 + 1e-8).pow(beta / 2).flatten(1).mean(1)


class TotalVariation(Regularizer):
    """w * :func:`total_variation` (beta = 2: smooth; beta = 1: sharper edges)."""

    def __init__(self, weight: float = 0.1, beta: float = 2.0):
        self.weight, self.beta = _check_weight(weight), float(beta)

    def penalty(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.weight * total_variation(pixels, self.beta)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with standard deviation ``sigma`` pixels (reflect padding)."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    r_h, r_w = min(r, x.shape[2] - 1), min(r, x.shape[3] - 1)
    if r_h < r or r_w < r:
        return x
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class Blur(Regularizer):
    """Every ``every`` steps, blur the raw pixel tensor with a Gaussian of ``sigma`` pixels (Yosinski 2015)."""

    def __init__(self, every: int = 4, sigma: float = 0.5):
        if every < 1 or sigma < 0:
            raise ConvscopeError("blur needs every >= 1 and sigma >= 0")
        self.every, self.sigma = int(every), float(sigma)

    def after_step(self, param: ImageParam, step: int) -> None:
        if param.spatial is None:
            raise ConvscopeError("blurring between steps needs the pixel parameterisation (param='pixel')")
        if (step + 1) % self.every == 0:
            with torch.no_grad():
                param.spatial.copy_(gaussian_blur(param.spatial, self.sigma))


class ClipPixels(Regularizer):
    """Yosinski et al. 2015's clipping: grey out pixels of small norm and of small contribution.

    After each step, per image: pixels whose colour-vector norm is below the ``norm_percentile``-th
    percentile, and pixels whose contribution sum_c |x_c * grad_c| is below the
    ``contribution_percentile``-th percentile, are set to 0 in the raw (pre-sigmoid) space, i.e. grey.
    """

    def __init__(self, norm_percentile: float = 10.0, contribution_percentile: float = 10.0):
        for p in (norm_percentile, contribution_percentile):
            if not 0 <= p < 100:
                raise ConvscopeError("percentiles must be in [0, 100)")
        self.norm_pct, self.contrib_pct = float(norm_percentile), float(contribution_percentile)

    def after_step(self, param: ImageParam, step: int) -> None:
        x = param.spatial
        if x is None:
            raise ConvscopeError("pixel clipping needs the pixel parameterisation (param='pixel')")
        with torch.no_grad():
            keep = torch.ones_like(x[:, :1], dtype=torch.bool)
            if self.norm_pct > 0:
                norm = x.norm(dim=1, keepdim=True)
                keep &= norm >= torch.quantile(norm.flatten(1), self.norm_pct / 100, dim=1).view(-1, 1, 1, 1)
            if self.contrib_pct > 0 and x.grad is not None:
                contrib = (x * x.grad).abs().sum(dim=1, keepdim=True)
                keep &= contrib >= torch.quantile(contrib.flatten(1), self.contrib_pct / 100, dim=1).view(-1, 1, 1, 1)
            x.mul_(keep)
