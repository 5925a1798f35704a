"""Deletion/insertion curves, pointing game and the cascading-randomisation sanity check."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from convscope.attribution import metrics
from convscope.errors import ConvscopeError, InputShapeError


class WeightedSum(nn.Module):
    """Two classes on a 1-channel 2x2 image: logit 0 = sum(w * x), logit 1 = 0, so P(0) = sigmoid(w . x)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[[[2.0, 1.0], [0.5, -1.0]]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).sum(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


@pytest.fixture(scope="module")
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


# ---------------------------------------------------------------------------- deletion / insertion


def test_deletion_curve_and_auc_by_hand():
    model = WeightedSum()
    x = torch.ones(1, 1, 2, 2)
    sal = torch.tensor([[[0.9, 0.1], [0.5, 0.3]]])  # order: (0,0) w=2, (1,0) w=.5, (1,1) w=-1, (0,1) w=1
    curve = metrics.deletion(model, x, sal, target=0, steps=4, baseline=0.0)
    want = [_sig(2.5), _sig(0.5), _sig(0.0), _sig(1.0), _sig(0.0)]
    torch.testing.assert_close(curve.scores[0], torch.tensor(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(curve.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    auc = sum((want[k] + want[k + 1]) / 2 * 0.25 for k in range(4))
    assert float(curve.auc[0]) == pytest.approx(auc, rel=1e-6)
    assert curve.forward_passes == 5


def test_insertion_curve_by_hand_and_batching_does_not_change_it():
    model = WeightedSum()
    x = torch.ones(1, 1, 2, 2)
    sal = torch.tensor([[[0.9, 0.1], [0.5, 0.3]]])
    curve = metrics.insertion(model, x, sal, target=0, steps=4, baseline=0.0, batch_size=2)
    want = [_sig(0.0), _sig(2.0), _sig(2.5), _sig(1.5), _sig(2.5)]
    torch.testing.assert_close(curve.scores[0], torch.tensor(want), rtol=1e-6, atol=1e-6)
    # a perfect saliency (the weights themselves) deletes better than its reverse
    good = metrics.deletion(model, x, model.w.detach()[0], target=0, steps=4)
    bad = metrics.deletion(model, x, -model.w.detach()[0], target=0, steps=4)
    assert float(good.auc[0]) < float(bad.auc[0])


def test_curves_leave_the_model_untouched(tiny_cnn):
    tiny_cnn.train()
    buf = io.BytesIO()
    torch.save(tiny_cnn.state_dict(), buf)
    x = torch.randn(2, 3, 16, 16)
    metrics.deletion(tiny_cnn, x, torch.rand(2, 16, 16), steps=3)
    after = io.BytesIO()
    torch.save(tiny_cnn.state_dict(), after)
    assert buf.getvalue() == after.getvalue()
    assert all(m.training for m in tiny_cnn.modules())
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
    tiny_cnn.eval()


def test_curve_bad_input():
    model = WeightedSum()
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(InputShapeError, match="does not match"):
        metrics.deletion(model, x, torch.rand(1, 3, 3))
    with pytest.raises(InputShapeError, match="NaN"):
        metrics.deletion(model, x, torch.tensor([[[float("nan"), 0.0], [0.0, 0.0]]]))
    with pytest.raises(ConvscopeError, match="option 'steps' must be an int in 1..4096"):
        metrics.insertion(model, x, torch.rand(1, 2, 2), steps=0)
    with pytest.raises(ConvscopeError, match="option 'batch_size' must be an int in 1..4096"):
        metrics.deletion(model, x, torch.rand(1, 2, 2), batch_size=0)
    with pytest.raises(ConvscopeError):
        metrics.deletion(model, x, torch.rand(1, 2, 2), baseline="sparkles")


# ---------------------------------------------------------------------------- pointing game


def test_pointing_game_hits_misses_and_tolerance():
    maps = torch.zeros(3, 50, 50)
    maps[0, 20, 20] = 1.0  # inside the box
    maps[1, 20, 40] = 1.0  # 10 px right of the box: a hit only with tolerance >= 10
    maps[2, 45, 45] = 1.0  # far away
    box = (10, 10, 31, 31)  # x0, y0, x1, y1 (exclusive): the box covers pixels 10..30
    strict = metrics.pointing_game(maps, box, tolerance=0)
    assert strict.hits.tolist() == [True, False, False]
    loose = metrics.pointing_game(maps, [box] * 3, tolerance=10)
    assert loose.hits.tolist() == [True, True, False]
    assert loose.accuracy == pytest.approx(2 / 3)
    assert loose.points[1].tolist() == [20, 40]
    with pytest.raises(InputShapeError, match="boxes"):
        metrics.pointing_game(maps, [box, box])
    with pytest.raises(ConvscopeError, match="x1 > x0"):
        metrics.pointing_game(maps, (30, 10, 10, 31))


# ---------------------------------------------------------------------------- sanity check


def test_cascading_randomization_decorrelates_and_leaves_user_model_alone(tiny_cnn):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 24, 24)
    buf = io.BytesIO()
    torch.save(tiny_cnn.state_dict(), buf)
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    res = metrics.cascading_randomization(tiny_cnn, x, "saliency", target=1, seed=0)
    assert res.layers == ["6", "2", "0"]  # top (output) first
    assert res.spearman.shape == (4, 1) and res.ssim.shape == (4, 1)
    assert float(res.spearman[0, 0]) == pytest.approx(1.0)
    assert float(res.ssim[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert float(res.spearman[-1, 0]) < 0.5  # every layer randomised: the map no longer reflects the model
    assert res.maps.shape == (4, 1, 24, 24)
    after = io.BytesIO()
    torch.save(tiny_cnn.state_dict(), after)
    assert buf.getvalue() == after.getvalue()
    assert [p.requires_grad for p in tiny_cnn.parameters()] == flags
    assert all(not m._forward_hooks for m in tiny_cnn.modules())


def test_cascading_randomization_unknown_layer_is_a_clear_error(tiny_cnn):
    with pytest.raises(ConvscopeError):
        metrics.cascading_randomization(tiny_cnn, torch.randn(1, 3, 8, 8), "saliency", layers=["nope"])
