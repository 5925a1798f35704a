"""The probe: layer addressing, the layer table with receptive fields, the capture engine and the guard."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import convscope as cs
from convscope.errors import LayerNotFoundError
from convscope.probe import Capture, guard, layer_table, resolve_layer
from statecheck import assert_untouched, snapshot


# ---------------------------------------------------------------- addressing
def test_unknown_layer_suggests_close_names(builtin):
    with pytest.raises(LayerNotFoundError, match="conv_head") as err:
        resolve_layer(builtin.module, "conv_haed")
    assert "did you mean" in str(err.value)
    assert resolve_layer(builtin, "blocks.6.0.conv_pwl") is builtin.module.blocks[6][0].conv_pwl


def test_default_layers():
    assert cs.default_layer(cs.load_model()) == "bn2"
    assert cs.default_layer(cs.load_model("resnet18", weights=None)) == "layer4"
    assert cs.default_layer(cs.load_model("vgg11", weights=None)) == "features"
    assert cs.default_layer(cs.load_model("vgg11", weights=None), "first_conv") == "features.0"


# ---------------------------------------------------------------- layer table
def test_layer_table_of_the_builtin_model(builtin):
    rows = builtin.layers()
    by_name = {r.name: r for r in rows}
    names = [r.name for r in rows]
    assert names.index("blocks") < names.index("blocks.0") < names.index("blocks.0.0.conv_dw")  # parents first
    assert by_name["conv_stem"].output_shape == (1, 32, 112, 112)
    assert by_name["bn2"].output_shape == (1, 1280, 7, 7)
    assert by_name["classifier"].output_shape == (1, 1000)
    assert by_name["classifier"].params == 1280 * 1000 + 1000
    rf = by_name["conv_stem"].receptive_field
    assert rf.size == (3, 3) and rf.stride == (2, 2)
    assert by_name["bn2"].receptive_field.stride == (32, 32)
    assert by_name["classifier"].receptive_field.is_global
    assert sum(r.params for r in rows if r.depth == 1) == sum(p.numel() for p in builtin.module.parameters())


class _Probe(nn.Module):
    """Convolutions, average pooling, padding and a residual branch, with positive weights."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 1, 5, stride=2, padding=2)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.b = nn.Conv2d(1, 1, 3, padding=1)
        self.c = nn.Conv2d(1, 1, 3, padding=2, dilation=2)
        self.d = nn.Conv2d(1, 1, 2, stride=2)
        for p in self.parameters():
            nn.init.constant_(p, 0.1)

    def forward(self, x):
        x = self.pool(torch.relu(self.a(x)))
        x = x + self.c(self.b(x))  # residual: the wider branch sets the field
        return self.d(nn.functional.pad(x, (1, 0, 1, 0)))


@pytest.mark.parametrize("layer", ["a", "pool", "b", "c", "d"])
def test_receptive_field_matches_the_gradient_support(layer):
    model = _Probe().eval()
    rows = {r.name: r for r in layer_table(model, (1, 1, 64, 64))}
    rf = rows[layer].receptive_field
    h, w = rows[layer].output_shape[2:]
    y, x = h // 2, w // 2
    inp = torch.ones(1, 1, 64, 64, requires_grad=True)
    with Capture(model, [layer], grads=True) as cap:
        cap.forward(inp)
        act = cap.activations[layer]
        (g,) = torch.autograd.grad(act[0, 0, y, x], inp)
    rows_hit = g[0, 0].abs().sum(1).nonzero().flatten()
    cols_hit = g[0, 0].abs().sum(0).nonzero().flatten()
    top, left, bottom, right = rf.box(y, x)
    assert (rows_hit.min().item(), rows_hit.max().item() + 1) == (top, bottom)
    assert (cols_hit.min().item(), cols_hit.max().item() + 1) == (left, right)


def test_receptive_field_of_resnet18_layer4():
    rows = {r.name: r for r in layer_table(torchvision.models.resnet18().eval(), (1, 3, 224, 224))}
    assert rows["conv1"].receptive_field.size == (7, 7)
    assert rows["maxpool"].receptive_field.size == (11, 11)
    assert rows["layer4"].receptive_field.size == (435, 435)  # known value for ResNet-18
    assert rows["layer4"].receptive_field.stride == (32, 32)


# ---------------------------------------------------------------- capture engine
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act(self.conv(x)))).mean((2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return _Tiny().eval()


def test_capture_records_activations_and_gradients(tiny):
    x = torch.randn(2, 3, 8, 8)
    with Capture(tiny, ["conv", "conv2"], grads=True) as cap:
        out = cap.forward(x)
        out[:, 1].sum().backward()
    expected_conv = tiny.conv(x)
    assert torch.allclose(cap.activations["conv"], expected_conv)  # before the in-place ReLU touched it
    a2 = tiny.conv2(torch.relu(expected_conv)).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(tiny.fc(torch.clamp(a2, 0, 6).mean((2, 3)))[:, 1].sum(), a2)
    assert torch.allclose(cap.gradients["conv2"], g, atol=1e-6)


def test_capture_stops_after_the_deepest_layer(tiny):
    seen = []
    handle = tiny.fc.register_forward_hook(lambda *a: seen.append(1))
    try:
        with Capture(tiny, ["conv"], stop=True) as cap:
            assert cap.forward(torch.randn(1, 3, 8, 8)) is None
        assert seen == [] and cap.activations["conv"].shape == (1, 4, 8, 8)
    finally:
        handle.remove()


def test_backward_rules_replace_relu_and_relu6_gradients(tiny):
    x = torch.randn(1, 3, 8, 8, requires_grad=True)

    def guided(inp, out, grad):
        return grad.clamp(min=0) * (out > 0) * (inp < 6)

    with Capture(tiny, ["conv2"], rules={nn.ReLU: guided, nn.ReLU6: guided}) as cap:
        (g_rule,) = torch.autograd.grad(cap.forward(x)[0, 0], x)
    # by hand: same network, guided rule applied at both activations
    h1 = tiny.conv(x)
    r1 = _GuidedRef.apply(h1, 1e9)
    h2 = tiny.conv2(r1)
    r2 = _GuidedRef.apply(h2, 6.0)
    (g_ref,) = torch.autograd.grad(tiny.fc(r2.mean((2, 3)))[0, 0], x)
    assert torch.allclose(g_rule, g_ref, atol=1e-6)
    assert not torch.allclose(g_rule, torch.autograd.grad(tiny(x)[0, 0], x)[0])


class _GuidedRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top):
        ctx.save_for_backward(x)
        ctx.top = top
        return x.clamp(0, top)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * (x > 0) * (x < ctx.top), None


class _Functional(nn.Module):
    """The same computation as ``_Tiny`` but with functional activations (no activation modules)."""

    def __init__(self, tiny: nn.Module):
        super().__init__()
        self.conv, self.conv2, self.fc = tiny.conv, tiny.conv2, tiny.fc

    def forward(self, x):
        h = torch.nn.functional.relu(self.conv(x), inplace=True)
        return self.fc(torch.nn.functional.relu6(self.conv2(h)).mean((2, 3)))


def test_backward_rules_reach_functional_activations(tiny):
    functional = _Functional(tiny).eval()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)

    def guided(inp, out, grad):
        return grad.clamp(min=0) * (inp > 0) * (inp < 6)

    with Capture(tiny, rules={nn.ReLU: guided, nn.ReLU6: guided}) as cap:
        (g_modules,) = torch.autograd.grad(cap.forward(x)[0, 0], x)
    with Capture(functional, rules={"relu": guided, "relu6": guided}) as cap:
        out = cap.forward(x)
        (g_functional,) = torch.autograd.grad(out[0, 0], x)
    assert torch.allclose(out, tiny(x))  # forward values unchanged
    assert torch.allclose(g_functional, g_modules, atol=1e-6)
    with pytest.raises(ValueError, match="unknown functional activation"):
        Capture(functional, rules={"gelu": guided})


def test_edit_changes_an_activation(tiny):
    x = torch.randn(1, 3, 8, 8)
    with Capture(tiny, [], edit={"conv2": lambda out: out * 0}) as cap:
        out = cap.forward(x)
    assert torch.allclose(out, tiny.fc.bias.expand(1, 3))


# ---------------------------------------------------------------- the guard restores everything
def _user_state(model: nn.Module) -> None:
    model.train()
    model.fc.weight.requires_grad_(False)
    model.conv.weight.grad = torch.ones_like(model.conv.weight)


def test_model_is_restored_after_success(tiny):
    _user_state(tiny)
    before = snapshot(tiny)
    with Capture(tiny, ["conv"], grads=True, rules={nn.ReLU: lambda i, o, g: g}) as cap:
        assert not tiny.training and not tiny.act.inplace and not tiny.conv.weight.requires_grad
        cap.forward(torch.randn(1, 3, 8, 8))[0, 0].backward()
    assert_untouched(tiny, before)
    assert tiny.training and tiny.act.inplace and tiny.act2.inplace


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_model_is_restored_after_an_error(tiny, error):
    _user_state(tiny)
    before = snapshot(tiny)
    with pytest.raises(error), Capture(tiny, ["conv", "conv2"], grads=True, rules={nn.ReLU6: lambda i, o, g: g}):
        raise error("interrupted")
    assert_untouched(tiny, before)
    with pytest.raises(LayerNotFoundError), Capture(tiny, ["conv", "nope"]):
        pass
    assert_untouched(tiny, before)


def test_failing_forward_inside_capture_restores(tiny):
    before = snapshot(tiny)
    with pytest.raises(RuntimeError), Capture(tiny, ["conv"], grads=True) as cap:
        cap.forward(torch.randn(1, 5, 8, 8))  # wrong channel count
    assert_untouched(tiny, before)


def test_guard_restores_builtin_model(builtin):
    before = snapshot(builtin.module)
    with guard(builtin.module):
        builtin.module.train()
        for p in builtin.module.parameters():
            p.requires_grad_(True)
    assert_untouched(builtin.module, before)


def test_many_captures_do_not_leak(tiny):
    import gc

    x = torch.randn(1, 3, 8, 8)
    for _ in range(3):
        with Capture(tiny, ["conv2"], grads=True) as cap:
            cap.forward(x).sum().backward()
    gc.collect()
    baseline = len(gc.get_objects())
    for _ in range(100):
        with Capture(tiny, ["conv2"], grads=True) as cap:
            cap.forward(x).sum().backward()
    gc.collect()
    assert len(gc.get_objects()) - baseline < 200
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())


class _ViewsConvFeatures(torch.nn.Module):
    """An old-style model: ``.view`` on convolutional features (fails on channels-last activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


def test_forward_fast_uses_channels_last_on_cpu_and_gives_the_same_values(monkeypatch):
    from convscope import probe

    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    seen = []
    conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        fast, plain = probe.forward_fast(conv, x), conv(x)
    assert seen == [True, False] and x.is_contiguous()  # the caller's tensor is left as it was
    assert torch.allclose(fast, plain, atol=1e-6)
    monkeypatch.setattr(probe, "CHANNELS_LAST", False)
    seen.clear()
    probe.forward_fast(conv, x)
    assert seen == [False]


def test_forward_fast_falls_back_for_models_that_cannot_take_channels_last():
    from convscope import probe

    model = _ViewsConvFeatures().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError):
        model(x.contiguous(memory_format=torch.channels_last))  # the hazard is real
    assert torch.allclose(probe.forward_fast(model, x), model(x))
    assert not probe.wants_channels_last(model, x)  # remembered: no second failing try
    a = cs.attribute(model, x, "saliency", target=1)
    assert a.raw.shape == x.shape
