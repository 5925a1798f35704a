"""Gradient methods: equal to Captum where Captum defines the same quantity, and hand-checked rules."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from torch import nn

import convscope as cs
from convscope.attribution import get_method
from convscope.attribution.gradients import (
    CompletenessWarning,
    deconv_relu,
    gaussian_blur,
    guided_relu,
    guided_relu6,
    quadrature,
)

warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_saliency_equals_captum_saliency_signed(builtin, chelsea_x):
    a = cs.attribute(builtin, chelsea_x, "saliency")
    ref = Saliency(builtin.module).attribute(chelsea_x, target=282, abs=False)
    assert a.target.tolist() == [282]
    assert a.raw.shape == (1, 3, 224, 224)
    assert rel_err(a.raw, ref) < 1e-4
    assert (a.forward_passes, a.backward_passes) == (1, 1)  # the top class comes from the same pass


def test_gradient_x_input_equals_captum(builtin, chelsea_x):
    a = cs.attribute(builtin, chelsea_x, "gradient_x_input", target=282)
    ref = InputXGradient(builtin.module).attribute(chelsea_x, target=282)
    assert rel_err(a.raw, ref) < 1e-4


def test_integrated_gradients_zero_baseline_equals_captum(builtin, chelsea_x):
    a = cs.attribute(builtin, chelsea_x, "integrated_gradients", steps=4, baseline="zero", target=282)
    ref, delta = IntegratedGradients(builtin.module).attribute(
        chelsea_x, target=282, n_steps=4, return_convergence_delta=True
    )
    assert rel_err(a.raw, ref) < 1e-4
    # the completeness gap is the same number Captum reports
    assert torch.allclose(a.extras["delta"], delta.cpu(), rtol=1e-3, atol=1e-3)
    assert (a.forward_passes, a.backward_passes) == (4 + 2, 4)


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "riemann_left", "riemann_middle"])
def test_integrated_gradients_rules_equal_captum(resnet_random, small_x, rule):
    a = cs.attribute(resnet_random, small_x, "integrated_gradients", steps=5, baseline="zero", rule=rule, target=[3, 7])
    ref = IntegratedGradients(resnet_random).attribute(small_x, target=[3, 7], n_steps=5, method=rule)
    if rule == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n with halved ends (they sum to (n-1)/n); ours are the
        # trapezoid rule's 1/(n-1) with halved ends, which sum to 1.
        ref = ref * 5 / 4
    assert rel_err(a.raw, ref) < 1e-4


def test_integrated_gradients_completeness_within_one_percent_at_64_steps(resnet_random, small_x):
    a = cs.attribute(resnet_random, small_x, "integrated_gradients", steps=64, baseline="zero", batch_size=64)
    err = a.extras["completeness_error"]
    assert err.shape == (2,)
    assert (err < 0.01).all()
    gap = a.extras["score_gap"]
    assert torch.allclose(a.raw.flatten(1).sum(1).cpu(), gap, rtol=0.01)


def test_integrated_gradients_black_baseline_is_a_black_image(builtin, chelsea_x):
    a = cs.attribute(builtin, chelsea_x, "integrated_gradients", steps=2, baseline="black")
    base = a.extras["baseline"]
    assert torch.allclose(builtin.to_pixels(base), torch.zeros_like(base))  # mean=std=0.5: value -1
    blur = cs.attribute(builtin, chelsea_x, "integrated_gradients", steps=2, baseline="blur").extras["baseline"]
    assert blur.shape == chelsea_x.shape
    assert (blur - chelsea_x).abs().mean() > 0.01 and blur.std() < chelsea_x.std()


@pytest.mark.parametrize(("size", "sigma", "radius", "expected_radius"), [
    ((3, 20, 24), 1.1, None, 4),  # default ceil(3 sigma), the occlusion fill's radius
    ((3, 20, 24), 1.1, 3, 3),  # floor(3 sigma), the blur baseline's radius
    ((2, 5, 9), 2.0, None, 4),  # limited to the shorter side - 1
])
def test_gaussian_blur_is_the_reflect_padded_2d_gaussian(size, sigma, radius, expected_radius):
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.arange(-expected_radius, expected_radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k2 = torch.outer(k, k) / k.sum() ** 2
    r, c = expected_radius, x.shape[1]
    want = F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k2.expand(c, 1, -1, -1), groups=c)
    assert torch.allclose(gaussian_blur(x, sigma, radius=radius), want, atol=1e-12)


def test_integrated_gradients_tensor_baseline_equal_to_input_gives_zero(resnet_random, small_x):
    a = cs.attribute(resnet_random, small_x, "integrated_gradients", steps=3, baseline=small_x.clone())
    assert a.raw.abs().max() == 0


def test_quadrature_weights_integrate_polynomials():
    alphas, w = quadrature(8, "gausslegendre")
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    assert torch.isclose((w * alphas**5).sum(), torch.tensor(1 / 6, dtype=w.dtype))  # exact for degree < 16


@pytest.mark.parametrize(
    ("method", "peer"), [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)]
)
@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_modified_relu_methods_equal_captum(method, peer, arch, vgg_random, resnet_random, small_x):
    net = vgg_random if arch == "vgg" else resnet_random
    a = cs.attribute(net, small_x, method, target=[1, 5])
    ref = peer(net).attribute(small_x, target=[1, 5])
    assert rel_err(a.raw, ref) < 1e-4
    assert not torch.allclose(a.raw, cs.attribute(net, small_x, "saliency", target=[1, 5]).raw)


def test_backward_rules_by_hand():
    x = torch.tensor([-1.0, 0.5, 3.0, 6.5, 2.0])
    g = torch.tensor([1.0, -2.0, 4.0, 1.0, 0.0])
    assert guided_relu(x, x.relu(), g).tolist() == [0.0, 0.0, 4.0, 1.0, 0.0]
    assert guided_relu6(x, x.clamp(0, 6), g).tolist() == [0.0, 0.0, 4.0, 0.0, 0.0]
    assert deconv_relu(x, x.relu(), g).tolist() == [1.0, 0.0, 4.0, 1.0, 0.0]


def test_guided_backprop_handles_inplace_relu6_by_hand():
    """y = v . relu6(W x) with an in-place ReLU6: guided gradient = W^T [(0<Wx<6) & (v>0)] v."""
    torch.manual_seed(0)
    lin = nn.Conv2d(4, 6, 1, bias=False)  # a linear map on a 1x1 "image"
    act = nn.ReLU6(inplace=True)
    head = nn.Linear(6, 2, bias=False)
    net = nn.Sequential(lin, act, nn.Flatten(), head)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 4, 1, 1) * 4)
    x = torch.randn(3, 4, 1, 1)
    w = lin.weight.detach().view(6, 4)
    a = cs.attribute(net, x, "guided_backprop", target=1).raw.view(3, 4)
    h = x.view(3, 4) @ w.T
    v = head.weight[1].detach()
    gate = ((h > 0) & (h < 6) & (v > 0)).float() * v
    assert ((h > 6).any() and (h > 0).any() and (h < 0).any())  # every branch of the rule is exercised
    assert torch.allclose(a, gate @ w, atol=1e-6)
    d = cs.attribute(net, x, "deconvnet", target=1).raw.view(3, 4)
    assert torch.allclose(d, v.clamp(min=0).expand(3, 6) @ w, atol=1e-6)
    assert act.inplace is True


def test_smoothgrad_without_noise_is_the_base_method(resnet_random, small_x):
    x1 = small_x[:1]
    sal = cs.attribute(resnet_random, x1, "saliency", target=2).raw
    sg = cs.attribute(resnet_random, x1, "smoothgrad", samples=3, noise=0.0, target=2)
    assert torch.allclose(sg.raw, sal, atol=1e-6)
    assert (sg.forward_passes, sg.backward_passes) == (3, 3)
    sq = cs.attribute(resnet_random, x1, "smoothgrad", samples=2, noise=0.0, square=True, target=2).raw
    assert torch.allclose(sq, sal**2, atol=1e-8)
    gb = cs.attribute(resnet_random, x1, "guided_backprop", target=2).raw
    sgb = cs.attribute(resnet_random, x1, "smoothgrad", samples=2, noise=0.0, base="guided_backprop", target=2).raw
    assert torch.allclose(sgb, gb, atol=1e-6)


def test_smoothgrad_matches_captum_noise_tunnel_statistically(resnet_random, small_x):
    """Same estimator as Captum's NoiseTunnel(Saliency): with many samples both converge to one map."""
    ours = cs.attribute(resnet_random, small_x[:1], "smoothgrad", samples=48, noise=0.1, target=4, batch_size=48).raw
    sigma = (0.1 * (small_x[:1].max() - small_x[:1].min())).item()
    torch.manual_seed(0)
    ref = NoiseTunnel(Saliency(resnet_random)).attribute(
        small_x[:1], nt_type="smoothgrad", nt_samples=48, stdevs=sigma, target=4, abs=False
    )
    corr = torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.8
    sal = cs.attribute(resnet_random, small_x[:1], "saliency", target=4).raw
    assert not torch.allclose(ours, sal, atol=1e-3)


def test_smoothgrad_is_reproducible_with_a_seed(resnet_random, small_x):
    a = cs.attribute(resnet_random, small_x, "smoothgrad", samples=2, seed=5, target=0).raw
    b = cs.attribute(resnet_random, small_x, "smoothgrad", samples=2, seed=5, target=0).raw
    c = cs.attribute(resnet_random, small_x, "smoothgrad", samples=2, seed=6, target=0).raw
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batching_does_not_change_results(resnet_random, small_x):
    a = cs.attribute(resnet_random, small_x, "integrated_gradients", steps=2, batch_size=3, target=[1, 2]).raw
    b = cs.attribute(resnet_random, small_x, "integrated_gradients", steps=2, batch_size=4, target=[1, 2]).raw
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    s1 = cs.attribute(resnet_random, small_x, "saliency", batch_size=1)
    s2 = cs.attribute(resnet_random, small_x, "saliency", batch_size=2)
    assert torch.equal(s1.target, s2.target)
    assert torch.allclose(s1.raw, s2.raw, atol=1e-6)


def test_gradient_method_rejects_a_layer(resnet_random, small_x):
    with pytest.raises(cs.ConvscopeError, match="takes no layer"):
        cs.attribute(resnet_random, small_x, "saliency", layer="layer4")


def test_bad_options_are_clear_errors(resnet_random, small_x):
    with pytest.raises(cs.ConvscopeError, match="option .steps. of .integrated_gradients. must be an int in 1..4096"):
        cs.attribute(resnet_random, small_x, "integrated_gradients", steps=0)
    with pytest.raises(cs.ConvscopeError, match="unknown baseline"):
        cs.attribute(resnet_random, small_x, "integrated_gradients", baseline="grey")
    with pytest.raises(cs.InputShapeError, match="baseline"):
        cs.attribute(resnet_random, small_x, "integrated_gradients", baseline=torch.zeros(5, 5))
    with pytest.raises(cs.ConvscopeError, match="must be one of"):
        cs.attribute(resnet_random, small_x, "smoothgrad", base="gradcam")


class _ModuleReLUs(nn.Module):
    """conv -> nn.ReLU -> conv -> nn.ReLU6 -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU6()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


class _FunctionalReLUs(_ModuleReLUs):
    """The same network, its activations called as ``F.relu`` / ``F.relu6`` in ``forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.conv2(F.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_functional_relu_gets_the_same_backward_rule_as_the_module(method):
    """``explain --method guided_backprop`` and ``topk --project guided`` share the probe's rule sets,
    which cover ``nn.ReLU`` modules and ``F.relu`` calls alike."""
    torch.manual_seed(0)
    modules = _ModuleReLUs()
    functional = _FunctionalReLUs()
    functional.load_state_dict(modules.state_dict())
    x = torch.randn(2, 3, 12, 12)
    layer = {"layer": "conv2"} if method == "guided_gradcam" else {}
    a = cs.attribute(modules, x, method, target=[1, 3], **layer)
    b = cs.attribute(functional, x, method, target=[1, 3], **layer)
    assert torch.allclose(a.raw, b.raw, atol=1e-6)
    plain = cs.attribute(functional, x, "saliency", target=[1, 3]).raw
    assert not torch.allclose(b.raw, plain, atol=1e-4)  # the rule did change the functional model's gradient


# ---------------------------------------------------------------------------- adaptive integrated gradients


def test_integrated_gradients_adaptive_by_default_reuses_points_and_reports_error(tiny, tiny_x):
    a = cs.attribute(tiny, tiny_x, "integrated_gradients", baseline="zero", target=[3, 7], tolerance=0.01, progress=False)
    steps, err = a.extras["steps"], a.extras["completeness_error"]
    assert a.options["steps"] is None and a.extras["tolerance"] == 0.01 and (steps > 17).any()
    assert ((err <= 0.05) == a.extras["converged"]).all()
    # doubling the trapezoid reuses every earlier point: the result is the fixed rule at the final count,
    # and the passes are that count, not the sum over levels
    for i in range(2):
        fixed = cs.attribute(tiny, tiny_x[i : i + 1], "integrated_gradients", baseline="zero", target=[3, 7][i],
                             steps=int(steps[i]), rule="riemann_trapezoid", progress=False)
        assert rel_err(a.raw[i : i + 1], fixed.raw) < 1e-4
    assert a.backward_passes == int(steps.max()) and a.forward_passes == int(steps.max()) + 2


def test_integrated_gradients_warns_when_the_step_cap_is_reached(tiny, tiny_x):
    with pytest.warns(CompletenessWarning, match="max_steps=9"):
        a = cs.attribute(tiny, tiny_x, "integrated_gradients", baseline="zero", tolerance=0.0, max_steps=9,
                         progress=False)
    assert not a.extras["converged"].any() and (a.extras["steps"] == 9).all()  # levels 9 (then 17 > 9)


def test_integrated_gradients_fixed_steps_are_not_adaptive(tiny, tiny_x):
    a = cs.attribute(tiny, tiny_x, "integrated_gradients", steps=3, progress=False)
    assert "converged" not in a.extras and (a.extras["steps"] == 3).all() and a.backward_passes == 3


@pytest.mark.slow
@pytest.mark.parametrize("target", [None, 0])  # the top class, and a class far from the top
def test_integrated_gradients_default_reaches_five_percent_on_chelsea_or_warns(builtin, chelsea_x, target):
    x = F.interpolate(chelsea_x, size=(64, 64), mode="bilinear", align_corners=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = cs.attribute(builtin, x, "integrated_gradients", target=target, batch_size=64, progress=False)
    warned = any(issubclass(w.category, CompletenessWarning) for w in caught)
    err = float(a.extras["completeness_error"][0])
    assert err <= 0.05 or warned  # never silently above the tolerance (32 fixed steps left 32% on chelsea)
    assert warned == (not bool(a.extras["converged"][0]))


# ---------------------------------------------------------------------------- guided backprop as its paper draws it


def _edge_mask(x: torch.Tensor, quantile: float = 0.9) -> torch.Tensor:
    """Pixels whose Sobel gradient magnitude (of the grey image) is in the top 10%."""
    g = x.mean(1, keepdim=True)
    k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=g.dtype).view(1, 1, 3, 3)
    mag = (F.conv2d(g, k, padding=1) ** 2 + F.conv2d(g, k.transpose(2, 3), padding=1) ** 2).sqrt()[0, 0]
    return mag > torch.quantile(mag.flatten(), quantile)


def test_guided_backprop_concentrates_on_edges_more_than_saliency(builtin):
    pixels = torch.full((1, 3, 160, 160), 0.25)
    pixels[..., 50:110, 50:110] = 0.9  # a bright square: strong edges, flat elsewhere
    x = builtin.from_pixels(pixels)
    edges = _edge_mask(x)

    def on_edges(method: str) -> float:
        energy = cs.attribute(builtin, x, method, progress=False).raw[0].abs().sum(0)
        return float(energy[edges].sum() / energy.sum())

    guided, plain = on_edges("guided_backprop"), on_edges("saliency")
    assert guided > 1.5 * plain  # measured on the built-in model: 0.22 vs 0.09 at 224 px


def test_guided_backprop_and_deconvnet_are_drawn_as_signed_rgb(tiny, tiny_x):
    assert get_method("guided_backprop").view == "signed" and get_method("deconvnet").view == "signed"
    assert get_method("saliency").view == "heatmap"
    a = cs.attribute(tiny, tiny_x, "guided_backprop", progress=False)
    picture = np.asarray(get_method("guided_backprop").draw(a)).astype(float)
    assert picture.shape == (32, 32, 3)
    # grey where the attribution is zero, brighter / darker where it is positive / negative, per channel
    raw = a.raw[0].permute(1, 2, 0).numpy()
    assert (picture[raw == 0] == 128).all()
    assert picture[raw > 0].min() >= 128 and picture[raw < 0].max() <= 128
    assert picture[raw > 0].mean() > 140 and picture[raw < 0].mean() < 116
    with pytest.raises(cs.ConvscopeError, match="pixel attributions"):
        get_method("gradcam").draw(cs.attribute(tiny, tiny_x, "gradcam", progress=False), view="signed")
