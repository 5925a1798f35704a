"""Fast feed-forward style transfer: a tiny training run, checkpoints, save/load, one-pass stylisation."""

from __future__ import annotations

import pytest
import torch

import convscope as cs
from convscope.synthesis.fast_style import TransformNet, load_transform_net, stylize, train_fast_style


@pytest.fixture(scope="module")
def content_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("content")
    for name in ("chelsea", "coffee", "astronaut"):
        cs.sample_image(name).resize((80, 60)).save(root / f"{name}.png")
    return root


def test_transform_net_keeps_the_size_and_pixel_range():
    net = TransformNet(width=4, blocks=1)
    y = net(torch.rand(2, 3, 30, 42))
    assert y.shape == (2, 3, 30, 42) and y.min() >= 0 and y.max() <= 1


def test_short_training_lowers_the_loss_and_checkpoints(tiny, content_folder, untouched):
    seen = []
    with untouched(tiny):
        r = train_fast_style(tiny, "sample:brick", content_folder, steps=30, batch_size=2, size=32, width=4, blocks=1,
                             lr=1e-2, style_layers=["conv1", "conv2"], content_layers=["conv2"],
                             content_weight=1.0, style_weight=1e3, checkpoint=lambda s, res: seen.append(s),
                             checkpoint_every=10, progress=False)
    assert r.steps == 30 and seen == [10, 20, 30]
    first, last = sum(r.history[:5]) / 5, sum(r.history[-5:]) / 5
    assert last < 0.7 * first
    net = load_transform_net(r.state())
    img = stylize(net, "sample:chelsea", size=40)
    assert min(img.size) == 40
    assert torch.equal(next(net.parameters()), next(r.net.parameters()))


def test_bad_data_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(cs.ImageError, match="no images"):
        train_fast_style(tiny, "sample:brick", tmp_path, steps=1, progress=False)
    with pytest.raises(cs.ImageError, match="no such folder"):  # the one folder lister's message (issue 8)
        train_fast_style(tiny, "sample:brick", tmp_path / "missing", steps=1, progress=False)
    with pytest.raises(cs.ConvscopeError, match="not a convscope"):
        load_transform_net({"weights": 1})
