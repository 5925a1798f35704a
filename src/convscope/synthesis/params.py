"""Image parameterisations: the trainable tensors an optimiser changes and how they become pixels.

Each function returns an :class:`ImageParam`: ``tensors`` (what the optimiser updates) and ``image()``
giving pixels in [0, 1], shape (N, 3, H, W). Two choices compose (Olah et al. 2017, Lucid):

- *space*: ``pixel`` (one value per pixel and channel) or ``fourier`` (a real 2-D spectrum whose
  coefficients are scaled by 1/f^decay, so every frequency starts with equal energy after scaling;
  the image is the inverse FFT, divided by 4 to reduce saturation);
- *colour*: ``decorrelate=True`` multiplies the 3 channels by the square root of ImageNet's colour
  correlation (normalised by its largest column norm), so the optimiser works in a whitened colour space.

The result is squashed to [0, 1] with a sigmoid. Initial values are N(0, sd^2) from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConvscopeError

COLOR_CORRELATION_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float32
)
"""3x3 square root of ImageNet's colour correlation matrix (Lucid's ``color_correlation_svd_sqrt``)."""


def _color_matrix() -> torch.Tensor:
    return COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()


@dataclass
class ImageParam:
    """Trainable tensors plus the function that turns them into pixels (N, 3, H, W) in [0, 1].

    ``spatial`` is the raw per-pixel tensor for the pixel parameterisation (pre-sigmoid, 0 = grey);
    step-wise regularisers such as blurring and Yosinski's clipping act on it directly. It is ``None``
    for the Fourier parameterisation.
    """

    tensors: list[torch.Tensor]
    image: Callable[[], torch.Tensor]
    spatial: torch.Tensor | None = None
    kind: str = "pixel"


def _to_rgb(t: torch.Tensor, decorrelate: bool) -> torch.Tensor:
    if decorrelate:
        m = _color_matrix().to(t.device, t.dtype)
        t = torch.einsum("ck,nkhw->nchw", m, t)
    return torch.sigmoid(t)


def _from_rgb(pixels: torch.Tensor, decorrelate: bool) -> torch.Tensor:
    t = torch.logit(pixels.clamp(1e-3, 1 - 1e-3))
    if decorrelate:
        m = _color_matrix().to(t.device, t.dtype)
        t = torch.einsum("ck,nkhw->nchw", torch.linalg.inv(m), t)
    return t


def pixel_image(
    shape: tuple[int, int, int],
    *,
    sd: float = 0.01,
    decorrelate: bool = True,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> ImageParam:
    """One trainable value per pixel and channel; ``shape`` = (N, H, W).

    ``init``: start from these pixels (N, 3, H, W) in [0, 1] instead of noise (the inverse sigmoid
    and colour transform are applied so that ``image()`` returns them at step 0).
    """
    n, h, w = shape
    if init is not None:
        raw = _from_rgb(init.detach().float().to(device), decorrelate).clone()
    else:
        raw = (torch.randn((n, 3, h, w), generator=generator) * sd).to(device)
    raw.requires_grad_(True)
    return ImageParam([raw], lambda: _to_rgb(raw, decorrelate), spatial=raw, kind="pixel")


def _frequencies(h: int, w: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def fourier_image(
    shape: tuple[int, int, int],
    *,
    sd: float = 0.01,
    decay_power: float = 1.0,
    decorrelate: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> ImageParam:
    """A real 2-D spectrum per channel, scaled by 1/max(f, 1/max(H, W))^decay_power; ``shape`` = (N, H, W).

    image = sigmoid(colour(irfft2(spectrum * scale) / 4)) with the orthonormal inverse FFT (Lucid's
    ``scale * sqrt(H W)`` followed by TensorFlow's 1/(H W)-normalised inverse gives the same magnitudes).
    """
    n, h, w = shape
    freqs = _frequencies(h, w)
    scale = 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power
    scale = scale.to(device)
    spectrum = (torch.randn((n, 3, h, w // 2 + 1, 2), generator=generator) * sd).to(device).requires_grad_(True)

    def image() -> torch.Tensor:
        coeffs = torch.view_as_complex(spectrum) * scale
        t = torch.fft.irfft2(coeffs, s=(h, w), norm="ortho") / 4.0
        return _to_rgb(t, decorrelate)

    return ImageParam([spectrum], image, spatial=None, kind="fourier")


def image_param(
    kind: str,
    shape: tuple[int, int, int],
    *,
    sd: float = 0.01,
    decorrelate: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> ImageParam:
    """Build a parameterisation by name: ``"fourier"`` or ``"pixel"``."""
    if kind == "fourier":
        return fourier_image(shape, sd=sd, decorrelate=decorrelate, generator=generator, device=device)
    if kind == "pixel":
        return pixel_image(shape, sd=sd, decorrelate=decorrelate, generator=generator, device=device)
    raise ConvscopeError(f"unknown parameterisation {kind!r}; choose fourier or pixel")
