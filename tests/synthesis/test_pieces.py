"""Parameterisations, transforms and regularisers: defining properties and hand-computed values."""

from __future__ import annotations

import pytest
import torch

from convscope.errors import ConvscopeError
from convscope.synthesis import params as P
from convscope.synthesis import regularizers as R
from convscope.synthesis import transforms as T


def test_fourier_image_is_valid_and_starts_near_grey():
    p = P.fourier_image((2, 40, 30), generator=torch.Generator().manual_seed(0))
    img = p.image()
    assert img.shape == (2, 3, 40, 30) and img.min() >= 0 and img.max() <= 1
    assert (img - 0.5).abs().max() < 0.2
    img.sum().backward()
    assert p.tensors[0].grad is not None and p.spatial is None


def test_fourier_scaling_is_one_over_frequency():
    # a single spectrum coefficient at frequency f changes the image by an amount proportional to 1/f
    def amplitude(fy: int) -> float:
        p = P.fourier_image((1, 32, 32), sd=0.0, decorrelate=False)
        with torch.no_grad():
            p.tensors[0][0, 0, fy, 0, 0] = 1.0
        return float(torch.logit(p.image()[0, 0].detach()).abs().max())

    assert amplitude(2) / amplitude(4) == pytest.approx(2.0, rel=1e-4)


def test_pixel_init_round_trips_through_decorrelated_sigmoid():
    pixels = torch.rand(1, 3, 8, 8) * 0.9 + 0.05
    p = P.pixel_image((1, 8, 8), init=pixels, decorrelate=True)
    assert torch.allclose(p.image(), pixels, atol=1e-5)


def test_colour_matrix_is_normalised_by_its_largest_column():
    m = P._color_matrix()
    assert m.norm(dim=0).max() == pytest.approx(1.0)


def test_each_image_of_the_batch_gets_its_own_transform():
    x = torch.rand(1, 3, 32, 32).expand(6, -1, -1, -1)
    for t in (T.jitter(6), T.random_scale([0.8, 0.9, 1.1, 1.2]), T.random_rotate(range(-20, 21))):
        out = t(x, torch.Generator().manual_seed(0))
        distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
        assert len(distinct) > 1, type(t).__name__
        again = t(x, torch.Generator().manual_seed(0))
        assert torch.equal(out, again)


def test_pad_and_jitter_sizes_and_grey_fill():
    x = torch.zeros(2, 3, 20, 20)
    padded = T.pad(4)(x, torch.Generator())
    assert padded.shape[-1] == 28 and padded[0, 0, 0, 0] == 0.5
    assert T.jitter(5)(x, torch.Generator()).shape[-2:] == (15, 15)
    rotated = T.random_rotate([0])(torch.rand(1, 3, 9, 9), torch.Generator())
    assert rotated.shape == (1, 3, 9, 9)


def test_identity_affine_keeps_the_image():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(T.random_scale([1.0])(x, torch.Generator()), x, atol=1e-5)


def test_penalties_match_hand_computed_values():
    p = torch.full((1, 3, 4, 4), 0.5)
    p[0, :, 0, 0] = 1.0  # one bright pixel
    assert float(R.L1(1.0).penalty(p)) == pytest.approx(0.5 / 16)
    assert float(R.L2(1.0).penalty(p)) == pytest.approx(0.25 / 16)
    assert float(R.AlphaNorm(1.0, alpha=6).penalty(p)) == pytest.approx(1 / 16)
    # TV over the 3x3 cropped grid: pixel (0,0) differs from its right and lower neighbours by 0.5 each
    assert float(R.TotalVariation(1.0).penalty(p)) == pytest.approx(3 * 0.5 / 27)
    assert float(R.total_variation(torch.ones(1, 3, 5, 5))) == 0.0


def test_blur_keeps_the_mean_and_smooths():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    y = R.gaussian_blur(x, 1.0)
    assert float(y.sum()) == pytest.approx(1.0, rel=1e-4) and y.max() < 0.2


def test_yosinski_clipping_greys_small_pixels():
    p = P.pixel_image((1, 10, 10), sd=1.0, generator=torch.Generator().manual_seed(0))
    p.spatial.grad = torch.ones_like(p.spatial)
    R.ClipPixels(norm_percentile=30, contribution_percentile=0).after_step(p, 0)
    zero = (p.spatial.detach().abs().sum(1) == 0).float().mean()
    assert 0.25 <= float(zero) <= 0.35


def test_step_regularisers_need_the_pixel_parameterisation():
    p = P.fourier_image((1, 8, 8))
    with pytest.raises(ConvscopeError, match="pixel"):
        R.Blur(every=1).after_step(p, 0)
    with pytest.raises(ConvscopeError):
        R.L1(-1.0)
