"""feature_maps() and stage_layers(): one layer's output for one image, as data and as a grid."""

from __future__ import annotations

import pytest
import torch

import convscope as cs
from convscope.errors import InputShapeError, LayerNotFoundError
from convscope.inspect import FeatureMaps, LayerKindError, ViewOptionError, feature_maps, stage_layers


def hooked_output(module, layer_name, x):
    """The reference: a plain forward hook on a full forward pass."""
    store = {}
    layer = dict(module.named_modules())[layer_name]
    handle = layer.register_forward_hook(lambda _m, _i, out: store.setdefault("out", out.detach().clone()))
    try:
        with torch.no_grad():
            module(x)
    finally:
        handle.remove()
    return store["out"]


def test_feature_maps_equal_a_plain_forward_hook(builtin, chelsea, untouched):
    x = builtin.preprocess(chelsea)
    with untouched(builtin.module):
        fm = feature_maps(builtin, chelsea, "blocks.2")
    ref = hooked_output(builtin.module, "blocks.2", x)[0]
    assert fm.activations.shape == (40, 28, 28) == fm.shape
    assert torch.allclose(fm.activations, ref, atol=1e-5)
    assert torch.allclose(fm.means, ref.mean((1, 2)), atol=1e-6)
    assert fm.picture is not None and fm.picture.size == (224, 224)


def test_forward_pass_stops_at_the_layer(builtin, chelsea):
    calls = []
    handle = builtin.module.classifier.register_forward_hook(lambda *a: calls.append(1))
    try:
        feature_maps(builtin, builtin.preprocess(chelsea), "bn1")
    finally:
        handle.remove()
    assert calls == []


def test_vgg16_block_outputs(vgg, untouched):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    with untouched(vgg.module):
        fm = feature_maps(vgg, x, "features.4")  # first max-pool: end of block 1
    ref = hooked_output(vgg.module, "features.4", x)[0]
    assert fm.activations.shape == (64, 32, 32)
    assert torch.equal(fm.activations, ref)
    assert (fm.activations >= 0).all()  # max-pool of ReLU outputs


def test_sorting_and_channel_choice_control_the_picture(builtin, chelsea):
    fm = feature_maps(builtin, chelsea, "bn2", max_channels=10, sort="mean")
    means = fm.activations.mean((1, 2))
    assert fm.order() == torch.argsort(means, descending=True, stable=True)[:10].tolist()
    assert fm.order(sort="index", max_channels=None) == list(range(1280))
    peaks = fm.activations.flatten(1).amax(1)
    assert fm.order(sort="max")[0] == int(peaks.argmax())
    assert fm.order(channels=[5, 3]) == [5, 3]
    picture = fm.to_image(cell=50, title=False)  # 10 tiles: one row of 8, then 2
    assert picture.size == (8 * (50 + 4) + 4, 2 * (50 + 14 + 4) + 4)


def test_channel_scale_stretches_each_map_and_layer_scale_keeps_silent_channels_dark(builtin, chelsea):
    fm = feature_maps(builtin, chelsea, "bn2")
    silent = int((fm.activations.flatten(1).amax(1) == 0).nonzero()[0])
    loud = int(fm.activations.flatten(1).amax(1).argmax())
    per_layer = fm.to_image(channels=[silent, loud], cell=7, title=False, scale="layer", cmap="gray")
    tile = per_layer.crop((4, 4, 11, 11))
    assert max(tile.getextrema()[0]) == 0  # all-zero map is black
    per_channel = fm.to_image(channels=[loud], cell=7, title=False, cmap="gray")
    assert per_channel.crop((4, 4, 11, 11)).getextrema()[0] == (0, 255)


def test_plain_module_takes_tensors_and_images_like_as_model(tiny):
    # a plain module is read through cs.as_model: tensors as they are, images with PLAIN_MODULE_DEFAULTS
    x = torch.randn(1, 3, 32, 32)
    fm = feature_maps(tiny.module, x, "conv2")
    assert fm.activations.shape == (6, 16, 16)
    assert torch.allclose(fm.activations, tiny.module.conv2(tiny.module.relu2(tiny.module.dw(tiny.module.relu1(tiny.module.conv1(x)))))[0].detach(), atol=1e-6)
    assert fm.picture is not None and fm.picture.size == (32, 32)
    from_image = feature_maps(tiny.module, "sample:chelsea", "conv2")
    expected = feature_maps(tiny.module, cs.as_model(tiny.module).preprocess("sample:chelsea"), "conv2")
    assert from_image.activations.shape == (6, 112, 112) and torch.equal(from_image.activations, expected.activations)


def test_bad_input_is_a_clear_error_and_leaves_no_hooks(tiny, untouched):
    x = torch.randn(2, 3, 32, 32)
    with untouched(tiny.module):
        with pytest.raises(LayerKindError, match=r"outputs shape \(1, 4\), not feature maps"):
            feature_maps(tiny, x[:1], "fc")
        with pytest.raises(InputShapeError, match="batch of 2"):
            feature_maps(tiny, x, "conv2")
        with pytest.raises(LayerNotFoundError, match="conv1"):
            feature_maps(tiny, x[:1], "conv")
        with pytest.raises(ViewOptionError, match="out of range"):
            feature_maps(tiny, x[:1], "conv2", channels=[6])
        with pytest.raises(ViewOptionError):
            feature_maps(tiny, x[:1], "conv2", sort="random")


def test_result_displays_itself(tiny):
    fm = feature_maps(tiny, torch.randn(1, 3, 32, 32), "conv1")
    assert isinstance(fm, FeatureMaps) and fm._repr_png_()[:4] == b"\x89PNG"
    assert fm.image.size[0] >= 8 * (48 + 4)


def test_stage_layers_pick_early_middle_and_last(builtin, vgg, tiny):
    assert stage_layers(builtin) == ["bn1", "blocks.2", "bn2"]
    assert stage_layers(builtin, 5) == ["bn1", "blocks.1", "blocks.2", "blocks.4", "bn2"]
    assert stage_layers(builtin, 1) == ["bn2"]
    assert stage_layers(vgg) == ["features.3", "features.15", "features"]
    assert stage_layers(tiny) == ["relu2", "relu3"]
