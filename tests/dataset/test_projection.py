"""DeconvNet / guided / gradient projections of single units, and dead channels, on tiny hand-made models."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import convscope as cs
import statecheck
from convscope.cli import cmd_topk
from convscope.cli.main import main
from convscope.dataset.projection import ProjectionError, effective_box, projection_picture, unit_gradients
from convscope.dataset.topk import TopKError, top_activations
from convscope.probe import DECONV_RULES, Capture

SIZE = 24
SQUARE = (9, 13, 3)  # top, left, side of the bright square in image 3


def module() -> nn.Sequential:
    """conv1 - relu1 (in place) - conv2 (stride 2) - relu2 - maxpool - conv3 - relu3 - head.

    conv2 channel 0 detects bright regions (conv1 channel 0 = brightness - 0.5, averaged); conv2 channel 1
    has zero weights and a negative bias, so it never fires after relu2. Everything else is random.
    """
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(4, 5, 3, stride=2, padding=1), relu2=nn.ReLU(),
        pool=nn.MaxPool2d(2), conv3=nn.Conv2d(5, 6, 3, padding=1), relu3=nn.ReLU6(),
        gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3),
    ))
    with torch.no_grad():
        m.conv1.weight[0] = 1 / 27
        m.conv1.bias[0] = -0.5
        m.conv2.weight[:2] = 0
        m.conv2.weight[0, 0] = 1 / 9
        m.conv2.bias[0] = 0
        m.conv2.bias[1] = -0.1
    return m


def images(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand((n, 3, SIZE, SIZE), generator=g) * 0.4
    top, left, side = SQUARE
    x[3, :, top:top + side, left:left + side] = 1.0
    return x


@pytest.fixture
def tiny() -> cs.Model:
    return cs.Model(module(), input_size=(SIZE, SIZE), mean=(0, 0, 0), std=(1, 1, 1), labels=["a", "b", "c"], resize_size=SIZE)


def brute_force(m: nn.Module, x: torch.Tensor, layer: str, units, rules) -> torch.Tensor:
    """One full forward + backward per unit, through Capture with the rules, without any batching."""
    out = []
    for i, (c, y, xx) in enumerate(units):
        xi = x[i:i + 1].clone().requires_grad_(True)
        with Capture(m, [layer], grads=True, rules=rules) as cap, torch.enable_grad():
            cap.forward(xi)
            (g,) = torch.autograd.grad(cap.activations[layer][0, c, y, xx], xi)
        out.append(g[0])
    return torch.stack(out)


@pytest.mark.parametrize("method, rules", [("deconvnet", DECONV_RULES), ("gradient", None)])
@pytest.mark.parametrize("layer", ["relu2", "conv3"])
def test_batched_projection_equals_one_backward_per_unit(tiny, method, rules, layer):
    x = images()
    g = torch.Generator().manual_seed(2)
    h = SIZE // 2 if layer == "relu2" else SIZE // 4
    units = [(int(torch.randint(0, 5 if layer == "relu2" else 6, (1,), generator=g)),
              int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, h, (1,), generator=g))) for _ in range(6)]
    units[0] = (0, 5, 7) if layer == "relu2" else (0, 2, 3)  # near the square of image 3
    rows = x[[3, 3, 0, 1, 2, 5]]  # an image may serve several units
    ref = brute_force(tiny.module, rows, layer, units, rules)
    first_conv = {"forward": 0, "backward": 0}
    hooks = [tiny.module.conv1.register_forward_pre_hook(lambda *a: first_conv.__setitem__("forward", first_conv["forward"] + 1)),
             tiny.module.conv1.register_full_backward_hook(lambda *a: first_conv.__setitem__("backward", first_conv["backward"] + 1))]
    try:
        r = unit_gradients(tiny, rows, layer, [u[0] for u in units], [u[1] for u in units], [u[2] for u in units],
                           method=method, batch_size=16, progress=False)
    finally:
        for hk in hooks:
            hk.remove()
    assert first_conv == {"forward": 1, "backward": 1} and r.forward_passes == r.backward_passes == 1
    torch.testing.assert_close(r.grads, ref, rtol=1e-5, atol=1e-7)
    assert ref.abs().sum() > 0
    split = unit_gradients(tiny, rows, layer, [u[0] for u in units], [u[1] for u in units], [u[2] for u in units],
                           method=method, batch_size=4, progress=False)
    assert split.forward_passes == 2 and split.done == 6
    torch.testing.assert_close(split.grads, ref, rtol=1e-5, atol=1e-7)


def test_deconvnet_differs_from_gradient_where_relus_are_off(tiny):
    x = images()[:1]
    a = unit_gradients(tiny, x, "conv3", [2], [2], [3], method="deconvnet", progress=False).grads
    b = unit_gradients(tiny, x, "conv3", [2], [2], [3], method="gradient", progress=False).grads
    c = unit_gradients(tiny, x, "conv3", [2], [2], [3], method="guided", progress=False).grads
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


@pytest.mark.parametrize("method", ["deconvnet", "guided", "gradient"])
def test_planted_detector_projects_onto_the_square(tiny, method):
    x = images()
    r = top_activations(tiny, x, "relu2", k=3, channels=[0, 1, 2], progress=False)
    top = r.hits(0)[0]
    assert top.image == 3 and top.value > 0.1
    p = r.projected(channels=[0], method=method, images=x, progress=False)
    assert p.images[0] == 3 and p.forward_passes == 1
    assert abs(float(p.values[0]) - top.value) < 1e-5  # the projected unit is the recorded one
    crop = p.crops[0]
    t, left, b, right = p.boxes[0]
    assert crop.shape[-2:] == (b - t, right - left) == r.receptive_field.size
    energy = torch.zeros(SIZE + 20, SIZE + 20)  # the crop placed back into (padded) image coordinates
    energy[t + 10:b + 10, left + 10:right + 10] = (crop ** 2).sum(0)
    sq_top, sq_left, side = SQUARE
    inside = energy[sq_top + 10:sq_top + 10 + side, sq_left + 10:sq_left + 10 + side].sum()
    assert inside / energy.sum() > 0.7  # 9 of the 25 box pixels hold most of the energy
    pictures = r.projections(tiny, 0, method, images=x, scale="abs")
    assert len(pictures) == 3 and pictures[0].size == (right - left, b - t)
    arr = np.asarray(pictures[0]).astype(float)
    assert arr.max() == 255  # normalised per picture
    signed = np.asarray(r.projections(tiny, 0, method, images=x)[2])
    assert signed.min() >= 0 and np.abs(signed.astype(int) - 128).max() <= 128


def test_grid_shows_patch_and_projection(tiny):
    x = images()
    r = top_activations(tiny, x, "relu2", k=2, channels=[0, 2], progress=False)
    plain = r.grid(images=x)
    with pytest.raises(TopKError, match="explicit call"):  # drawing never runs the network itself
        r.grid(mode="projection", images=x)
    p = r.projected(tiny, method="guided", images=x, progress=False)
    both = r.grid(mode="projection", images=x, projections=p)
    assert both.size[0] > plain.size[0] + 2 * 48 and both.size[1] == plain.size[1]
    with pytest.raises(TopKError, match="no projections"):
        r.grid([0, 2], mode="projection", images=x, projections=r.projected(tiny, [0], images=x, progress=False))
    with pytest.raises(TopKError, match="projection method"):
        r.projected(channels=[0], method="lrp", images=x)
    with pytest.raises(TopKError, match="not part of this run"):
        r.projections(tiny, 4, images=x)
    mean = top_activations(tiny, x, "relu2", k=2, reduce="mean", progress=False)
    with pytest.raises(TopKError, match="reduce='max'"):
        mean.projected(channels=[0], images=x)
    with pytest.raises(TopKError, match="reduce='max'"):
        mean.dead()
    with pytest.raises(ProjectionError, match="out of range"):
        unit_gradients(tiny, x[:1], "relu2", [9], [0], [0])


def test_dead_channel_is_reported_and_live_ones_are_not(tiny):
    r = top_activations(tiny, images(), "relu2", k=2, progress=False)
    assert 1 in r.dead() and 0 not in r.dead()
    assert all(float(r.values[r.row(c), 0]) > 0 for c in r.channels if c not in r.dead())
    assert r.dead(threshold=1e9) == r.channels


def test_model_untouched(tiny):
    x = images()
    tiny.module.train()
    r = top_activations(tiny, x, "relu2", k=2, progress=False)
    with statecheck.untouched(tiny.module):
        for method in ("deconvnet", "guided", "gradient"):
            p = r.projected(channels=[0, 2], method=method, images=x, batch_size=3, progress=False)
        r.grid(mode="projection", images=x, projections=p)
    assert tiny.module.relu1.inplace and tiny.module.training


def test_cli_project_and_dead(monkeypatch, capsys, tiny, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, t in enumerate(images()):
        Image.fromarray((t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(folder / f"img_{i}.png")
    monkeypatch.setattr(cmd_topk, "load_model_from_args", lambda args: tiny)
    out = tmp_path / "grid.png"
    code = main(["topk", str(folder), "--layer", "relu2", "--k", "2", "--project", "deconvnet", "--dead", "--json",
                 "-o", str(out), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    data = json.loads(stdout)
    assert 1 in data["dead"] and 0 not in data["dead"] and "projections" in stderr
    assert Image.open(out).size[0] > 4 * 48
    code = main(["topk", str(folder), "--layer", "relu2", "--k", "2", "--dead", "-o", str(out), "--no-progress"])
    stdout, _ = capsys.readouterr()
    assert code == 0 and "dead:" in stdout and "never above 0" in stdout
    assert main(["topk", str(folder), "--layer", "relu2", "--reduce", "mean", "--dead", "-o", str(out)]) == 2
    assert "--reduce max" in capsys.readouterr().err


# ============================================================================ functional ReLU: one rule set with attribution


class FunctionalNet(nn.Module):
    """conv1 - F.relu - conv2 (stride 2) - F.relu - gap - head (1x1 conv, 3 classes) - flatten; ``modules=True``
    builds the same network with nn.ReLU modules instead of functional calls."""

    def __init__(self, modules: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Conv2d(5, 3, 1)
        self.relu1 = nn.ReLU() if modules else None
        self.relu2 = nn.ReLU() if modules else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.conv1(x)) if self.relu1 is not None else F.relu(self.conv1(x))
        b = self.relu2(self.conv2(a)) if self.relu2 is not None else F.relu(self.conv2(a))
        return self.head(self.gap(b)).flatten(1)


def test_functional_relu_projection_equals_guided_backprop_attribution():
    """The guided projection of a logit unit is guided backpropagation of that class: both take their
    rules from the probe, so a model calling F.relu gets the same (non-plain) gradient from both."""
    model = FunctionalNet()
    x = images()[2:4]  # image 3 holds the bright square
    for c in range(3):
        proj = unit_gradients(model, x, "head", [c, c], [0, 0], [0, 0], method="guided", progress=False).grads
        attr = cs.attribute(model, x, method="guided_backprop", target=c).raw
        torch.testing.assert_close(proj, attr, rtol=1e-5, atol=1e-7)
    plain = unit_gradients(model, x, "head", [0, 0], [0, 0], [0, 0], method="gradient", progress=False).grads
    guided = unit_gradients(model, x, "head", [0, 0], [0, 0], [0, 0], method="guided", progress=False).grads
    assert not torch.allclose(plain, guided)  # the functional ReLUs were rewired


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_functional_relu_topk_projections_equal_module_relu(method):
    x = images()
    runs = []
    for modules in (False, True):
        model = FunctionalNet(modules)
        r = top_activations(model, x, "conv2", k=2, channels=[0, 3], progress=False)
        runs.append(r.projected(model, method=method, images=x, progress=False))
    functional, with_modules = runs
    assert functional.images == with_modules.images and functional.units == with_modules.units
    torch.testing.assert_close(functional.crops, with_modules.crops, rtol=1e-5, atol=1e-7)
    assert functional.crops.abs().sum() > 0


# ============================================================================ image-specific projections (issue 11)


def _pairwise_cosine(crops: torch.Tensor) -> torch.Tensor:
    flat = crops.flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = flat @ flat.T
    return sim[~torch.eye(len(flat), dtype=torch.bool)]


def test_guided_projections_of_one_unit_differ_between_images_deconvnet_ones_do_not(builtin):
    names = ["chelsea", "coffee", "rocket", "astronaut"]
    x = torch.cat([builtin.preprocess(cs.sample_image(n)) for n in names])
    x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
    r = top_activations(builtin, x, "blocks.2.1", k=4, channels=[0], progress=False)
    guided = r.projected(builtin, images=x, progress=False)  # the default method
    assert guided.method == "guided" and guided.note is None
    with pytest.warns(UserWarning, match="no max-pooling"):
        deconv = r.projected(builtin, method="deconvnet", images=x, progress=False)
    assert "no max-pooling" in deconv.note
    # measured at 224 px: guided cosine 0.1-0.3 between images, DeconvNet 0.9-0.97 (EfficientNet has no switches)
    assert _pairwise_cosine(guided.crops).max() < 0.6
    assert _pairwise_cosine(deconv.crops).min() > 0.8


def test_deconvnet_on_a_max_pooling_model_has_no_note(tiny):
    x = images()
    r = top_activations(tiny, x, "conv3", k=2, channels=[0], progress=False)
    assert r.projected(tiny, method="deconvnet", images=x, progress=False).note is None  # it has a MaxPool2d


def test_explain_deconvnet_says_when_the_model_has_no_max_pooling(builtin):
    x = F.interpolate(builtin.preprocess(cs.sample_image("rocket")), size=(64, 64), mode="bilinear")
    with pytest.warns(UserWarning, match="no max-pooling"):
        a = cs.attribute(builtin, x, "deconvnet", progress=False)
    assert "no max-pooling" in a.extras["note"]
    assert "note" not in cs.attribute(builtin, x, "guided_backprop", progress=False).extras


def test_effective_box_holds_the_projection_mass_around_the_unit():
    crops = torch.zeros(3, 3, 41, 41)
    crops[:, :, 17:24, 17:24] = 1.0  # mass within 3 px of the centre (20, 20)
    crops[0, :, 0, 0] = 0.01  # a little far away
    top, left, bottom, right = effective_box(crops)
    assert (top, left) == (16, 16) and (bottom, right) == (25, 25)
    assert effective_box(torch.zeros(2, 3, 9, 9)) == (0, 0, 9, 9)


def test_projection_pictures_stretch_their_own_contrast():
    p = torch.zeros(3, 40, 40)
    p[0, 10:30, 10:30] = torch.linspace(0.1, 1.0, 400).view(20, 20)  # the structure
    p[0, 5, 5] = 100.0  # one outlier
    arr = np.asarray(projection_picture(p, "abs")).astype(float)[..., 0]
    assert arr[10:30, 10:30].mean() > 60  # peak scaling would leave the structure under 1% grey (about 1)


def test_cli_project_defaults_to_guided_and_notes_deconvnet_without_max_pooling(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, t in enumerate(images()):
        Image.fromarray((t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(folder / f"img_{i}.png")
    model = cs.Model(FunctionalNet(), input_size=(SIZE, SIZE), mean=(0, 0, 0), std=(1, 1, 1), labels=["a", "b", "c"],
                     resize_size=SIZE)
    monkeypatch.setattr(cmd_topk, "load_model_from_args", lambda args: model)
    out = tmp_path / "grid.png"
    assert main(["topk", str(folder), "--layer", "conv2", "--k", "2", "--project", "-o", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "guided projections" in err and "no max-pooling" not in err
    assert main(["topk", str(folder), "--layer", "conv2", "--k", "2", "--project", "deconvnet", "-o", str(out),
                 "--no-progress"]) == 0
    assert "note: the model has no max-pooling" in capsys.readouterr().err
