"""channel_means(): mean activation of every channel, per image, with its plot."""

from __future__ import annotations

import io

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from convscope.inspect import ChannelResponse, ViewOptionError, channel_means


def test_channel_means_equal_a_hand_hooked_forward_for_a_batch(builtin, untouched):
    x = builtin.preprocess(["sample:chelsea", "sample:coffee"])
    store = {}
    handle = builtin.module.bn2.register_forward_hook(lambda _m, _i, out: store.setdefault("act", out.detach().clone()))
    try:
        with torch.no_grad():
            builtin.module(x)
    finally:
        handle.remove()
    act = store["act"]
    with untouched(builtin.module):
        resp = channel_means(builtin, x, "bn2")
    assert resp.means.shape == (2, 1280) and resp.shape == (2, 1280, 7, 7)
    assert torch.allclose(resp.means, act.mean((2, 3)), atol=1e-6)
    assert torch.allclose(resp.values, act.mean((2, 3)).mean(0), atol=1e-6)
    assert resp.zero.tolist() == (act.flatten(2) == 0).all(2).sum(1).tolist()
    assert resp.zero.min() > 500  # most units of the final ReLU6 are silent for a given photo


def test_top_lists_the_largest_channels_in_order(builtin, chelsea):
    resp = channel_means(builtin, chelsea, "bn2")
    top = resp.top(5)
    values, idx = resp.means[0].topk(5)
    assert [c for c, _ in top] == idx.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist())
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert resp.top(3, index=0) == top[:3]
    with pytest.raises(ViewOptionError):
        resp.top(0)
    with pytest.raises(ViewOptionError):
        resp.top(3, index=1)


def test_batch_top_can_follow_one_image_or_the_average(builtin):
    resp = channel_means(builtin, ["sample:chelsea", "sample:rocket"], "bn2")
    assert resp.top(1, index=1)[0][0] == int(resp.means[1].argmax())
    assert resp.top(1)[0][0] == int(resp.means.mean(0).argmax())


def test_figure_plots_every_channel_and_labels_the_top_ones_without_pyplot(builtin, chelsea):
    from matplotlib import _pylab_helpers

    managers = len(_pylab_helpers.Gcf.get_all_fig_managers())
    resp = channel_means(builtin, chelsea, "bn2")
    fig = resp.figure(top=4)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(c) for c, _ in resp.top(4))
    segments = ax.collections[0].get_segments()
    assert len(segments) == 1280
    assert segments[112][1][1] == pytest.approx(float(resp.values[112]))
    picture = resp.to_image(top=4)
    assert picture.size == (900, 320) and picture.mode == "RGB"
    assert resp._repr_png_()[:4] == b"\x89PNG"
    assert len(_pylab_helpers.Gcf.get_all_fig_managers()) == managers
    assert matplotlib.get_backend()  # the global backend is untouched by rendering


def test_plain_module_and_str(tiny):
    x = torch.randn(3, 3, 32, 32)
    resp = channel_means(tiny.module, x, "relu3")
    ref = torch.relu(tiny.module.conv2(torch.relu(tiny.module.dw(torch.relu(tiny.module.conv1(x)))))).detach()
    assert isinstance(resp, ChannelResponse)
    assert torch.allclose(resp.means, ref.mean((2, 3)), atol=1e-6)
    assert str(resp).startswith("relu3: 6 channels; top 5:")


def test_figure_shows_itself_in_jupyter_without_matplotlib_inline(tiny):
    # Jupyter shows an object through its _repr_png_ when no backend printer is registered for its type
    fig = channel_means(tiny, torch.randn(1, 3, 32, 32), "relu3").figure(top=2)
    png = fig._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    picture = Image.open(io.BytesIO(png))
    assert picture.size == (900, 320)  # 9 x 3.2 inches at 100 dpi
    ipython = pytest.importorskip("IPython.core.formatters")
    data, _ = ipython.DisplayFormatter().format(fig)
    assert data["image/png"] == png
