"""Network Dissection: IoU equal to a brute-force computation, category-restricted unions, exact thresholds; the same
numbers as before the dataset engine; pure reducer steps and exact merges; Ctrl-C at every line of an update resumed
to the uninterrupted result."""

from __future__ import annotations

import csv
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from interrupts import interrupt_everywhere
from PIL import Image
from torch import nn

import convscope as cs
import statecheck
from convscope.cli.main import main
from convscope.dataset.dissect import (
    WHOLE,
    DissectError,
    IoUReducer,
    ThresholdReducer,
    dissect,
    make_synthetic_broden,
    open_broden,
    whole_image_input,
)
from convscope.dataset.engine import EngineError, Forward, Loader, RunInfo
from convscope.dataset.engine import run as engine_run
from convscope.dataset.folder import ImageSource, StateMismatchError
from convscope.dataset.topk import merge_topk

SIZE = 32


def planted_module() -> nn.Sequential:
    """conv (2x2 stride 2) - relu: unit 0 = relu(mean over 2x2 of (R - G - B) - 0.5) fires only on the red square;
    units 1-3 random. ReLU in place, module left in train mode (the run must restore both)."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 2, stride=2), relu=nn.ReLU(inplace=True),
                                  pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten()))
    with torch.no_grad():
        m.conv.weight[0] = torch.tensor([0.25, -0.25, -0.25]).view(3, 1, 1)
        m.conv.bias[0] = -0.5
    return m.train()


def planted_model() -> cs.Model:
    return cs.Model(planted_module(), input_size=SIZE, mean=(0, 0, 0), std=(1, 1, 1), labels=list("abcd"), resize_size=SIZE)


@pytest.fixture(scope="module")
def broden(tmp_path_factory):
    return make_synthetic_broden(tmp_path_factory.mktemp("broden"), 30, size=SIZE)


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def brute_force(module: nn.Module, root, layer: str = "relu", quantile: float = 0.995):
    """All activations in memory, numpy.quantile, per-label loops: the IoU matrix and thresholds."""
    rows = read_rows(root / "index.csv")
    labels = read_rows(root / "label.csv")
    cov = {}
    for cat in ("color", "object", "part", "material", "scene", "texture"):
        for r in read_rows(root / f"c_{cat}.csv"):
            cov.setdefault(int(r["number"]), {})[cat] = float(r["coverage"])
    category = {n: max(c, key=c.get) for n, c in cov.items()}
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(root / "images" / r["image"]).convert("RGB"), np.float32) / 255)
                     for r in rows]).permute(0, 3, 1, 2)
    with torch.no_grad():
        act = dict(module.named_children())["conv"](x).relu() if layer == "relu" else None
    thr = np.quantile(act.permute(1, 0, 2, 3).reshape(act.shape[1], -1).numpy(), quantile, axis=1)
    sh, sw = int(rows[0]["sh"]), int(rows[0]["sw"])
    up = F.interpolate(act, size=(sh, sw), mode="bilinear", align_corners=False).numpy()
    masks = up > thr[None, :, None, None]                                     # (N, U, sh, sw)
    L = max(int(r["number"]) for r in labels) + 1
    label_masks = np.zeros((len(rows), L, sh, sw), bool)
    for i, r in enumerate(rows):
        for col in ("color", "object", "part", "material"):
            for name in filter(None, r[col].split(";")):
                a = np.asarray(Image.open(root / "images" / name).convert("RGB")).astype(np.int64)
                lab = a[..., 0] + 256 * a[..., 1]
                for v in np.unique(lab[lab > 0]):
                    label_masks[i, v] |= lab == v
        for col in ("scene", "texture"):
            for v in filter(None, r[col].split(";")):
                label_masks[i, int(v)] = True
    iou = np.zeros((act.shape[1], L))
    for c in range(1, L):
        if c not in category:
            continue
        with_cat = np.array([any(label_masks[i, d].any() for d in category if category[d] == category[c]) for i in range(len(rows))])
        for u in range(act.shape[1]):
            inter = (masks[:, u] & label_masks[:, c]).sum()
            union = (masks[with_cat, u] | label_masks[with_cat, c]).sum()
            iou[u, c] = inter / union if union else 0
    return iou, thr, label_masks


def test_planted_square_detector_and_iou_equal_brute_force(broden):
    model = planted_model()
    d = dissect(model, broden, "relu", batch_size=7, progress=False)
    unit0 = d.units()[0]
    assert (unit0.name, unit0.category) == ("square", "object")
    assert unit0.iou > 0.5 and unit0.detector
    iou, thr, _ = brute_force(model.module, broden)
    np.testing.assert_allclose(d.thresholds.numpy(), thr, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.iou.numpy(), iou, rtol=0, atol=1e-6)
    assert d.summary()["per_category"]["object"]["labels"][0] == "square"
    assert "square" in d.table()
    # the picture is drawn from the result alone: the top images' maps are kept by pass 2, no forward pass
    assert d.top_maps.shape == (d.num_units, d.top_images.shape[1], *d.map_size)
    calls = []
    handle = model.module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        picture = d.grid([0], model=model)
    finally:
        handle.remove()
    assert calls == [] and picture.size[0] > 0


def test_union_restricted_to_images_of_the_category_and_coverage_assignment(tmp_path):
    """3 images 4x4, unit = red channel; hand-computed IoUs (quantile 0.5 gives threshold 0: mask = red pixels)."""
    (tmp_path / "images").mkdir()
    red = [np.zeros((4, 4), bool) for _ in range(3)]
    red[0][0] = True          # image 0: unit on row 0 = object label a
    red[1][0:2] = True        # image 1: unit on rows 0-1; part label b on row 1
    red[2][0, :2] = True      # image 2: 2 pixels; only a scene label
    for i, r in enumerate(red):
        Image.fromarray(np.stack([r * 255, r * 0, r * 0], -1).astype(np.uint8)).save(tmp_path / "images" / f"{i}.png")

    def mask(name, value, row):
        m = np.zeros((4, 4, 3), np.uint8)
        m[row, :, 0] = value
        Image.fromarray(m).save(tmp_path / "images" / name)
    mask("0_o.png", 1, 0)
    mask("1_p.png", 2, 1)
    (tmp_path / "index.csv").write_text("image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n"
                                        "0.png,train,4,4,4,4,,0_o.png,,,,\n1.png,train,4,4,4,4,,,1_p.png,,,\n"
                                        "2.png,train,4,4,4,4,,,,,3,\n")
    # b is listed under object first but has more coverage in part: it belongs to part
    (tmp_path / "label.csv").write_text("number,name,category,frequency\n0,-,,0\n1,a,object(5);part(1),1\n"
                                        "2,b,object(2);part(3),1\n3,s,scene(1),1\n")
    unit = nn.Conv2d(3, 1, 1, bias=False)
    with torch.no_grad():
        unit.weight.copy_(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1))
    module = nn.Sequential(OrderedDict(conv=unit))
    # identity preprocessing at the images' own size, stated explicitly: a plain module now gets the one
    # documented plain-module default (cs.as_model: ImageNet mean/std at 224 px), checked at the end
    model = cs.load_model(module, input_size=4, mean=(0, 0, 0), std=(1, 1, 1), labels=["u"])
    d = dissect(model, tmp_path, "conv", quantile=0.5, progress=False)
    assert d.label_category[1:] == ["object", "part", "scene"]
    assert d.thresholds.tolist() == [0.0]
    # a: only image 0 carries an object label -> union 4 + 4 - 4; b: image 1 -> 8 + 4 - 4; s: image 2 -> 2 + 16 - 2
    assert d.iou[0, 1:].tolist() == pytest.approx([1.0, 0.5, 2 / 16])
    assert d.unit_area[0].tolist() == [4, 8, 2]
    assert d.label_area[1:].tolist() == [4, 4, 16]
    assert d.summary()["unique_detectors"] == 3      # a (object), b (part), s (scene): best IoU per category > 0.04
    assert d.summary()["detectors"] == 1             # the unit itself: best label a
    plain = dissect(module, tmp_path, "conv", quantile=0.5, progress=False)
    defaults = cs.load_model(module, input_size=224, mean=cs.models.PLAIN_MODULE_DEFAULTS["mean"],
                             std=cs.models.PLAIN_MODULE_DEFAULTS["std"], labels=["u"])
    assert plain.thresholds.tolist() == dissect(defaults, tmp_path, "conv", quantile=0.5, progress=False).thresholds.tolist()
    assert plain.thresholds.tolist() == [pytest.approx(-0.485 / 0.229)]  # a black pixel in ImageNet normalisation


def test_stacked_part_masks_and_whole_image_labels(broden):
    d = dissect(planted_model(), broden, "relu", progress=False)
    _, _, label_masks = brute_force(planted_model().module, broden)
    rows = read_rows(broden / "index.csv")
    assert any(";" in r["part"] for r in rows) and any(";" in r["scene"] for r in rows)
    number = {n: i for i, n in enumerate(d.names)}
    p = d.mask_size[0] * d.mask_size[1]
    indoor = sum("8" in r["scene"].split(";") for r in rows)
    assert d.label_area[number["indoor"]] == indoor * p
    assert d.label_area[number["striped"]] == sum(r["texture"] == "10" for r in rows) * p
    top, left = label_masks[:, number["top"]], label_masks[:, number["left"]]
    assert (top & left).any()    # the two stacked part masks overlap; each pixel counts for both labels
    assert d.label_area[number["top"]] == top.sum() and d.label_area[number["left"]] == left.sum()
    assert d.label_category[number["disk"]] == "object"     # listed in object and material, more coverage in object


def test_streaming_threshold_equals_numpy_quantile_and_histogram_bound(broden):
    model = planted_model()
    _, thr, _ = brute_force(model.module, broden)
    for q in (0.995, 0.9):
        exact = dissect(model, broden, "relu", batch_size=4, quantile=q, progress=False)
        assert exact.exact_threshold and exact.threshold_error.abs().max() == 0
        want = brute_force(model.module, broden, quantile=q)[1]
        np.testing.assert_allclose(exact.thresholds.numpy(), want, rtol=0, atol=1e-6)
    sketch = dissect(model, broden, "relu", batch_size=4, quantile_memory=16, progress=False)
    assert not sketch.exact_threshold
    assert np.all(np.abs(sketch.thresholds.numpy() - thr) <= sketch.threshold_error.numpy() + 1e-9)


def test_bad_datasets_give_clear_errors(tmp_path, broden):
    with pytest.raises(DissectError, match="index.csv"):
        open_broden(tmp_path)
    (tmp_path / "index.csv").write_text((broden / "index.csv").read_text())
    (tmp_path / "label.csv").write_text("number,name,category\n0,-,\nx,red,color(1)\n")
    with pytest.raises(DissectError, match="line 3.*not a number"):
        open_broden(tmp_path)
    (tmp_path / "label.csv").write_text("number,name,category\n1,red,color(1\n")
    with pytest.raises(DissectError, match="cannot read category"):
        open_broden(tmp_path)
    with pytest.raises(DissectError, match="unknown category"):
        open_broden(broden, ["objects"])
    (tmp_path / "label.csv").write_text("number,name,category\n1,red,color(1)\n")   # masks use numbers up to 10
    (tmp_path / "images").symlink_to(broden / "images")
    with pytest.raises(DissectError, match="label number not in label.csv"):
        dissect(planted_model(), tmp_path, "relu", progress=False)


def test_model_untouched_and_resume_after_interrupt(broden, tmp_path):
    model = planted_model()
    with statecheck.untouched(model.module):
        full = dissect(model, broden, "relu", batch_size=8, progress=False)

    def stop(stage, done, total):
        if stage == "iou" and done >= 8:
            raise KeyboardInterrupt

    state = tmp_path / "run.pt"
    with statecheck.untouched(model.module):
        part = dissect(model, broden, "relu", batch_size=8, state=state, progress=stop)
    assert part.interrupted and part.stage == "iou" and part.processed == 8
    again = dissect(model, broden, "relu", batch_size=8, state=state, progress=False)
    assert not again.interrupted and again.processed == full.total
    assert torch.equal(again.iou, full.iou) and torch.equal(again.thresholds, full.thresholds)
    with pytest.raises(StateMismatchError, match="quantile"):  # one error class for every resumable analysis
        dissect(model, broden, "relu", quantile=0.9, state=state, progress=False)


# ---------------------------------------------------------------------------- regression against the pre-engine code

REGRESSION = Path(__file__).parent / "data" / "dissect_regression.pt"
N_IMAGES = 24
#: The runs whose results ``data/dissect_regression.pt`` holds (exact tails and histogram sketches, uneven batches).
CASES = {
    "relu1_exact": {"layer": "relu1", "batch_size": 7},
    "relu2_exact_q90": {"layer": "relu2", "batch_size": 5, "quantile": 0.9, "categories": ["object", "part", "scene"]},
    "relu1_sketch": {"layer": "relu1", "batch_size": 4, "quantile_memory": 16, "top_k": 3},
    "relu2_sketch": {"layer": "relu2", "batch_size": 6, "quantile_memory": 16},
}


def regression_model(weights: dict[str, torch.Tensor]) -> cs.Model:
    """conv-relu (16 x 16 maps: the mask size) then conv-relu (8 x 8: upsampled), weights from the data file."""
    m = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 2, stride=2), relu1=nn.ReLU(),
                                  conv2=nn.Conv2d(4, 6, 2, stride=2), relu2=nn.ReLU()))
    m.load_state_dict(weights)
    return cs.Model(m, input_size=SIZE, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), labels=["x"], resize_size=SIZE)


def test_same_numbers_as_the_pre_engine_implementation(tmp_path):
    """``data/dissect_regression.pt`` was written by the streaming loop dissect() had before it ran on the dataset
    engine (commit fddb7d5): the port must give the same thresholds, IoUs (1e-6), detectors and top images."""
    saved = torch.load(REGRESSION, weights_only=True)
    model = regression_model({k[len("weights/"):]: v for k, v in saved.items() if k.startswith("weights/")})
    root = make_synthetic_broden(tmp_path / "b", N_IMAGES, size=SIZE, square_every=3)
    for name, kw in CASES.items():
        d = dissect(model, root, progress=False, **kw)
        assert torch.equal(d.thresholds, saved[f"{name}/thresholds"]), name
        assert torch.equal(d.threshold_error, saved[f"{name}/threshold_error"]), name
        np.testing.assert_allclose(d.iou.numpy(), saved[f"{name}/iou"].numpy(), rtol=0, atol=1e-6, err_msg=name)
        for key in ("intersection", "unit_area", "label_area"):
            assert torch.equal(getattr(d, key).double(), saved[f"{name}/{key}"].double()), (name, key)
        assert torch.equal(d.top_images, saved[f"{name}/top_images"]), name
        assert [u.label if u.detector else -1 for u in d.units()] == saved[f"{name}/detectors"].tolist(), name


# ---------------------------------------------------------------------------- the passes as reducers


def _plain(state):
    """A state's values with its tensors cloned (to check that a step left them as they were)."""
    return None if state is None else {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _tree(reducer, parts):
    """Partial states merged pairwise (a balanced tree, inputs kept in order), as a parallel engine may."""
    while len(parts) > 1:
        parts = [reducer.merge_states(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def test_pass_reducers_are_pure_and_their_merges_match_the_stream(broden):
    """Steps never change the state they are given (the engine's one-assignment commit relies on it); merging
    per-batch states in input order (sequentially or as a tree) gives the stream's result: exactly for the top tail
    and the IoU counters, within the reported bound for the histogram sketch."""
    ds = open_broden(broden)
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(len(ds), 4, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 8.0]).view(1, 4, 1, 1)
    acts[10:] *= 3  # later batches go beyond the histogram's first range
    batches = [Forward(x=torch.zeros(len(i), 3, 1, 1), index=i, activations={"relu": acts[i]}, inputs={}, output=None)
               for i in torch.arange(len(ds)).split(7)]
    exact = np.quantile(acts.permute(1, 0, 2, 3).reshape(4, -1).numpy(), 0.995, axis=1)
    for reducer in (ThresholdReducer("relu", count=len(ds)), ThresholdReducer("relu", count=len(ds), quantile_memory=16),
                    IoUReducer("relu", ds, torch.tensor(exact), top_k=3)):
        state, parts = None, []
        for b in batches:
            before = _plain(state)
            new = reducer.step(state, b)
            assert _equal(state, before), f"{reducer.name}: step changed its input state"
            state = new
            parts.append(reducer.step(None, b))
        streamed, sequential, tree = (reducer.finish(s, RunInfo()) for s in (state, _sequential(reducer, parts),
                                                                              _tree(reducer, parts)))
        if isinstance(reducer, ThresholdReducer) and not streamed["exact"]:
            assert not np.allclose(streamed["threshold_error"].numpy(), 0)
            for got in (streamed, sequential, tree):
                assert np.all(np.abs(got["thresholds"].numpy() - exact) <= got["threshold_error"].numpy() + 1e-9)
            continue
        for got in (sequential, tree):
            assert streamed.keys() == got.keys()
            for k in streamed:
                assert torch.equal(streamed[k], got[k]) if isinstance(streamed[k], torch.Tensor) else streamed[k] == got[k], k
        if isinstance(reducer, ThresholdReducer):
            np.testing.assert_allclose(streamed["thresholds"].numpy(), exact, rtol=0, atol=1e-6)


def _sequential(reducer, parts):
    state = None
    for p in parts:
        state = reducer.merge_states(state, p)
    return state


def test_whole_preprocessing_equals_the_pre_engine_input():
    """The engine's ``Preprocessing(kind="whole", resample="bilinear")`` (decoded as uint8, normalised on the device)
    gives exactly the float input dissect built before (bilinear resize, float32 / 255, (x - mean) / std)."""
    model = regression_model(nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 2, stride=2), relu1=nn.ReLU(),
                                                       conv2=nn.Conv2d(4, 6, 2, stride=2), relu2=nn.ReLU())).state_dict())
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (45, 20), (17, 64), (8, 8))]
    h, w = model.input_size
    old = torch.from_numpy(np.stack([np.asarray(p if p.size == (w, h) else p.resize((w, h), Image.Resampling.BILINEAR),
                                                dtype=np.float32) / 255.0 for p in pictures])).permute(0, 3, 1, 2)
    old = model.from_pixels(old).contiguous()
    batch = next(iter(Loader(model, ImageSource(pictures), len(pictures), preprocessing=WHOLE, workers=0)))
    assert torch.equal(batch.x, old)
    assert torch.equal(whole_image_input(model, pictures), old)


def test_a_state_of_the_format_before_the_engine_is_refused_clearly(broden, tmp_path):
    state = tmp_path / "old.state"
    meta = {"format": "convscope-dissect/1", "layer": "relu", "quantile": 0.995, "progress": {"stage": "iou", "processed": 8}}
    torch.save({"meta": json.dumps(meta), "inter": torch.zeros(4, 11)}, state)  # a version-1 state
    with pytest.raises(StateMismatchError, match="convscope-dissect/1.*delete it"):
        dissect(planted_model(), broden, "relu", state=state, progress=False)


# ---------------------------------------------------------------------------- interrupted anywhere, resumed exactly

#: The code of an update: the reducers, the engine's runner and state store, the top-k merge.
ENGINE_FILES = {f.__code__.co_filename for f in (dissect, engine_run, merge_topk)}


def same_dissection(a, b) -> None:
    assert not b.interrupted and b.stage == "done" and b.processed == a.processed
    for key in ("thresholds", "threshold_error", "iou", "intersection", "unit_area", "label_area", "top_images",
                "top_maps"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_interrupted_at_every_line_of_an_iou_update_resumes_to_the_same_result(tmp_path):
    """The bug of the streaming loop before the engine: counters updated in several steps, so a Ctrl-C between them
    was saved and the resumed run counted the batch twice. Ctrl-C at the lines of batch 2's IoU update (every line of
    the reducer's step and of the engine's commit and save, and a spread of the others: the label reading, the top-k
    merge, the next batch's loading), then the same call again: the result of an uninterrupted run, exactly."""
    root = make_synthetic_broden(tmp_path / "b", 9, size=16, square_every=2)
    model = planted_model()

    def plain(state):
        return dissect(model, root, "relu", batch_size=3, state=state, save_every=1, progress=False)

    def stop(stage, done, total):
        if stage == "iou":
            raise KeyboardInterrupt

    # every trial starts from a state with pass 1 and the first IoU batch done (cheaper than redoing them)
    seed = tmp_path / "seed.state"
    assert dissect(model, root, "relu", batch_size=3, state=seed, save_every=1, progress=stop).processed == 3

    def analysis(state):
        if not state.exists():
            shutil.copy(seed, state)
        return plain(state)

    def interrupted(d):
        assert d.interrupted and d.stage == "iou" and d.processed in (3, 6)

    commit = {"IoUReducer.step", "run", "run.<locals>.save", "StateStore.save", "_local_states", "_local_states.<locals>.advance"}
    report = interrupt_everywhere(analysis, tmp_path / "states", counts=lambda code: code.co_filename in ENGINE_FILES,
                                  starts=lambda code: code is IoUReducer.step.__code__, batch=1, same=same_dissection,
                                  always=lambda where: where[2] in commit, limit=15, interrupted=interrupted)
    same_dissection(plain(None), report.expected)
    where = {(name, qualname) for name, _, qualname in report.events}
    assert {("dissect.py", "IoUReducer.step"), ("dissect.py", "_batch_counts"), ("topk.py", "merge_topk"),
            ("engine.py", "run"), ("engine.py", "StateStore.save")} <= where
    tried = [report.events[n] for n in report.points]
    assert sum(w[2] in commit for w in tried) > 30 and not any(escaped for _, escaped in report.fired)


def test_interrupted_in_a_histogram_update_resumes_to_the_same_thresholds(tmp_path):
    """Pass 1 too (the histogram sketch grew in place before the engine): Ctrl-C at a spread of lines of batch 2's
    update, resumed: the thresholds (and everything after them) of an uninterrupted run."""
    root = make_synthetic_broden(tmp_path / "b", 6, size=16, square_every=2)
    model = planted_model()

    def analysis(state):
        return dissect(model, root, "relu", batch_size=2, state=state, save_every=1, quantile_memory=16, progress=False)

    report = interrupt_everywhere(analysis, tmp_path / "states", counts=lambda code: code.co_filename in ENGINE_FILES,
                                  starts=lambda code: code is ThresholdReducer.step.__code__, batch=2,
                                  same=same_dissection, limit=8)
    assert not report.expected.exact_threshold and len(report.points) == 8
    assert {"ThresholdReducer.step", "_Histogram.added"} <= {q for _, _, q in report.events}


def test_cli_json_and_synthetic(tmp_path, capsys, monkeypatch):
    root = tmp_path / "syn"
    assert main(["dissect", "--synthetic", str(root), "--synthetic-images", "10"]) == 0
    model = planted_model()
    monkeypatch.setattr("convscope.cli.cmd_dissect.load_model_from_args", lambda args: model)
    capsys.readouterr()
    out = tmp_path / "units.png"
    assert main(["dissect", str(root), "--layer", "relu", "--json", "--no-progress", "-o", str(out),
                 "--categories", "object,part", "--workers", "0", "--amp", "bf16"]) == 0  # engine options pass through
    data = json.loads(capsys.readouterr().out)
    assert data["units"] == 4 and set(data["per_category"]) == {"object", "part"}
    assert data["unit_results"][0]["label"] == "square" and data["unit_results"][0]["detector"]
    assert Image.open(out).size[0] > 100
    assert main(["dissect", str(tmp_path / "nothing"), "--layer", "relu"]) == 2
    with pytest.raises(EngineError, match="fp16"):  # the engine keywords reach the engine
        dissect(model, root, "relu", amp="fp16", progress=False)
    with pytest.raises(EngineError, match="unknown engine"):
        dissect(model, root, "relu", engine="spark", progress=False)
