"""filters(): a convolution's kernels, their norms, dead filters and the picture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convscope.errors import ConvscopeError, LayerNotFoundError
from convscope.inspect import FilterSet, LayerKindError, ViewOptionError, filters


def test_first_layer_of_builtin_is_the_default_and_its_weights_are_exact(builtin):
    fs = filters(builtin)
    w = builtin.module.conv_stem.weight.detach().cpu()
    assert fs.layer == "conv_stem" and fs.kind == "rgb"
    assert fs.weight.shape == (32, 3, 3, 3)
    assert torch.equal(fs.weight, w)
    assert torch.allclose(fs.norms, w.flatten(1).norm(dim=1))
    assert torch.allclose(fs.rms, w.flatten(1).pow(2).mean(1).sqrt())
    assert fs.stride == (2, 2)


def test_rgb_picture_has_one_tile_per_filter_in_an_8_column_grid(builtin):
    fs = filters(builtin)
    tiles = fs.tiles()
    assert len(tiles) == 32 and all(t.size == (3, 3) and t.mode == "RGB" for i, t in enumerate(tiles) if i not in fs.dead)
    picture = fs.to_image(cell=40, title=False)
    columns, rows, pad, label_h = 8, 4, 4, 10 + 4  # core.grid: font 10 for 40 px cells
    assert picture.size == (columns * (40 + pad) + pad, rows * (40 + label_h + pad) + pad)
    titled = fs.to_image(cell=40)  # the title adds a 22 px band (and widens the picture to fit its text)
    assert titled.size[1] == picture.size[1] + 22 and titled.size[0] >= picture.size[0]
    assert fs.image.size[1] == 22 + rows * (32 + label_h + pad) + pad  # default: 32 px cells
    assert fs.image.size[0] >= 8 * (32 + pad) + pad


def test_dead_filters_are_those_with_near_zero_norm(builtin, tiny):
    fs = filters(builtin)
    expected = [i for i, n in enumerate(fs.norms.tolist()) if n <= 0.01 * fs.norms.max().item()]
    assert fs.dead == expected
    with torch.no_grad():
        tiny.module.conv1.weight[2].zero_()
        tiny.module.conv1.weight[5].mul_(1e-4)
    assert filters(tiny, "conv1").dead == [2, 5]


def test_symmetric_scale_maps_zero_to_grey_and_extremes_to_black_and_white(tiny):
    with torch.no_grad():
        w = tiny.module.conv1.weight
        w.zero_()
        w[0, 0, 0, 0], w[0, 1, 1, 1], w[0, 2, 2, 2] = 2.0, -2.0, 1.0
    tile = np.asarray(filters(tiny, "conv1").tiles()[0])
    assert tuple(tile[0, 0]) == (255, 128, 128)  # +max in red, zero green/blue are grey
    assert tuple(tile[1, 1]) == (128, 0, 128)  # -max in green
    assert tile[2, 2, 2] == round(255 * 0.75)  # half of max -> 3/4 of the range
    minmax = np.asarray(filters(tiny, "conv1", scale="minmax").tiles()[0])
    assert minmax[1, 1, 1] == 0 and minmax[0, 0, 0] == 255 and minmax[2, 2, 2] == round(255 * 0.75)


def test_deeper_conv_is_a_filters_by_input_channels_grid(tiny):
    fs = filters(tiny, "conv2", max_filters=4, max_channels=5)
    assert fs.kind == "channels" and fs.weight.shape == (6, 8, 3, 3)
    tiles = fs.channel_tiles()
    assert len(tiles) == 4 and all(len(row) == 5 for row in tiles)
    w = fs.weight[3]
    m = w.abs().max()
    expected = np.round((w[4] / (2 * m) + 0.5).numpy() * 255).astype(np.uint8)
    assert np.abs(np.asarray(tiles[3][4]).astype(int) - expected).max() <= 1
    picture = fs.to_image(cell=20, title=False)
    assert picture.size[1] == (10 + 4) + 4 * (20 + 1) + 1  # column labels band + rows
    assert picture.size[0] > 5 * (20 + 1)  # row labels on the left


def test_depthwise_conv_shows_one_tile_per_channel(tiny):
    fs = filters(tiny, "dw")
    assert fs.kind == "depthwise" and fs.groups == 8 and fs.weight.shape == (8, 1, 3, 3)
    assert len(fs.tiles()) == 8
    built = filters(tiny.module, "dw")  # a plain module works too
    assert torch.equal(built.weight, fs.weight)


def test_builtin_depthwise_and_pointwise_layers(builtin):
    dw = filters(builtin, "blocks.1.0.conv_dw", max_filters=10)
    assert dw.kind == "depthwise" and len(dw.tiles()) == 10 and dw.out_channels == 96
    pw = filters(builtin, "blocks.1.0.conv_pw", max_filters=7, max_channels=3)
    assert pw.kind == "channels" and pw.kernel_size == (1, 1)
    assert [len(r) for r in pw.channel_tiles()] == [3] * 7
    assert "7 of 96 filters" in pw.caption()


def test_non_conv_layer_is_a_clear_error_naming_convolutions(builtin):
    with pytest.raises(LayerKindError, match=r"'bn1' is a BatchNormAct2d, not a Conv2d.*conv") as info:
        filters(builtin, "bn1")
    assert isinstance(info.value, ConvscopeError)
    with pytest.raises(LayerNotFoundError, match="conv_stem"):
        filters(builtin, "conv_stm")


@pytest.mark.parametrize("kwargs", [{"max_filters": 0}, {"max_channels": 0}, {"scale": "log"}])
def test_bad_options_are_errors(tiny, kwargs):
    with pytest.raises(ViewOptionError):
        filters(tiny, "conv1", **kwargs)


def test_result_displays_itself_and_leaves_the_model_alone(tiny, untouched):
    with untouched(tiny.module):
        fs = filters(tiny, "conv2")
        png = fs._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(fs, FilterSet) and "conv2" in str(fs)
    assert math.isclose(float(fs.norms.sum()), float(tiny.module.conv2.weight.detach().flatten(1).norm(dim=1).sum()), rel_tol=1e-6)


def test_single_input_channel_layer_draws_one_grey_tile_per_filter():
    gray = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 5), torch.nn.Flatten())
    fs = filters(gray, "0")
    assert fs.kind == "depthwise" and len(fs.tiles()) == 5 and fs.tiles()[0].size == (5, 5)
    assert fs.image.size[1] == 22 + (40 + 14 + 4) + 4  # one row of 40 px cells under the title


def test_dead_filters_are_drawn_flat_grey_with_a_red_cross_not_stretched(builtin):
    fs = filters(builtin)
    assert fs.dead == [11, 16, 28, 31]  # norms ~1e-9 .. 2e-7 in the built-in model's first layer
    tiles = fs.tiles()
    for i in fs.dead:
        colours = {tuple(c) for c in np.asarray(tiles[i]).reshape(-1, 3).tolist()}
        assert colours == {(128, 128, 128), (220, 40, 40)}  # flat grey and the mark, nothing stretched
    live = np.asarray(tiles[0]).reshape(-1, 3)
    assert len({tuple(c) for c in live.tolist()}) > 2
    assert "red X = dead (4)" in fs.caption()
    # grey-tile layouts too (one row per filter, one tile per input channel)
    fs2 = filters(builtin, "blocks.1.0.conv_pw", max_filters=None, max_channels=4)
    row = fs2.channel_tiles()[79]
    assert all({tuple(c) for c in np.asarray(t).reshape(-1, 3).tolist()} == {(128, 128, 128), (220, 40, 40)} for t in row)
