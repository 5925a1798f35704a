"""Top activating images per channel: exact against a brute-force sort, resumable, patches = receptive fields."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
import statecheck
from convscope.cli import cmd_topk
from convscope.cli.main import main
from convscope.dataset.folder import (
    ImageSource,
    SkippedImagesWarning,
    StateFileError,
    StateMismatchError,
    list_images,
)
from convscope.dataset.topk import TopKError, sidecar_path, top_activations

SIZE = 32
SQUARE = (12, 20, 3)  # top, left, side of the bright square planted in image 13


def tiny_module() -> nn.Sequential:
    """conv1 (3->4, 3x3) - relu1 - conv2 (4->6, 3x3 stride 2) - relu2 - pool - fc. Receptive field at conv2: 5 px, stride 2.

    Channel 0 of conv1 is the mean brightness minus 0.5 and channel 0 of conv2 averages it over 3x3: after
    relu2 it is a detector of bright regions (zero on the dark noise images). The other weights are random.
    """
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(4, 6, 3, stride=2, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3),
    ))
    with torch.no_grad():
        m.conv1.weight[0] = 1 / 27
        m.conv1.bias[0] = -0.5
        m.conv2.weight[0] = 0
        m.conv2.weight[0, 0] = 1 / 9
        m.conv2.bias[0] = 0
    return m


def tiny_model() -> cs.Model:
    return cs.Model(tiny_module(), input_size=(SIZE, SIZE), mean=(0, 0, 0), std=(1, 1, 1), labels=["a", "b", "c"],
                    resize_size=SIZE)


@pytest.fixture
def model() -> cs.Model:
    return tiny_model()


def write_images(folder, n: int = 20) -> list:
    """``n`` dark noise PNGs (values <= 0.4), with a 3x3 white square in image 13; in two subfolders."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = (rng.random((SIZE, SIZE, 3)) * 0.4 * 255).astype(np.uint8)
        if i == 13:
            top, left, side = SQUARE
            a[top:top + side, left:left + side] = 255
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{i:02d}.png"
        Image.fromarray(a).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_images(root)
    return root


def brute_force(model: cs.Model, files, layer: str, reduce: str):
    """Every activation in memory, every channel sorted (stable, so ties keep the earlier image)."""
    x = model.preprocess([str(f) for f in files])
    module = model.module
    stop = list(dict(module.named_children())).index(layer) + 1
    with torch.no_grad():
        act = module[:stop](x)  # (N, C, h, w), without any convscope machinery
    flat = act.flatten(2)
    if reduce == "max":
        scores, where = flat.max(dim=2)
    else:
        scores, where = flat.mean(dim=2), torch.full(flat.shape[:2], -1)
    order = torch.sort(scores.T, dim=1, descending=True, stable=True).indices  # (C, N)
    values = scores.T.gather(1, order)
    w = act.shape[-1]
    pos = where.T.gather(1, order)
    return values, order, pos // w, pos % w


# ============================================================================ exactness


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("layer", ["conv2", "relu1"])
def test_equals_brute_force_sort(model, folder, reduce, layer):
    files = list_images(folder)
    r = top_activations(model, folder, layer, k=5, reduce=reduce, batch_size=7, progress=False)  # 7 does not divide 20
    values, order, ys, xs = brute_force(model, files, layer, reduce)
    assert r.processed == r.total == 20 and r.complete and not r.skipped
    assert r.channels == list(range(values.shape[0]))
    assert torch.equal(r.indices, order[:, :5])
    torch.testing.assert_close(r.values, values[:, :5], rtol=1e-5, atol=1e-6)
    if reduce == "max":
        assert torch.equal(r.positions[..., 0], ys[:, :5]) and torch.equal(r.positions[..., 1], xs[:, :5])
    else:
        assert (r.positions == -1).all()
    assert [h.source for h in r.hits(1)] == [str(files[i]) for i in order[1, :5].tolist()]


def test_channel_subset_tensor_input_and_k_larger_than_dataset(model, folder):
    files = list_images(folder)
    x = model.preprocess([str(f) for f in files[:4]])
    full = top_activations(model, folder, "conv2", k=3, channels=[5, 2], batch_size=3, progress=False)
    values, order, _, _ = brute_force(model, files, "conv2", "max")
    assert full.channels == [5, 2] and torch.equal(full.indices, order[[5, 2], :3])
    small = top_activations(model, x, "conv2", k=9, batch_size=3, progress=False)  # a tensor; 4 images < k
    assert small.values.shape == (6, 4) and small.sources == [None] * 4
    ref, ref_order, _, _ = brute_force(model, files[:4], "conv2", "max")
    assert torch.equal(small.indices, ref_order)
    plain = top_activations(model.module, iter([x[:1], x[1:]]), "conv2", k=9, progress=False)  # an iterator, plain module
    assert plain.total == 4 and torch.equal(plain.indices, small.indices)


# ============================================================================ resume


def test_interrupt_then_resume_equals_one_run(model, folder, tmp_path):
    state = tmp_path / "run.topk"
    once = top_activations(model, folder, "conv2", k=4, batch_size=3, progress=False)
    seen = []

    def stop_after_two_batches(done, total):
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    part = top_activations(model, folder, "conv2", k=4, batch_size=3, state=state, save_every=100, progress=stop_after_two_batches)
    assert part.interrupted and part.processed == 6 and not part.complete
    saved = torch.load(state, weights_only=True)
    assert set(saved) == {"meta", "run/topk:conv2/values", "run/topk:conv2/indices", "run/topk:conv2/positions"}
    manifest = json.loads(sidecar_path(state).read_text())
    assert manifest["stages"]["run"]["processed"] == 6 and not manifest["stages"]["run"]["complete"]
    assert len(manifest["files"]) == 20 and manifest["files"][0] == "a/img_01.png"
    resumed_from = []
    rest = top_activations(model, folder, "conv2", k=4, batch_size=3, state=state, progress=lambda d, t: resumed_from.append(d))
    assert resumed_from[0] == 9  # continued after the 6 done, not from the start
    assert rest.complete and not rest.interrupted
    for name in ("values", "indices", "positions"):
        assert torch.equal(getattr(rest, name), getattr(once, name)), name
    again = top_activations(model, folder, "conv2", k=4, batch_size=3, state=state, progress=lambda d, t: resumed_from.append(-1))
    assert -1 not in resumed_from and torch.equal(again.indices, once.indices)  # already complete: no pass at all


def test_resume_refuses_another_run(model, folder, tmp_path):
    state = tmp_path / "run.topk"
    top_activations(model, folder, "conv2", k=4, batch_size=8, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="k"):
        top_activations(model, folder, "conv2", k=5, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="layer"):
        top_activations(model, folder, "relu2", k=4, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="channels"):
        top_activations(model, folder, "conv2", k=4, channels=[0], state=state, progress=False)
    Image.new("RGB", (SIZE, SIZE)).save(folder / "a" / "img_00b.png")
    with pytest.raises(StateMismatchError, match="20 inputs then, 21 now; input 0 was 'a/img_01.png', is now 'a/img_00b.png'"):
        top_activations(model, folder, "conv2", k=4, state=state, progress=False)
    other = tiny_model()
    with torch.no_grad():
        other.module.fc.weight.add_(1)
    (folder / "a" / "img_00b.png").unlink()
    with pytest.raises(StateMismatchError, match="model"):
        top_activations(other, folder, "conv2", k=4, state=state, progress=False)
    # a file that is not a state: one line saying so (not torch's weights_only advice), for text and pickles alike
    state.write_bytes(b"not a state")
    with pytest.raises(StateFileError, match="not a convscope top-k state file") as exc:
        top_activations(model, folder, "conv2", k=4, state=state, progress=False)
    assert "\n" not in str(exc.value) and "weights_only" not in str(exc.value)
    torch.save({"meta": object()}, state)  # a pickle of an arbitrary Python object
    with pytest.raises(StateFileError, match="not a convscope top-k state file") as exc:
        top_activations(model, folder, "conv2", k=4, state=state, progress=False)
    assert "\n" not in str(exc.value)


# ============================================================================ patches


def test_patch_is_the_receptive_field_and_finds_the_planted_square(model, folder):
    r = top_activations(model, folder, "relu2", k=3, channels=[0, 3], progress=False)
    top = r.hits(0)[0]
    assert top.source.endswith("img_13.png") and top.value > 0.05
    assert all(h.value == 0 for h in r.hits(0)[1:])  # dark images give exactly nothing
    rf = [row for row in model.layers() if row.name == "relu2"][0].receptive_field
    assert rf.size == (5, 5) and rf.stride == (2, 2)
    assert top.box == rf.box(top.y, top.x, clip=(SIZE, SIZE))
    assert top.box == (max(2 * top.y - 2, 0), max(2 * top.x - 2, 0), min(2 * top.y + 3, SIZE), min(2 * top.x + 3, SIZE))
    sq_top, sq_left, side = SQUARE
    t, left, b, right = top.box
    assert t <= sq_top and left <= sq_left and b >= sq_top + side and right >= sq_left + side
    patch = np.asarray(r.patches(0)[0])
    assert patch.shape == (b - t, right - left, 3)
    assert (patch.min(axis=2) == 255).sum() == side * side  # the whole square, nothing else that bright
    corner = [h for h in r.hits(3) if h.y == 0 and h.x == 0]  # a clipped box at the border, if any
    for h in corner:
        assert h.box == (0, 0, 3, 3)
    grid = r.grid()
    assert grid.size[0] > 3 * 48 and grid.size[1] > 2 * 48
    assert r.grid(mode="image").size[1] == grid.size[1]


def test_in_memory_images_are_not_kept(model, folder):
    files = list_images(folder)
    pictures = [cs.load_image(p) for p in files]
    r = top_activations(model, pictures, "relu2", k=2, channels=[0], progress=False)
    assert r.sources == [None] * 20 and files[r.hits(0)[0].image].name == "img_13.png"
    with pytest.raises(TopKError, match="in-memory"):
        r.patches(0)
    assert np.asarray(r.patches(0, images=pictures)[0]).max() == 255


# ============================================================================ bad input


def test_unreadable_files_are_skipped_and_counted(model, folder):
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "a" / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not listed")
    (folder / ".hidden.png").write_bytes(b"hidden files are not listed")
    source = ImageSource(folder)
    assert len(source) == 22
    with pytest.warns(SkippedImagesWarning, match="skipped 2 unreadable"):
        r = top_activations(model, folder, "relu2", k=3, batch_size=5, progress=False)
    assert r.processed == 22 and len(r.skipped) == 2 and r.complete
    bad = {i for i, _ in r.skipped}
    assert {r.sources[i].rsplit("/", 1)[-1] for i in bad} == {"broken.png", "empty.jpg"}
    assert not bad & set(r.indices.flatten().tolist())
    assert r.hits(0)[0].source.endswith("img_13.png")


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "'k' must be an int in 1..100000"), ({"k": 10**9}, "'k' must be"), ({"save_every": 0}, "save_every"), ({"reduce": "median"}, "unknown reduce"), ({"channels": [6]}, "out of range"),
    ({"channels": [1, 1]}, "duplicates"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_options_are_clear_errors(model, folder, kwargs, message):
    with pytest.raises(cs.ConvscopeError, match=message):
        top_activations(model, folder, "conv2", progress=False, **kwargs)


def test_bad_inputs_are_clear_errors(model, tmp_path):
    with pytest.raises(cs.ConvscopeError, match="no such folder or file"):
        top_activations(model, tmp_path / "missing", "conv2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(cs.ConvscopeError, match="no image files"):
        top_activations(model, tmp_path / "empty", "conv2")
    with pytest.raises(cs.LayerNotFoundError):
        top_activations(model, [cs.sample_image("horse")], "conv9")
    with pytest.raises(cs.ConvscopeError, match="not feature maps"):
        top_activations(model, [cs.sample_image("horse")], "fc", progress=False)


# ============================================================================ model hygiene


def test_model_untouched_also_when_interrupted(model, folder):
    model.module.relu1.inplace = True
    model.module.train()
    with statecheck.untouched(model.module):
        top_activations(model, folder, "conv2", k=2, batch_size=4, progress=False)

        def interrupt(done, total):
            raise KeyboardInterrupt

        assert top_activations(model, folder, "conv2", k=2, batch_size=4, progress=interrupt).interrupted


# ============================================================================ command line


def test_cli_json_and_grid(monkeypatch, capsys, model, folder, tmp_path):
    monkeypatch.setattr(cmd_topk, "load_model_from_args", lambda args: model)
    out = tmp_path / "grid.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["topk", str(folder), "--layer", "relu2", "--k", "3", "--channels", "0-2", "--json", "-o", str(out),
                     "--state", str(tmp_path / "s.topk"), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    data = json.loads(stdout)
    assert [c["channel"] for c in data["channels"]] == [0, 1, 2] and data["complete"] and data["processed"] == 20
    first = data["channels"][0]["top"][0]
    assert first["source"] == "a/img_13.png" and first["rank"] == 1 and len(first["box"]) == 4
    assert Image.open(out).size[1] > 3 * 48 and "grid" in stderr
    assert (tmp_path / "s.topk").exists() and sidecar_path(tmp_path / "s.topk").exists()
    code = main(["topk", str(folder), "--layer", "relu2", "--k", "3", "-o", str(out), "--reduce", "mean", "--no-progress"])
    stdout, _ = capsys.readouterr()
    assert code == 0 and stdout.splitlines()[0].startswith("relu2: top 3 by mean over 20 images")


def test_cli_stats_in_the_same_pass(monkeypatch, capsys, model, folder, tmp_path):
    monkeypatch.setattr(cmd_topk, "load_model_from_args", lambda args: model)
    out = tmp_path / "grid.png"
    assert main(["topk", str(folder), "--layer", "relu2", "--k", "3", "--stats", "--json", "-o", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    data = json.loads(capsys.readouterr().out)
    stats = data["stats"]
    assert stats["images"] == 20 and len(stats["channels"]) == 6 and data["complete"]
    assert all(0 <= c["sparsity"] <= 1 and c["max"] >= c["mean"] for c in stats["channels"])
    assert main(["topk", str(folder), "--layer", "relu2", "--stats", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "statistics of relu2 over 20 images" in text and "never fires:" in text
    assert main(["topk", str(folder), "--layer", "relu2", "--address", "x:1", "-o", str(out)]) == 2
    assert "--engine ray" in capsys.readouterr().err


def test_cli_bad_input_exits_2(monkeypatch, capsys, model, folder, tmp_path):
    monkeypatch.setattr(cmd_topk, "load_model_from_args", lambda args: model)
    assert main(["topk", str(folder), "--layer", "relu2", "--channels", "99", "-o", str(tmp_path / "g.png")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["topk", str(tmp_path / "nope"), "--layer", "relu2"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["topk", str(folder), "--channels", "3-1"])
    assert exc.value.code == 2
