"""Filter health: dead filters by norm, aliasing by high-frequency energy, over one layer or a whole model."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.cli import cmd_diagnose
from convscope.cli.main import main
from convscope.inspect.diagnostics import FilterHealth, ModelHealth, aliasing_scores, filter_health


def planted(stride: int = 2) -> nn.Sequential:
    """A 5x5 conv whose filters are: 0 checkerboard 3x3, 1 checkerboard 5x5, 2 Gaussian 5x5, 3 zero, 4 tiny, 5+ random."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 8, 5, stride=stride, padding=2)
    y, x = torch.meshgrid(torch.arange(5.0) - 2, torch.arange(5.0) - 2, indexing="ij")
    board = (-1.0) ** (y + x)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1:4, 1:4] = board[1:4, 1:4]
        conv.weight[1, 0] = board
        conv.weight[2, 0] = torch.exp(-(y**2 + x**2) / 2)
        conv.weight[4, 0] = 1e-9
        conv.weight[5:] = torch.randn(3, 1, 5, 5) * 0.3
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_checkerboard_scores_high_gaussian_low_zero_is_dead():
    h = filter_health(planted(), "0")
    assert isinstance(h, FilterHealth)
    a = h.aliasing
    assert a[0] > 0.95 and a[1] > 0.95 and a[2] < 0.05
    assert torch.isnan(a[3])  # nothing to measure in a zero filter
    assert h.dead == [3, 4]
    assert 0 in h.aliased and 1 in h.aliased and 2 not in h.aliased and 3 not in h.aliased
    assert h.flagged == sorted(set(h.dead) | set(h.aliased))
    table = h.table()
    assert len(table) == 8 and table[3]["dead"] and table[0]["aliased"] and table[3]["aliasing"] is None
    picture = h.to_image()
    assert picture.size[0] > 3 * 40 and picture.size[1] > 40


def test_score_is_the_share_above_half_nyquist():
    w = torch.zeros(3, 1, 16, 16)
    n = torch.arange(16.0)
    w[0, 0] = torch.cos(2 * torch.pi * 0.125 * n).view(1, -1).expand(16, 16)  # 1/8 cycle per pixel: low
    w[1, 0] = torch.cos(2 * torch.pi * 0.375 * n).view(-1, 1).expand(16, 16)  # 3/8 cycle per pixel: high
    w[2, 0] = w[0, 0] + w[1, 0]  # equal energy in both bands
    s = aliasing_scores(w, fft_size=16)
    torch.testing.assert_close(s, torch.tensor([0.0, 1.0, 0.5]), atol=1e-6, rtol=0)
    assert torch.isnan(aliasing_scores(torch.ones(4, 3, 1, 1))).all()


def test_stride_one_layers_are_scored_but_not_flagged():
    h = filter_health(planted(stride=1), "0")
    assert h.aliasing[0] > 0.95 and h.aliased == []
    assert 0 in filter_health(planted(stride=1), "0", strided_only=False).aliased
    assert filter_health(planted(), "0", alias_threshold=1.0).aliased == []


def test_bad_input_is_a_clear_error():
    with pytest.raises(cs.ConvscopeError, match="not a Conv2d"):
        filter_health(planted(), "1")
    with pytest.raises(cs.LayerNotFoundError):
        filter_health(planted(), "conv9")
    with pytest.raises(cs.ConvscopeError, match="alias_threshold"):
        filter_health(planted(), alias_threshold=2)


def test_every_conv_layer_of_the_builtin_model_under_a_second(builtin):
    module = builtin.module
    import statecheck

    with statecheck.untouched(module):
        times = []
        for _ in range(3):  # the best of three: the machine is shared, the cost is what we check
            start = time.perf_counter()
            h = filter_health(builtin)
            times.append(time.perf_counter() - start)
        seconds = min(times)
    assert isinstance(h, ModelHealth) and seconds < 1.0
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    assert [r["layer"] for r in h.rows()] == convs
    stem = h.layer("conv_stem")
    assert stem.stride == (2, 2) and len(stem.norms) == 32
    assert all(r["mean_aliasing"] is None for r in h.rows() if r["kernel"] == "1x1")
    assert h.dead == sum(r["dead"] for r in h.rows())
    assert h.to_image().size[1] > 40


def test_cli_summary_json_and_one_layer(monkeypatch, capsys, tmp_path):
    model = cs.load_model(planted(), input_size=16, labels=["a", "b", "c", "d"])
    monkeypatch.setattr(cmd_diagnose, "load_model_from_args", lambda args: model)
    assert main(["diagnose", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in data["layers"]] == ["0", "2"] and data["dead"] == 2
    out = tmp_path / "flagged.png"
    assert main(["diagnose", "--layer", "0", "-o", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert "dead" in stdout and "aliased" in stdout and out.exists()
    assert main(["diagnose"]) == 0
    assert "total: 2 dead" in capsys.readouterr().out
    assert main(["diagnose", "--layer", "1"]) == 2
    assert "not a Conv2d" in capsys.readouterr().err


def test_whole_model_scores_equal_one_layer_at_a_time(tiny):
    # the whole-model pass transforms kernels of one size together; the numbers must not depend on it
    tiny.module.conv1.weight.data[2] = 0  # an all-zero filter scores NaN either way
    whole = filter_health(tiny, strided_only=False)
    for h in whole.layers:
        one = filter_health(tiny, h.layer, strided_only=False)
        assert torch.allclose(h.aliasing, one.aliasing, equal_nan=True, atol=1e-6)
        assert (h.dead, h.aliased) == (one.dead, one.aliased)
    assert torch.isnan(whole.layer("conv1").aliasing[2])
