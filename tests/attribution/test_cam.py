"""The CAM family: equal to Captum's LayerGradCam and correlated > 0.99 with pytorch-grad-cam's maps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import convscope as cs
from convscope.attribution import get_method
from convscope.attribution.cam import first_component_projection

warnings.filterwarnings("ignore", category=UserWarning)

PEERS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "eigencam": EigenCAM,
}


def corr(a, b) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64)).flatten()
    b = torch.as_tensor(np.asarray(b, dtype=np.float64)).flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def peer_map(cls, module, layer, x, targets, **kw) -> np.ndarray:
    with cls(model=module, target_layers=[layer], **kw) as peer:
        return peer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def test_gradcam_raw_equals_relu_of_captum_layergradcam(builtin, chelsea_x):
    a = cs.attribute(builtin, chelsea_x, "gradcam")
    assert a.layer == "bn2" and a.target.tolist() == [282]
    ref = LayerGradCam(builtin.module, builtin.layer("bn2")).attribute(chelsea_x, target=282)
    ref = ref.squeeze(1).clamp(min=0)
    assert a.raw.shape == (1, 7, 7)
    assert ((a.raw - ref).abs().max() / ref.abs().max()) < 1e-4
    assert (a.forward_passes, a.backward_passes) == (1, 1)  # top class from the same pass


@pytest.mark.parametrize("method", list(PEERS))
def test_cam_variants_correlate_with_pytorch_grad_cam(builtin, chelsea_x, method):
    a = cs.attribute(builtin, chelsea_x, method, layer="bn2", target=282)
    ref = peer_map(PEERS[method], builtin.module, builtin.layer("bn2"), chelsea_x, [282])
    assert a.map.shape == (1, 224, 224)
    assert corr(a.map, ref) > 0.99


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_many_pass_cams_correlate_with_pytorch_grad_cam(resnet_random, method):
    size = 64 if method == "scorecam" else 96  # the peer's Score-CAM costs one pass per channel: keep it small
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    a = cs.attribute(resnet_random, x, method, layer="layer3", target=[1, 9])
    peer = {"scorecam": ScoreCAM, "ablationcam": AblationCAM}[method]
    ref = peer_map(peer, resnet_random, resnet_random.layer3, x, [1, 9], **({"batch_size": 64} if method == "ablationcam" else {}))
    for i in range(2):
        assert corr(a.map[i], ref[i]) > 0.99


def test_scorecam_shares_one_pass_between_equal_masks_and_matches_the_naive_sum(tiny, tiny_x):
    """Dead channels (constant zero: mask all zero) cost one pass together; the map is unchanged."""
    import torch.nn.functional as F

    tiny.eval()
    with torch.no_grad():
        tiny.features[5].bias[:6] = -1e3  # channels 0-5 of features.6 are dead after the ReLU
    a = cs.attribute(tiny, tiny_x, "scorecam", layer="features.6", target=[2, 4], batch_size=5)
    assert (a.extras["distinct_masks"] <= 16 - 5).all()
    assert a.forward_passes == 1 + int(np.ceil(a.extras["distinct_masks"].float().mean().item()))
    with cs.Capture(tiny, ["features.6"]) as cap:
        cap.forward(tiny_x)
        acts = cap.activations["features.6"].clone()
    for i, t in enumerate([2, 4]):
        up = F.interpolate(acts[i : i + 1].transpose(0, 1), size=(32, 32), mode="bilinear", align_corners=True)
        lo = up.amin(dim=(1, 2, 3), keepdim=True)
        hi = up.amax(dim=(1, 2, 3), keepdim=True)
        masks = (up - lo) / (hi - lo + 1e-8)
        with torch.no_grad():
            scores = tiny(tiny_x[i : i + 1] * masks)[:, t]
        w = scores.softmax(0)
        expected = (w.view(-1, 1, 1) * acts[i]).sum(0).clamp(min=0)
        assert torch.allclose(a.raw[i], expected, rtol=1e-4, atol=1e-6)


def test_cam_equals_gradcam_times_positions_for_gap_linear_head(builtin, chelsea_x):
    """With GAP + linear, dS/dA_k = W_ck / (h w): Grad-CAM = ReLU(CAM) / (h w)."""
    c = cs.attribute(builtin, chelsea_x, "cam", target=282)
    g = cs.attribute(builtin, chelsea_x, "gradcam", target=282)
    assert torch.allclose(c.raw.clamp(min=0) / 49, g.raw, rtol=1e-4, atol=1e-6)
    assert (cs.attribute(builtin, chelsea_x, "cam", target=0).raw < 0).any()  # CAM keeps its sign
    assert c.forward_passes == 1 and c.backward_passes == 0


def test_cam_refuses_heads_that_are_not_gap_linear(vgg_random, small_x):
    with pytest.raises(cs.ConvscopeError, match="global average pooling"):
        cs.attribute(vgg_random, small_x, "cam", layer="features")


def test_eigencam_is_first_principal_component_with_positive_orientation():
    torch.manual_seed(0)
    pattern = torch.zeros(5, 5)
    pattern[1:3, 1:4] = 1.0
    loadings = torch.rand(16) + 0.5
    a = (loadings.view(16, 1, 1) * pattern + 0.01 * torch.randn(16, 5, 5)).clamp(min=0).unsqueeze(0)
    proj = first_component_projection(a)[0]
    assert corr(proj, pattern) > 0.99  # the dominant pattern, positive where it is active
    assert torch.allclose(first_component_projection(2 * a), 2 * first_component_projection(a), atol=1e-4)


@pytest.mark.parametrize("layer", ["global_pool", "classifier"])
def test_cam_needs_a_spatial_layer(builtin, chelsea_x, layer):
    with pytest.raises(cs.InputShapeError, match="spatial"):
        cs.attribute(builtin, chelsea_x, "gradcam", layer=layer)


def test_ablationcam_tail_only_equals_full_batch_ablation(resnet_random):
    """The broadcast tail run gives the scores of a plain batched ablation (checked by hand for 3 channels)."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    a = cs.attribute(resnet_random, x, "ablationcam", layer="layer4.0", target=3)
    acts = {}
    with cs.Capture(resnet_random, ["layer4.0"]) as cap:
        logits = cap.forward(x)
        acts = cap.activations["layer4.0"].clone()
    base = logits[0, 3]
    for k in [0, 5, 17]:
        ablated = acts.clone()
        ablated[0, k] = 0
        with cs.Capture(resnet_random, edit={"layer4.0": lambda _o, t=ablated: t}) as cap:
            s = cap.forward(x)[0, 3]
        expected = 0.0 if acts[0, k].abs().max() == 0 else ((base - s) / base).item()
        assert abs(a.extras["weights"][0, k].item() - expected) < 1e-4


def test_hirescam_equals_gradcam_only_where_the_gradient_is_spatially_constant(builtin, chelsea_x):
    """Before GAP + linear the gradient is W_c / (h w) everywhere, so HiResCAM = Grad-CAM (Draelos & Carin);
    at an inner block it is not, and the two maps differ."""
    last = {m: cs.attribute(builtin, chelsea_x, m, target=282).raw for m in ["gradcam", "hirescam", "layercam"]}
    assert torch.allclose(last["gradcam"], last["hirescam"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(last["layercam"], last["gradcam"])
    inner = {m: cs.attribute(builtin, chelsea_x, m, layer="blocks.5", target=282).raw for m in ["gradcam", "hirescam"]}
    assert inner["gradcam"].shape == (1, 7, 7)
    assert not torch.allclose(inner["gradcam"], inner["hirescam"], rtol=1e-2)


def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam(builtin, chelsea_x):
    gg = cs.attribute(builtin, chelsea_x, "guided_gradcam", target=282)
    gb = cs.attribute(builtin, chelsea_x, "guided_backprop", target=282).raw
    gc = cs.attribute(builtin, chelsea_x, "gradcam", target=282).map
    assert gg.raw.shape == (1, 3, 224, 224)
    assert torch.allclose(gg.raw, gb * gc.unsqueeze(1), rtol=1e-4, atol=1e-7)
    assert (gg.forward_passes, gg.backward_passes) == (2, 2)


class _ViewHead(nn.Module):
    """conv -> relu -> conv -> a head that flattens with ``view(1, -1)``: a batch of ablated activations
    cannot broadcast through it, so Ablation-CAM must repeat the image instead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.oom = False  # simulate running out of memory on the broadcast (tail-only) run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x)))
        if self.oom and h.shape[0] != x.shape[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.28 TiB")
        return self.fc(h.reshape(x.shape[0], -1))


def test_ablationcam_falls_back_on_a_shape_mismatch_only():
    torch.manual_seed(0)
    net = _ViewHead()
    x = torch.randn(1, 3, 8, 8)
    a = cs.attribute(net, x, "ablationcam", layer="conv2", target=1)
    assert torch.isfinite(a.raw).all() and a.raw.shape == (1, 8, 8)

    net.oom = True
    with pytest.raises(torch.OutOfMemoryError):  # never retried with a B times larger batch
        cs.attribute(net, x, "ablationcam", layer="conv2", target=1)


def test_shape_mismatch_test_tells_allocator_errors_apart():
    from convscope.attribution.cam import is_shape_mismatch

    assert is_shape_mismatch(RuntimeError("The size of tensor a (4) must match the size of tensor b (1) at non-singleton dimension 0"))
    assert is_shape_mismatch(RuntimeError("shape '[1, 256]' is invalid for input of size 1024"))
    assert not is_shape_mismatch(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_shape_mismatch(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not is_shape_mismatch(RuntimeError("something else broke"))


def test_cam_strategies_are_functions():
    from convscope.attribution import cam

    for name, strategy in (("gradcam", cam.gradcam_map), ("layercam", cam.layercam_map)):
        assert cam.gradient_cam(strategy).__doc__ == strategy.__doc__
        assert get_method(name).summary == strategy.__doc__.strip().splitlines()[0]
