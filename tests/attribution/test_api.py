"""``cs.attribute``: dispatch from the registry, targets, bad input, and the user's model left untouched by
every registered method (state, flags, hooks), after success and after a failing call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.attribution import METHODS, get_method, method_names
from convscope.attribution.registry import parse_option
from convscope.options import OptionError
from statecheck import assert_untouched, snapshot


def fast_options(name: str) -> dict:
    """The method's registered preview settings (the same cheap table ``explain --method all`` uses)."""
    return dict(get_method(name).preview)


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
    with pytest.raises(cs.ConvscopeError, match="must be an int"):
        cs.attribute(tiny, tiny_x, "integrated_gradients", steps="many")


def test_parse_option_uses_the_registry_types():
    ig = get_method("integrated_gradients")
    assert parse_option(ig, "steps=64") == ("steps", 64)
    assert parse_option(ig, "baseline=blur") == ("baseline", "blur")
    assert parse_option(ig, "baseline=0.5") == ("baseline", 0.5)
    sg = get_method("smoothgrad")
    assert parse_option(sg, "square=yes") == ("square", True)
    assert parse_option(sg, "noise=0.2") == ("noise", 0.2)
    with pytest.raises(cs.ConvscopeError, match="must be an int"):
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


# ---------------------------------------------------------------------------- bounds, declared once


def test_every_numeric_option_declares_its_bounds():
    for name in method_names():
        for key, opt in METHODS[name].options.items():
            if set(opt.types) & {int, float} and opt.choices is None:
                assert opt.minimum is not None and opt.maximum is not None, f"{name}.{key} has no bounds"
                assert opt.minimum <= opt.maximum and opt.finite


@pytest.mark.parametrize(("method", "options", "needle"), [
    ("integrated_gradients", {"steps": 0}, "option 'steps' of 'integrated_gradients' must be an int in 1..4096"),
    ("integrated_gradients", {"steps": 1_000_000}, "in 1..4096"),
    ("smoothgrad", {"noise": float("nan")}, "must be a finite number"),
    ("smoothgrad", {"noise": -0.1}, "option 'noise' of 'smoothgrad' must be a float in 0..10"),
    ("smoothgrad", {"seed": 99999999999999999999999}, "option 'seed' of 'smoothgrad' must be an int in 0..4294967295"),
    ("saliency", {"batch_size": 0}, "option 'batch_size' of 'saliency' must be an int in 1..4096"),
    ("scorecam", {"batch_size": -1}, "in 1..4096"),
    ("occlusion", {"window": 0}, "option 'window' of 'occlusion' must be an int in 1..4096"),
    ("rise", {"p": 1.5}, "option 'p' of 'rise' must be a float in 0..1"),
    ("rise", {"masks": 0}, "in 1..100000"),
])
def test_out_of_range_options_name_the_option_and_its_range(tiny, tiny_x, method, options, needle):
    with pytest.raises(OptionError) as e:
        cs.attribute(tiny, tiny_x, method, **options)
    assert needle in str(e.value)


def test_preview_settings_are_checked_at_registration():
    from convscope.attribution.registry import register_method
    from convscope.options import Option

    with pytest.raises(ValueError, match="not one of its options"):
        register_method("nope", family="gradient", passes="1", options={}, preview={"steps": 3})
    with pytest.raises(cs.ConvscopeError, match="in 1..4"):
        register_method("nope", family="gradient", passes="1", options={"k": Option(int, 1, "", minimum=1, maximum=4)},
                        preview={"k": 9})
    assert "nope" not in METHODS


# ---------------------------------------------------------------------------- presentation on the spec


def test_spec_view_and_json():
    assert get_method("saliency").view == "heatmap" and get_method("gradcam").view == "overlay"
    assert get_method("occlusion").view == "overlay"
    doc = get_method("integrated_gradients").to_json()
    assert doc["name"] == "integrated_gradients" and doc["family"] == "gradient" and doc["view"] == "heatmap"
    steps = next(o for o in doc["options"] if o["name"] == "steps")
    assert steps["minimum"] == 1 and steps["maximum"] == 4096 and steps["type"] == ["int"] and steps["default"] is None
    import json

    json.dumps([get_method(n).to_json() for n in method_names()], allow_nan=False)  # every spec serialises


def test_spec_draws_heatmap_overlay_and_mask(tiny, tiny_x):
    spec = get_method("saliency")
    a = cs.attribute(tiny, tiny_x, "saliency")
    assert spec.draw(a).tobytes() == a.heatmap(cmap="inferno").tobytes()
    assert spec.draw(a, view="overlay", alpha=0.3).tobytes() == a.overlay(alpha=0.3).tobytes()
    assert spec.draw(a, view="mask", threshold=0.7).tobytes() == a.mask(threshold=0.7).tobytes()
    with pytest.raises(cs.ConvscopeError, match="view must be one of"):
        spec.draw(a, view="sideways")


# ---------------------------------------------------------------------------- the method contract


def test_reading_the_context_target_runs_no_forward_pass(tiny, tiny_x):
    from convscope.attribution.contract import Context

    calls = []
    tiny.register_forward_hook(lambda *a: calls.append(1))
    ctx = Context(model=cs.as_model(tiny), x=tiny_x)
    assert ctx.target is None and not calls
    with torch.no_grad():
        top = tiny(tiny_x).argmax(1)
    calls.clear()
    assert torch.equal(ctx.resolve_target(), top) and len(calls) == 1 and ctx.extra_forward_passes == 1
    assert torch.equal(ctx.resolve_target(), top) and len(calls) == 1  # resolved once


def test_methods_do_not_import_the_dispatcher():
    import pathlib

    import convscope.attribution as pkg

    folder = pathlib.Path(pkg.__file__).parent
    for name in ("gradients.py", "cam.py", "perturbation.py"):
        text = (folder / name).read_text()
        assert "from .api import" not in text, name


def test_progress_false_draws_no_bar(tiny, tiny_x, capsys, monkeypatch):
    import convscope.attribution.contract as contract

    seen = []
    real = contract.tqdm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("disable"))
        return real(*args, **kwargs)

    monkeypatch.setattr(contract, "tqdm", spy)
    for name in ("integrated_gradients", "scorecam", "occlusion", "rise"):
        cs.attribute(tiny, tiny_x, name, progress=False, **fast_options(name))
    assert seen and all(d is True for d in seen)


def test_plain_module_default_layer_uses_the_input_size():
    """At 224 px the last spatial layer of this net is ``pool``'s input; at 8 px the second stage is 1x1."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=8, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    a = cs.attribute(net, torch.randn(1, 3, 8, 8), "gradcam")
    assert a.layer == "1"
    b = cs.attribute(net, torch.randn(1, 3, 32, 32), "gradcam")
    assert b.layer == "3"
    assert a.model is not None and a.overlay().size == (8, 8)


def test_plain_module_takes_any_channel_count():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    a = cs.attribute(net, torch.randn(2, 1, 16, 16), "saliency", target=2)
    assert a.raw.shape == (2, 1, 16, 16) and a.target.tolist() == [2, 2]
    assert a.overlay().size == (16, 16)
