"""Occlusion (exact, incremental, approximate) and RISE: values against Captum, a plain batched
reference, hand-built toy models; state hygiene; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convscope as cs
from convscope.attribution.incremental import Pointwise, Window, _cap, build_plan, materialize
from convscope.attribution.perturbation import _window_region, occlusion_positions, rise_masks
from convscope.errors import ConvscopeError
from statecheck import assert_untouched, snapshot

captum_attr = pytest.importorskip("captum.attr")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def x128(builtin) -> torch.Tensor:
    """The chelsea sample at 128 px for the built-in model (small, still a real image)."""
    x = builtin.preprocess(cs.sample_image("chelsea"))
    return F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def vgg11() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def _captum_occlusion(
    module: nn.Module, x: torch.Tensor, target: int, window: int, stride: int, fill: float = 0.0
) -> torch.Tensor:
    occ = captum_attr.Occlusion(lambda z: module(z).softmax(dim=1))
    out = occ.attribute(
        x,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=fill,
        target=target,
        perturbations_per_eval=16,
    )
    assert torch.allclose(out[:, 0], out[:, 2])  # Captum repeats the map over the channels
    return out[:, 0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class OneConvNet(nn.Module):
    """conv -> squeeze-excitation style global gate -> head: the incremental engine does not know it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        y = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))
        return self.head(y.mean(dim=(2, 3)))


class RegionMean(nn.Module):
    """Two classes; logit of class 0 = 20 (m - 0.5), m the mean of channel 0 in rows 8:16, columns 20:28."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 20 * (x[:, 0, 8:16, 20:28].mean(dim=(1, 2)) - 0.5)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


# ---------------------------------------------------------------------------- occlusion against Captum


def test_occlusion_equals_captum_on_builtin_with_border_windows(builtin, x128):
    # 128 px, window 24, stride 16: ceil(104 / 16) + 1 = 8 positions per axis, the last overhangs by 8 px
    a = cs.attribute(builtin, x128, "occlusion", window=24, stride=16, fill=0.0)
    ref = _captum_occlusion(builtin.module, x128, int(a.target[0]), 24, 16)
    assert a.extras["engine"] == "incremental"
    assert a.raw.shape == (1, 128, 128)
    assert _rel(a.raw, ref) < 1e-4
    assert a.extras["probability_map"].shape == (1, 8, 8)
    assert a.extras["copies_evaluated"] + a.extras["copies_skipped"] == 64


def test_occlusion_batched_engine_equals_captum_on_vgg11(vgg11):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 48, 48)
    a = cs.attribute(vgg11, x, "occlusion", window=16, stride=8, engine="batched", target=[3, 7])
    for i, t in enumerate((3, 7)):
        ref = _captum_occlusion(vgg11, x[i : i + 1], t, 16, 8)
        assert _rel(a.raw[i : i + 1], ref) < 1e-4
    assert a.extras["engine"] == "batched"
    assert a.forward_passes == 1 + 2 * 25


@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_incremental_equals_batched_occlusion(arch, request):
    module = request.getfixturevalue(arch)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 64, 64)
    inc = cs.attribute(module, x, "occlusion", window=16, stride=8, engine="incremental")
    ref = cs.attribute(module, x, "occlusion", window=16, stride=8, engine="batched")
    assert inc.extras["engine"] == "incremental"
    torch.testing.assert_close(
        inc.extras["probability_map"], ref.extras["probability_map"], rtol=1e-5, atol=1e-6
    )
    assert _rel(inc.raw, ref.raw) < 1e-4
    assert torch.equal(inc.extras["top_class_map"], ref.extras["top_class_map"])
    assert 0 < inc.extras["computed_fraction"] < 1


def test_incremental_plan_logits_equal_full_forward_on_builtin(builtin, x128):
    module = builtin.module
    plan = build_plan(module, x128)
    assert plan is not None and plan.family == "timm-efficientnet"
    py = torch.tensor([0, 40, 100, 120])
    px = torch.tensor([120, 8, 56, 0])
    fill = torch.randn_like(x128[0])
    reg = _window_region(x128[0], fill, py, px, 20)
    with torch.no_grad():
        got, stats = plan.run(reg, switch=0.5)
        want = module(materialize(reg, x128[0]))
        got_all, _ = plan.run(reg, switch=1.0)  # incremental through every stage
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_all, want, rtol=1e-4, atol=1e-4)
    assert stats.macs_done < stats.macs_full


def test_approximate_occlusion_correlates_with_exact(builtin, x128):
    # 128 px maps are small (4x4 at the end), so a looser cap than the 224 px default keeps 0.99
    exact = cs.attribute(builtin, x128, "occlusion", window=24, stride=12)
    approx = cs.attribute(builtin, x128, "occlusion", window=24, stride=12, approximate=True, tau=0.7)
    assert approx.extras["engine"] == "incremental (approximate)"
    corr = torch.corrcoef(torch.stack([exact.raw.flatten(), approx.raw.flatten()]))[0, 1]
    assert corr > 0.99
    assert approx.extras["computed_fraction"] < exact.extras["computed_fraction"]


def test_approximate_caps_follow_tau_and_tau_small():
    # ceil(tau * side) on maps larger than 7; maps of side <= 7 only with tau_small
    assert _cap((0.5, None), 14) == 7
    assert _cap((0.5, None), 28) == 14
    assert _cap((0.5, None), 7) is None
    assert _cap((0.5, 0.8), 7) == 6
    assert _cap((0.5, 0.8), 56) == 28
    assert _cap(None, 56) is None


def test_tau_small_caps_the_head_and_does_less_work(builtin, x128):
    loose = cs.attribute(builtin, x128, "occlusion", window=32, stride=32, approximate=True, tau=0.7)
    capped = cs.attribute(
        builtin, x128, "occlusion", window=32, stride=32, approximate=True, tau=0.7, tau_small=0.5
    )
    assert capped.extras["computed_fraction"] < loose.extras["computed_fraction"]
    assert not torch.allclose(capped.extras["probability_map"], loose.extras["probability_map"])


class BNNet(nn.Module):
    """conv-BN-ReLU -> conv(stride 2)-BN -> ReLU -> GAP -> linear, BatchNorm with non-trivial statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, 5)
        g = torch.Generator().manual_seed(3)
        for m in self.features:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g))
                m.running_var.copy_(torch.rand(8, generator=g) + 0.2)
                m.weight.data.copy_(torch.randn(8, generator=g))
                m.bias.data.copy_(torch.randn(8, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_batchnorm_is_folded_into_the_convolution_and_occlusion_stays_exact():
    torch.manual_seed(6)
    module = BNNet().eval()
    x = torch.randn(1, 3, 32, 32)
    plan = build_plan(module, x)
    assert plan is not None and plan.family == "vgg"
    # two convolutions (BatchNorm folded in) and the two ReLUs; no BatchNorm stage left
    assert [type(st) for st in plan.stages] == [Window, Pointwise, Window, Pointwise]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    inc = cs.attribute(module, x, "occlusion", window=8, stride=4, engine="incremental")
    ref = cs.attribute(module, x, "occlusion", window=8, stride=4, engine="batched")
    torch.testing.assert_close(
        inc.extras["probability_map"], ref.extras["probability_map"], rtol=1e-5, atol=1e-6
    )
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# ---------------------------------------------------------------------------- extras and fills


def test_unsupported_architecture_falls_back_to_batched_and_matches_captum():
    module = OneConvNet().eval()
    torch.manual_seed(4)
    x = torch.randn(1, 3, 32, 32)
    a = cs.attribute(module, x, "occlusion", window=8, stride=4, fill=0.5)
    assert a.extras["engine"] == "batched"
    ref = _captum_occlusion(module, x, int(a.target[0]), 8, 4, fill=0.5)
    assert _rel(a.raw, ref) < 1e-4
    with pytest.raises(ConvscopeError, match="incremental"):
        cs.attribute(module, x, "occlusion", window=8, stride=4, approximate=True)


def test_probability_and_top_class_maps_are_per_position_predictions(vgg11):
    torch.manual_seed(5)
    x = torch.randn(1, 3, 32, 32)
    a = cs.attribute(vgg11, x, "occlusion", window=16, stride=8, fill=-1.0, target=2)
    ys = occlusion_positions(32, 16, 8)
    assert ys == [0, 8, 16]
    for r, py in enumerate(ys):
        for c, px in enumerate(ys):
            copy = x.clone()
            copy[:, :, py : py + 16, px : px + 16] = -1.0
            with torch.no_grad():
                p = vgg11(copy).softmax(dim=1)[0]
            assert float(a.extras["probability_map"][0, r, c]) == pytest.approx(
                float(p[2]), rel=1e-4, abs=1e-6
            )
            assert int(a.extras["top_class_map"][0, r, c]) == int(p.argmax())


def test_channel_map_is_channel_max_under_each_occluder(vgg11):
    torch.manual_seed(6)
    x = torch.randn(1, 3, 32, 32)
    a = cs.attribute(vgg11, x, "occlusion", window=16, stride=16, channel_layer="features.3", channel=5)
    cmap = a.extras["channel_map"]
    assert cmap.shape == (1, 2, 2)
    copy = x.clone()
    copy[:, :, 16:32, 0:16] = 0.0
    with torch.no_grad():
        act = vgg11.features[:4](copy)
    assert float(cmap[0, 1, 0]) == pytest.approx(float(act[0, 5].max()), rel=1e-5)


def test_windows_equal_to_the_fill_are_skipped_and_score_zero(vgg11):
    torch.manual_seed(7)
    x = torch.randn(1, 3, 32, 32)
    x[:, :, :16, :16] = 0.0  # the top-left window is already all fill
    a = cs.attribute(vgg11, x, "occlusion", window=16, stride=16)
    assert a.extras["copies_skipped"] == 1 and a.extras["copies_evaluated"] == 3
    assert torch.all(a.raw[0, :16, :16] == 0)
    assert a.forward_passes == 1 + 2 + 3  # clean pass, plan trace (2), three copies


def test_mean_and_blur_fills(vgg11):
    torch.manual_seed(8)
    x = torch.randn(1, 3, 32, 32)
    mean = cs.attribute(vgg11, x, "occlusion", window=16, stride=16, fill="mean", target=1)
    copy = x.clone()
    copy[:, :, :16, 16:] = x.mean(dim=(2, 3), keepdim=True)
    with torch.no_grad():
        p = vgg11(copy).softmax(dim=1)[0, 1]
    assert float(mean.extras["probability_map"][0, 0, 1]) == pytest.approx(float(p), rel=1e-4)
    blur = cs.attribute(vgg11, x, "occlusion", window=16, stride=16, fill="blur", target=1)
    assert not torch.allclose(blur.raw, mean.raw)


# ---------------------------------------------------------------------------- RISE


def test_rise_is_highest_in_the_region_the_logit_reads():
    x = torch.ones(1, 3, 32, 32)
    a = cs.attribute(RegionMean(), x, "rise", masks=1000, cells=4, seed=0, target=0)
    raw = a.raw[0]
    inside = raw[8:16, 20:28].mean()
    outside = torch.cat([raw[:, :16].flatten(), raw[20:, :].flatten()]).mean()
    assert inside > outside + 0.1
    blocks = F.avg_pool2d(raw[None, None], 8, stride=4)[0, 0]  # mean over every 8x8 block, step 4
    best = int(blocks.flatten().argmax())
    assert divmod(best, blocks.shape[1]) == (2, 5)  # the block at rows 8:16, columns 20:28
    assert a.forward_passes == 1000


def test_rise_equals_its_definition():
    torch.manual_seed(9)
    x = torch.randn(1, 3, 32, 32)
    module = RegionMean()
    a = cs.attribute(module, x, "rise", masks=20, cells=3, p=0.3, seed=11, batch_size=7, target=0)
    gen = torch.Generator().manual_seed(11)
    masks = torch.cat([rise_masks(k, (32, 32), 3, 0.3, gen, x.device) for k in (7, 7, 6)])
    prob = module(x * masks).softmax(dim=1)[:, 0]
    want = (prob[:, None, None] * masks[:, 0]).sum(0) / (20 * 0.3)
    torch.testing.assert_close(a.raw[0], want, rtol=1e-5, atol=1e-6)
    assert masks.min() >= 0 and masks.max() <= 1 and 0.1 < float(masks.mean()) < 0.5


# ---------------------------------------------------------------------------- the user's model is untouched


@pytest.mark.parametrize(
    "method,options",
    [
        ("occlusion", {"window": 16, "stride": 16}),
        ("rise", {"masks": 8}),
        ("occlusion", {"window": 16, "stride": 16, "channel_layer": "features.1", "channel": 0}),
    ],
)
def test_model_untouched_after_success_and_failure(vgg11, method, options):
    module = vgg11
    module.train()
    module.classifier[0].weight.requires_grad_(True)
    before = snapshot(module)
    x = torch.randn(1, 3, 32, 32)
    cs.attribute(module, x, method, **options)
    assert_untouched(module, before)
    with pytest.raises(ConvscopeError):
        cs.attribute(module, x, method, target=99, **options)
    assert_untouched(module, before)
    module.eval()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options,match",
    [
        ({"window": 40}, "larger than the input"),
        ({"window": 0}, "option 'window' of 'occlusion' must be an int in 1..4096"),
        ({"stride": -2}, "option 'stride' of 'occlusion' must be an int in 1..4096"),
        ({"window": 8, "stride": 9}, "stride"),
        ({"fill": "purple"}, "fill"),
        ({"fill": float("nan")}, "finite"),
        ({"tau": 0.0, "approximate": True}, "tau"),
        ({"tau_small": 1.5, "approximate": True}, "tau_small"),
        ({"channel": 3}, "channel_layer"),
        ({"batch_size": 0}, "batch_size"),
        ({"engine": "magic"}, "engine"),
    ],
)
def test_occlusion_bad_options_raise_clear_errors(vgg11, options, match):
    with pytest.raises(ConvscopeError, match=match):
        cs.attribute(vgg11, torch.randn(1, 3, 32, 32), "occlusion", **options)


def test_rise_bad_options_raise_clear_errors(vgg11):
    x = torch.randn(1, 3, 32, 32)
    for options in ({"masks": 0}, {"p": 1.0}, {"cells": 64}):
        with pytest.raises(ConvscopeError):
            cs.attribute(vgg11, x, "rise", **options)


def test_channel_out_of_range_is_a_clear_error(vgg11):
    with pytest.raises(ConvscopeError, match="out of range"):
        cs.attribute(
            vgg11,
            torch.randn(1, 3, 32, 32),
            "occlusion",
            window=16,
            stride=16,
            channel_layer="features.0",
            channel=500,
        )


# ---------------------------------------------------------------------------- the seeds' occlusion mask


def test_important_region_keeps_pixels_above_threshold(vgg11):
    from convscope.attribution.perturbation import important_region

    torch.manual_seed(10)
    x = torch.randn(1, 3, 32, 32)
    a = cs.attribute(vgg11, x, "occlusion", window=16, stride=16)
    kept, keep = important_region(a, threshold=0.5, fill=-2.0)
    assert torch.equal(keep, a.map >= 0.5)
    assert torch.equal(kept[0][:, keep[0]], x[0][:, keep[0]])
    assert torch.all(kept[0][:, ~keep[0]] == -2.0)
    with pytest.raises(ConvscopeError, match="threshold"):
        important_region(a, threshold=1.5)


def test_adaptive_drill_down_evaluates_coarse_grid_and_interpolates(vgg11):
    torch.manual_seed(11)
    x = torch.randn(1, 3, 64, 64)
    full = cs.attribute(vgg11, x, "occlusion", window=16, stride=8, approximate=True, tau=1.0)
    coarse = cs.attribute(vgg11, x, "occlusion", window=16, stride=8, approximate=True, tau=1.0, drill=0.0)
    assert coarse.extras["copies_evaluated"] == 16  # rows and columns 0, 2, 4, 6 of the 7 x 7 grid
    pf, pc = full.extras["probability_map"][0], coarse.extras["probability_map"][0]
    torch.testing.assert_close(pc[::2, ::2], pf[::2, ::2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc[1, 0], (pf[0, 0] + pf[2, 0]) / 2, rtol=1e-5, atol=1e-6)
    half = cs.attribute(vgg11, x, "occlusion", window=16, stride=8, approximate=True, tau=1.0, drill=0.5)
    assert half.extras["copies_evaluated"] == 16 + 17  # half of the 33 others, rounded up
