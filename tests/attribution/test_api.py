"""``cs.attribute``: dispatch from the registry, targets, bad input, and the user's model left untouched by
every registered method (state, flags, hooks), after success and after a failing call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.attribution import METHODS, get_method, method_names
from convscope.attribution.registry import parse_option
from statecheck import assert_untouched, snapshot

# fast settings for the many-pass methods, applied only where the method has the option
FAST = {"steps": 3, "samples": 2, "masks": 16, "window": 16, "stride": 16}


def fast_options(name: str) -> dict:
    spec = get_method(name)
    return {k: v for k, v in FAST.items() if k in spec.options}


def user_state(net: nn.Module) -> None:
    """A model as a user might hand it over: training mode, some frozen parameters, a stale gradient."""
    net.train()
    net.features[0].weight.requires_grad_(False)
    net.fc.weight.grad = torch.ones_like(net.fc.weight)


def test_registry_lists_every_contract_method():
    names = set(method_names())
    ours = {"saliency", "gradient_x_input", "smoothgrad", "integrated_gradients", "guided_backprop", "deconvnet",
            "cam", "gradcam", "gradcam++", "guided_gradcam", "scorecam", "layercam", "hirescam", "xgradcam",
            "eigencam", "ablationcam"}
    assert ours <= names
    for name in ours:
        spec = METHODS[name]
        assert spec.summary and spec.paper and spec.passes


@pytest.mark.parametrize("name", method_names())
def test_model_untouched_after_every_method(tiny, tiny_x, name):
    user_state(tiny)
    before = snapshot(tiny)
    a = cs.attribute(tiny, tiny_x, name, **fast_options(name))
    assert_untouched(tiny, before)
    assert a.map.shape == (2, 32, 32)
    assert float(a.map.min()) >= 0 and float(a.map.max()) <= 1
    assert a.target.shape == (2,) and a.forward_passes >= 1
    assert torch.isfinite(a.raw).all()


@pytest.mark.parametrize("name", [n for n in method_names() if METHODS[n].uses_layer])
def test_model_untouched_after_a_failing_call(tiny, tiny_x, name):
    """The layer is spatial-less (the pooled output): the error is raised inside the forward pass."""
    user_state(tiny)
    before = snapshot(tiny)
    with pytest.raises(cs.ConvscopeError):
        cs.attribute(tiny, tiny_x, name, layer="pool", **fast_options(name))
    assert_untouched(tiny, before)


def test_model_untouched_after_an_interrupt(tiny, tiny_x, monkeypatch):
    user_state(tiny)
    before = snapshot(tiny)
    calls = {"n": 0}
    real = tiny.fc.forward

    def interrupted(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(tiny.fc, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cs.attribute(tiny, tiny_x, "integrated_gradients", steps=4, batch_size=2)
    monkeypatch.undo()
    assert_untouched(tiny, before)


def test_hundred_calls_leave_no_state_behind(tiny, tiny_x):
    tiny.eval()
    first = cs.attribute(tiny, tiny_x, "guided_backprop", target=1).raw
    for _ in range(100):
        last = cs.attribute(tiny, tiny_x, "guided_backprop", target=1).raw
    assert torch.equal(first, last)
    assert_untouched(tiny, snapshot(tiny))


def test_top_prediction_is_the_default_target_and_costs_no_extra_pass(tiny, tiny_x):
    tiny.eval()
    with torch.no_grad():
        top = tiny(tiny_x).argmax(1)
    for name in ("saliency", "gradcam", "cam", "eigencam"):
        a = cs.attribute(tiny, tiny_x, name)
        assert torch.equal(a.target, top)
        assert a.forward_passes == 1, name
    s = cs.attribute(tiny, tiny_x, "smoothgrad", samples=2)
    assert torch.equal(s.target, top) and s.forward_passes == 3  # 1 to find the class + 2 samples


def test_targets_by_label_and_per_image(builtin, chelsea_x):
    a = cs.attribute(builtin, chelsea_x, "gradcam", target="tiger cat")
    assert a.target.tolist() == [282]
    x2 = chelsea_x.repeat(2, 1, 1, 1)
    b = cs.attribute(builtin, x2, "gradcam", target=[282, 285])
    assert b.target.tolist() == [282, 285]
    assert not torch.allclose(b.raw[0], b.raw[1])
    c = cs.attribute(builtin, "sample:chelsea", "gradcam")
    assert torch.allclose(c.raw, a.raw)


def test_unknown_method_lists_the_valid_ones(tiny, tiny_x):
    with pytest.raises(cs.ConvscopeError, match="valid methods: .*saliency.*gradcam") as e:
        cs.attribute(tiny, tiny_x, "gradkam")
    assert "did you mean gradcam" in str(e.value)


def test_target_out_of_range(tiny, tiny_x, builtin, chelsea_x):
    with pytest.raises(cs.TargetError, match="out of range"):
        cs.attribute(tiny, tiny_x, "saliency", target=10)
    with pytest.raises(cs.TargetError, match="out of range"):
        cs.attribute(builtin, chelsea_x, "gradcam", target=1000)
    with pytest.raises(cs.TargetError, match="unknown class"):
        cs.attribute(builtin, chelsea_x, "gradcam", target="zebracorn")


def test_batch_and_target_lengths_must_match(tiny, tiny_x):
    with pytest.raises(cs.TargetError, match="3 targets for a batch of 2"):
        cs.attribute(tiny, tiny_x, "gradcam", target=[1, 2, 3])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(tiny, tiny_x, bad):
    x = tiny_x.clone()
    x[0, 0, 0, 0] = bad
    with pytest.raises(cs.InputShapeError, match="NaN or infinite"):
        cs.attribute(tiny, x, "saliency")


def test_layer_without_spatial_output(tiny, tiny_x):
    with pytest.raises(cs.InputShapeError, match="spatial"):
        cs.attribute(tiny, tiny_x, "gradcam", layer="fc")


def test_unknown_layer_and_option(tiny, tiny_x):
    with pytest.raises(cs.LayerNotFoundError, match="did you mean"):
        cs.attribute(tiny, tiny_x, "gradcam", layer="featurs")
    with pytest.raises(cs.ConvscopeError, match="has no option 'step'"):
        cs.attribute(tiny, tiny_x, "integrated_gradients", step=3)
    with pytest.raises(cs.ConvscopeError, match="must be int"):
        cs.attribute(tiny, tiny_x, "integrated_gradients", steps="many")


def test_parse_option_uses_the_registry_types():
    ig = get_method("integrated_gradients")
    assert parse_option(ig, "steps=64") == ("steps", 64)
    assert parse_option(ig, "baseline=blur") == ("baseline", "blur")
    assert parse_option(ig, "baseline=0.5") == ("baseline", 0.5)
    sg = get_method("smoothgrad")
    assert parse_option(sg, "square=yes") == ("square", True)
    assert parse_option(sg, "noise=0.2") == ("noise", 0.2)
    with pytest.raises(cs.ConvscopeError, match="must be int"):
        parse_option(ig, "steps=lots")
    with pytest.raises(cs.ConvscopeError, match="key=value"):
        parse_option(ig, "steps")


def test_mask_keeps_only_the_important_region(builtin, chelsea_x):
    import numpy as np

    a = cs.attribute(builtin, chelsea_x, "gradcam")
    img = np.asarray(a.mask(threshold=0.5))
    keep = (a.map[0] >= 0.5).numpy()
    assert 0 < keep.mean() < 1
    assert (img[~keep] == 0).all() and img[keep].mean() > 20
