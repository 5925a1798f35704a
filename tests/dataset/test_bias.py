"""Shape-vs-texture bias (Geirhos et al. 2019): the 16-way decision rule, the counting, bad inputs, the CLI, and the
run on the dataset engine (inputs equal to stimulus_inputs, Ctrl-C then resume, refused resumes, unreadable stimuli).

The decision logic is checked on a lookup model whose logits are built by hand (each image is a flat
colour whose red value picks a row of logits), so every decision is known in advance. The built-in
model runs once over the shipped 80-image sample (skipped when ../shared/data is absent).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.cli import cmd_bias
from convscope.dataset import bias as B
from convscope.dataset.folder import SkippedImagesWarning, StateMismatchError, UnreadableImagesError
from convscope.errors import ConvscopeError
from statecheck import assert_untouched, snapshot, untouched
from testkit import run_cli as _run

CATS = B.load_categories()  # the copy shipped inside the package
STEP = 20  # red value = STEP * row, so decoding survives any rounding of the resize


def _probs(**mass: float) -> torch.Tensor:
    """A probability vector over the 1000 classes; keys ``c<idx>`` or a category name (spread evenly)."""
    p = torch.zeros(1000, dtype=torch.float64)
    for key, value in mass.items():
        if key.startswith("c") and key[1:].isdigit():
            p[int(key[1:])] += value
        else:
            idx = CATS[key]
            p[idx] += value / len(idx)
    p[0] += 1.0 - float(p.sum())  # class 0 (tench) belongs to no category
    return p


# rows of the lookup table, the file that shows each row, and the decision the mean rule must make
ROWS = [
    # mean: airplane 0.2 vs dog 0.5/109 -> airplane (shape); max or sum of probabilities would say dog
    ("airplane/airplane1-dog1.png", _probs(c404=0.2, c152=0.5), "airplane"),
    # mean: bear 0.05 vs dog 0.007 -> bear (shape); the sum (0.2 vs 0.76) would say dog
    ("bear/bear1-dog2.png", _probs(bear=0.2, dog=0.007 * len(CATS["dog"])), "bear"),
    ("cat/cat1-bird1.png", _probs(c8=0.9), "bird"),                      # texture
    ("car/car4-car2.png", _probs(c436=0.9), "car"),                      # same category: left out
    ("clock/clock1-knife1.png", _probs(c867=0.9), "truck"),              # neither (867: trailer truck)
    ("knife/knife2-oven1.png", _probs(c499=0.3, c766=0.2), "knife"),     # shape (499 cleaver, 766 rotisserie)
]
EXPECTED = {"shape": 3, "texture": 1, "neither": 1, "conflicts": 5, "excluded": 1}


class Lookup(nn.Module):
    """Returns the logits row picked by the red value of the top-left pixel (pixels in [0, 1])."""

    def __init__(self, table: torch.Tensor, classes: int = 1000):
        super().__init__()
        self.register_buffer("table", table[:, :classes].float())
        self.scale = nn.Conv2d(3, 3, 1)  # a parameter, so the model has a device and a requires_grad flag
        with torch.no_grad():  # the same weights every time: a resumed run recognises the model
            self.scale.weight.fill_(0.5)
            self.scale.bias.zero_()
        self.calls = 0
        self.interrupt_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.interrupt_at is not None and self.calls >= self.interrupt_at:
            raise KeyboardInterrupt
        row = (x[:, 0, 0, 0] * 255 / STEP).round().long()
        return self.table[row] + 3.0  # a constant offset: softmax must not care


def _table() -> torch.Tensor:
    return torch.stack([p for _, p, _ in ROWS]).clamp_min(1e-12).log()


def _fake_model(classes: int = 1000, labels: int | None = None) -> cs.Model:
    module = Lookup(_table(), classes)
    n = labels or classes
    return cs.load_model(module, input_size=8, mean=(0, 0, 0), std=(1, 1, 1), labels=[f"class {i}" for i in range(n)],
                         device="cpu")


def _write(path: Path, row: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (STEP * row, 128, 128)).save(path)


@pytest.fixture
def conflict_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cues"
    for row, (name, _, _) in enumerate(ROWS):
        _write(root / name, row)
    _write(root / "notes.png", 0)  # not a cue-conflict name: skipped
    (root / "README.txt").write_text("not an image")
    return root


# ============================================================================ the decision rule


def test_aggregation_matrix_averages_each_categorys_classes():
    m = B.aggregation_matrix(CATS)
    assert m.shape == (16, 1000)
    assert torch.allclose(m.sum(1), torch.ones(16))
    dog = list(CATS).index("dog")
    assert m[dog, 152] == pytest.approx(1 / len(CATS["dog"])) and m[dog, 404] == 0


def test_decisions_use_the_mean_and_leave_out_same_category_images(conflict_dir):
    model = _fake_model()
    model.module.train()  # the run must switch to eval and back
    before = snapshot(model.module)
    r = B.shape_bias(model, conflict_dir, categories=CATS, batch_size=4)
    assert model.module.training and model.module.calls == 2  # 6 images in batches of 4
    assert_untouched(model.module, before)
    assert [d.file for d in r.decisions] == sorted(name for name, _, _ in ROWS)
    decided = {d.file: d.decision for d in r.decisions}
    assert decided == {name: want for name, _, want in ROWS}
    for key, value in EXPECTED.items():
        assert getattr(r, key) == value, key
    assert r.shape_bias == pytest.approx(3 / 4)
    assert (r.shape_fraction, r.texture_fraction, r.neither_fraction) == pytest.approx((0.6, 0.2, 0.2))
    assert r.skipped == ["notes.png"] and r.total == 6 and not r.interrupted
    # the scores are the mean softmax per category, computed here by hand
    names = list(CATS)
    order = {d.file: i for i, d in enumerate(r.decisions)}
    airplane = r.scores[order["airplane/airplane1-dog1.png"]]
    assert airplane[names.index("airplane")] == pytest.approx(0.2, abs=1e-6)
    assert airplane[names.index("dog")] == pytest.approx(0.5 / len(CATS["dog"]), abs=1e-6)
    bear = r.scores[order["bear/bear1-dog2.png"]]
    assert bear[names.index("bear")] == pytest.approx(0.05, abs=1e-6) and bear[names.index("dog")] == pytest.approx(0.007, abs=1e-6)
    # other aggregations would decide differently: the test is sensitive to the rule
    probs = torch.stack([p for _, p, _ in ROWS]).float()
    by_max = [names[int(torch.stack([probs[i, CATS[c]].max() for c in names]).argmax())] for i in range(2)]
    by_sum = [names[int(torch.stack([probs[i, CATS[c]].sum() for c in names]).argmax())] for i in range(2)]
    assert by_max[0] == "dog" and by_sum[1] == "dog"
    # per shape category, the confusion matrix and the top ImageNet class
    per = {c.category: c for c in r.per_category}
    assert (per["airplane"].shape, per["airplane"].texture, per["airplane"].n) == (1, 0, 1)
    assert (per["cat"].shape, per["cat"].texture, per["cat"].n) == (0, 1, 1)
    assert per["car"].n == 0 and math.isnan(per["car"].shape_bias)
    assert int(r.confusion.sum()) == 5 and r.confusion[names.index("clock"), names.index("truck")] == 1
    top = {d.file: d.top_class for d in r.decisions}
    assert top["airplane/airplane1-dog1.png"] == 152 and top["cat/cat1-bird1.png"] == 8
    assert top["knife/knife2-oven1.png"] == 0  # class 0 holds the rest of the mass: top class and decision differ
    outcomes = {d.file: d.outcome for d in r.decisions}
    assert outcomes["car/car4-car2.png"] == "no conflict" and outcomes["clock/clock1-knife1.png"] == "neither"


def test_results_do_not_depend_on_the_batch_size(conflict_dir):
    a = B.shape_bias(_fake_model(), conflict_dir, batch_size=1)
    b = B.shape_bias(_fake_model(), conflict_dir, batch_size=64)
    assert [d.decision for d in a.decisions] == [d.decision for d in b.decisions]
    assert torch.allclose(a.scores, b.scores)


def test_ctrl_c_keeps_the_batches_done(conflict_dir):
    model = _fake_model()
    model.module.interrupt_at = 2
    r = B.shape_bias(model, conflict_dir, batch_size=4)
    assert r.interrupted and len(r.decisions) == 4 and r.total == 6
    assert r.conflicts + r.excluded == 4 and r.scores.shape == (4, 16)
    assert not any(m._forward_hooks for m in model.module.modules())


def test_shape_accuracy_counts_per_category(tmp_path):
    root = tmp_path / "silhouettes"
    _write(root / "airplane" / "airplane1.png", 0)   # decided airplane: correct
    _write(root / "dog" / "dog1.png", 0)             # decided airplane: wrong
    _write(root / "bird" / "bird3.png", 2)           # decided bird: correct
    _write(root / "knife7.png", 5)                   # outside a folder: the name gives the category; correct
    _write(root / "misc" / "thing.png", 0)           # no category: skipped
    a = B.shape_accuracy(_fake_model(), root)
    assert a.kind == "silhouettes" and (a.correct, a.n) == (3, 4) and a.accuracy == pytest.approx(0.75)
    assert a.per_category == {"airplane": (1, 1), "bird": (1, 1), "dog": (0, 1), "knife": (1, 1)}
    assert a.skipped == ["misc/thing.png"]
    assert a.to_dict()["published"] == {"ResNet-50": 0.54, "humans": 0.75}
    assert a.image.size[0] > 300


def test_figure_and_json_of_a_result(conflict_dir, tmp_path):
    r = B.shape_bias(_fake_model(), conflict_dir)
    d = json.loads(json.dumps(r.to_dict()))  # JSON-safe: NaN became null
    assert d["shape_bias"] == pytest.approx(0.75) and d["conflicts"] == 5 and len(d["decisions"]) == 6
    assert {c["category"]: c["shape_bias"] for c in d["per_category"]}["car"] is None
    img = r.to_image()
    assert isinstance(img, Image.Image) and img.size[0] > 300 and img.size[1] > 300
    root = tmp_path / "sil"
    _write(root / "cat" / "cat1.png", 2)
    wide = r.to_image([B.shape_accuracy(_fake_model(), root, kind="silhouettes")])
    assert wide.size[0] > img.size[0]


def test_packaged_mapping_matches_the_shared_data():
    shared = B.find_stimuli("cue-conflict-sample")
    if shared is None:
        pytest.skip("../shared/data is absent (the shipped stimuli are not in this checkout)")
    assert B.load_categories(shared.parent / "imagenet16.json") == CATS
    assert len(CATS) == 16 and sum(map(len, CATS.values())) == len({i for v in CATS.values() for i in v})


# ============================================================================ bad inputs


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(B.StimuliError, match="no such folder"):
        B.shape_bias(_fake_model(), tmp_path / "nowhere")
    with pytest.raises(ConvscopeError, match="no such folder"):
        B.shape_accuracy(_fake_model(), tmp_path / "nowhere")


def test_no_default_data_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(B, "data_roots", lambda: [tmp_path])
    with pytest.raises(B.StimuliError, match=r"--data DIR.*texture-vs-shape"):
        B.shape_bias(_fake_model())


def test_folder_without_valid_names(tmp_path):
    _write(tmp_path / "cat" / "cat1.png", 0)
    _write(tmp_path / "cat" / "cat1-zebra2.png", 0)  # zebra is not a category
    with pytest.raises(B.StimuliError, match=r"SHAPEi-TEXTUREj.*2 other files ignored"):
        B.shape_bias(_fake_model(), tmp_path)
    _write(tmp_path / "zebra" / "zebra1.png", 0)
    with pytest.raises(B.StimuliError, match="no shape-only images"):
        B.shape_accuracy(_fake_model(), tmp_path / "zebra")


def test_ten_class_model_is_refused_and_left_untouched(conflict_dir):
    model = _fake_model(classes=10)
    with untouched(model.module), pytest.raises(B.StimuliError, match="1000 ImageNet-1k classes.*has 10"):
        B.shape_bias(model, conflict_dir)
    assert model.module.calls == 0  # refused before any forward pass
    # labels claim 1000 classes but the network outputs 10: caught at the first batch, model restored
    liar = _fake_model(classes=10, labels=1000)
    with untouched(liar.module), pytest.raises(B.StimuliError, match="has 10 classes"):
        B.shape_bias(liar, conflict_dir)


def test_plain_module_and_bad_mappings(conflict_dir, tmp_path):
    # a plain module is wrapped (cs.as_model) and refused for its 2 classes, not for being a module
    with pytest.raises(B.StimuliError, match="has 2 classes"):
        B.shape_bias(nn.Linear(2, 2), conflict_dir)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(B.StimuliError, match="not a JSON"):
        B.shape_bias(_fake_model(), conflict_dir, categories=tmp_path / "bad.json")
    with pytest.raises(B.StimuliError, match="outside 0..999"):
        B.load_categories({"cat": [281], "dog": [1000]})
    with pytest.raises(B.StimuliError, match="non-empty"):
        B.load_categories({"cat": [281], "dog": []})
    with pytest.raises(cs.ConvscopeError, match="'batch_size' must be an int in 1..4096"):  # the declared bound
        B.shape_bias(_fake_model(), conflict_dir, batch_size=0)


# ============================================================================ the built-in model on the sample


@pytest.fixture(scope="module")
def sample_dir() -> Path:
    found = B.find_stimuli("cue-conflict-sample")
    if found is None:
        pytest.skip("../shared/data/cue-conflict-sample is absent (CI has it; a fresh clone alone does not)")
    return found


@pytest.fixture(scope="module")
def sample_bias(builtin, sample_dir) -> B.ShapeBias:
    before = snapshot(builtin.module)
    r = B.shape_bias(builtin, sample_dir, progress=False)
    assert_untouched(builtin.module, before)
    return r


def test_builtin_shape_bias_on_the_sample(sample_bias, builtin, sample_dir, record_property):
    r = sample_bias
    assert r.total == 80 and len(r.decisions) == 80 and not r.skipped and not r.interrupted
    assert r.excluded == 1 and r.conflicts == 79  # car4-car2.png is the only same-category image
    assert r.shape + r.texture + r.neither == r.conflicts == sum(c.n for c in r.per_category) == int(r.confusion.sum())
    assert 0 <= r.shape_bias <= 1 and r.shape_bias == pytest.approx(r.shape / (r.shape + r.texture))
    assert r.shape_fraction + r.texture_fraction + r.neither_fraction == pytest.approx(1)
    # an ImageNet-trained CNN is texture-biased (published 0.09-0.25 for AlexNet, VGG-16, ResNet-50)
    assert r.shape_bias < 0.5
    # the batched, guarded run gives the same top class as a plain prediction of the whole stimulus
    first = r.decisions[0]
    x = B.stimulus_inputs(builtin, [sample_dir / first.file])
    assert builtin.predict(x, top=1)[0].indices[0] == first.top_class
    assert "no crop" in r.protocol and r.to_dict()["protocol"] == r.protocol
    record_property("builtin_shape_bias", round(r.shape_bias, 4))
    print(f"\n{r}")


# ============================================================================ the command line




def test_cli_json_matches_the_library(capsys, monkeypatch, builtin, sample_bias, sample_dir, tmp_path):
    monkeypatch.setattr(cmd_bias, "load_model_from_args", lambda args: builtin)
    cues, sil = tmp_path / "cues", tmp_path / "silhouettes"
    for cat in ("bicycle", "clock"):  # 10 of the sample's images keep the test fast
        shutil.copytree(sample_dir / cat, cues / cat)
        (sil / cat).mkdir(parents=True)
        shutil.copy(sorted((sample_dir.parent / "silhouettes" / cat).glob("*.png"))[0], sil / cat)
    plot = tmp_path / "plot.png"
    code, out, err = _run(capsys, "bias", "--data", str(cues), "--silhouettes", str(sil), "--json", "--no-progress",
                          "-o", str(plot))
    assert code == 0, err
    data = json.loads(out)
    sb = data["shape_bias"]
    want = {d.file: d for d in sample_bias.decisions if d.shape in ("bicycle", "clock")}
    assert {d["file"]: d["decision"] for d in sb["decisions"]} == {f: d.decision for f, d in want.items()}
    shape = sum(d.outcome == "shape" for d in want.values())
    texture = sum(d.outcome == "texture" for d in want.values())
    assert (sb["shape"], sb["texture"], sb["conflicts"], sb["excluded"]) == (shape, texture, 10, 0)
    assert sb["shape_bias"] == pytest.approx(shape / (shape + texture))
    assert [s["kind"] for s in data["shape_only"]] == ["silhouettes"] and data["shape_only"][0]["n"] == 2
    assert Image.open(plot).size[0] > 500 and "plot written" in err


def test_cli_table_and_errors(capsys, monkeypatch, conflict_dir, tmp_path):
    monkeypatch.setattr(cmd_bias, "load_model_from_args", lambda args: _fake_model())
    code, out, _ = _run(capsys, "bias", "--data", str(conflict_dir), "--no-progress")
    assert code == 0
    assert "shape bias  0.750" in out and "5 cue conflicts, 1 with the same" in out
    assert "silhouettes" not in out  # an explicit --data does not pull in the shipped shape-only sets
    assert "stimuli: whole stimulus resized to 8x8, no crop" in out
    code, out, _ = _run(capsys, "bias", "--data", str(conflict_dir), "--no-progress", "--crop")
    assert code == 0 and "stimuli: model preprocessing" in out and "centre crop 8x8" in out
    code, _, err = _run(capsys, "bias", "--data", str(tmp_path / "nowhere"))
    assert code == 2 and err.count("\n") == 1 and "no such folder" in err
    code, _, err = _run(capsys, "bias", "--data", str(conflict_dir), "-o", str(tmp_path / "plot.txt"))
    assert code == 2 and "unsupported output type" in err


def test_every_readable_suffix_is_a_stimulus(conflict_dir):
    """bias lists images with convscope.images.list_images, like topk: .tif and .gif count too."""
    shutil.copy(conflict_dir / "cat" / "cat1-bird1.png", conflict_dir / "cat" / "cat2-bird1.tif")
    Image.open(conflict_dir / "cat" / "cat1-bird1.png").save(conflict_dir / "cat" / "cat3-bird1.gif")
    r = B.shape_bias(_fake_model(), conflict_dir, progress=False)
    files = [d.file for d in r.decisions]
    assert "cat/cat2-bird1.tif" in files and "cat/cat3-bird1.gif" in files
    assert r.texture == 3  # the two copies of the texture decision count as well


# ============================================================================ the protocol (issue 11)


def test_stimuli_are_fed_whole_by_default_and_cropped_only_on_request(builtin):
    pixels = np.full((224, 224, 3), 128, np.uint8)
    pixels[:8], pixels[-8:], pixels[:, :8], pixels[:, -8:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    stimulus = Image.fromarray(pixels)
    whole = builtin.to_pixels(B.stimulus_inputs(builtin, [stimulus]))[0]
    assert whole.shape == (3, 224, 224)
    assert torch.allclose(whole[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)  # the red border is kept
    assert torch.allclose(whole[:, 112, 112], torch.full((3,), 128 / 255), atol=1e-3)
    cropped = builtin.to_pixels(B.stimulus_inputs(builtin, [stimulus], crop=True))[0]
    # the model's preprocessing (256 then centre 224) zooms by 8/7 and cuts the 9 px border off
    assert (cropped[0, 0, :] - cropped[1, 0, :]).abs().max() < 0.05
    assert torch.equal(B.stimulus_inputs(builtin, [stimulus], crop=True), builtin.preprocess(stimulus))


def test_result_says_which_protocol(conflict_dir):
    model = _fake_model()
    default = B.shape_bias(model, conflict_dir, progress=False)
    cropped = B.shape_bias(model, conflict_dir, progress=False, crop=True)
    assert "no crop" in default.protocol and "model-vs-human" in default.protocol and "no crop" in str(default)
    assert "centre crop" in cropped.protocol and cropped.to_dict()["protocol"] == cropped.protocol


# ============================================================================ the engine: same inputs, resumable, unreadable stimuli (issue 9)


def _noise_files(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate(sizes):
        f = root / f"img{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(f)
        files.append(f)
    return files


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_engine_inputs_equal_stimulus_inputs_exactly(tmp_path, interpolation):
    """The engine's whole-stimulus decode (Preprocessing kind="whole") and its model preprocessing (crop=True) give
    bit for bit the tensors of stimulus_inputs, on pictures that need resizing and with a non-trivial mean/std."""
    from convscope.dataset.engine import MODEL_PREPROCESSING, Loader, Preprocessing

    model = cs.Model(Lookup(_table()), input_size=(8, 10), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25),
                     labels=[f"c{i}" for i in range(1000)], interpolation=interpolation, resize_size=11)
    files = _noise_files(tmp_path, [(13, 9), (8, 10), (30, 17), (10, 8)])
    source = B._Stimuli(tmp_path, files)
    for crop, prep in ((False, Preprocessing(kind="whole")), (True, MODEL_PREPROCESSING)):
        batch = next(iter(Loader(model, source, 4, preprocessing=prep, workers=2)))
        assert torch.equal(batch.x, B.stimulus_inputs(model, files, crop=crop)), crop
    assert B._preprocessing(False) == Preprocessing(kind="whole") and B._preprocessing(True) == MODEL_PREPROCESSING


def test_category_scores_reducer_merges_in_input_order(conflict_dir):
    from convscope.dataset.engine import Forward

    reducer = B.CategoryScores(CATS)
    logits = _table()[:4] + 3.0
    parts = [reducer.step(None, Forward(x=torch.zeros(2, 3, 8, 8), index=torch.tensor([2 * i, 2 * i + 1]), activations={},
                                        inputs={}, output=logits[2 * i:2 * i + 2])) for i in range(2)]
    whole = reducer.step(None, Forward(x=torch.zeros(4, 3, 8, 8), index=torch.arange(4), activations={}, inputs={},
                                       output=logits))
    merged = reducer.merge_states(parts[0], parts[1])
    assert all(torch.equal(merged[k], whole[k]) for k in ("scores", "top", "index"))
    assert parts[0]["index"].tolist() == [0, 1]  # the states it was given are left as they were
    with pytest.raises(B.StimuliError, match="has 10 classes"):
        reducer.step(None, Forward(x=torch.zeros(1, 3, 8, 8), index=torch.tensor([0]), activations={}, inputs={},
                                   output=torch.zeros(1, 10)))


def test_interrupt_then_resume_equals_one_run(conflict_dir, tmp_path):
    once = B.shape_bias(_fake_model(), conflict_dir, batch_size=2, progress=False)
    state = tmp_path / "bias.state"
    seen: list[int] = []

    def stop_after_one_batch(done, total):
        seen.append(done)
        raise KeyboardInterrupt

    part = B.shape_bias(_fake_model(), conflict_dir, batch_size=2, state=state, save_every=100, progress=stop_after_one_batch)
    assert part.interrupted and part.processed == 2 and len(part.decisions) == 2 and not part.complete
    assert "interrupted after 2 of 6" in str(part)
    model = _fake_model()
    resumed_from: list[int] = []
    rest = B.shape_bias(model, conflict_dir, batch_size=2, state=state, progress=lambda d, t: resumed_from.append(d))
    assert resumed_from == [4, 6] and model.module.calls == 2  # continued after the 2 done, not from the start
    assert rest.complete and not rest.interrupted and rest.processed == 6
    assert [d.file for d in rest.decisions] == [d.file for d in once.decisions]
    assert [(d.decision, d.top_class) for d in rest.decisions] == [(d.decision, d.top_class) for d in once.decisions]
    assert torch.equal(rest.scores, once.scores) and torch.equal(rest.confusion, once.confusion)
    assert rest.shape_bias == once.shape_bias
    again_model = _fake_model()
    again = B.shape_bias(again_model, conflict_dir, batch_size=2, state=state, progress=False)
    assert again_model.module.calls == 0 and torch.equal(again.scores, once.scores)  # complete: read back, no pass


def test_resume_with_other_inputs_or_options_is_refused(conflict_dir, tmp_path):
    state = tmp_path / "bias.state"
    B.shape_bias(_fake_model(), conflict_dir, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="preprocessing kind 'whole', this run asks for 'model'"):
        B.shape_bias(_fake_model(), conflict_dir, state=state, crop=True, progress=False)
    other = {**CATS, "dog": [152]}
    with pytest.raises(StateMismatchError, match="sets cue-conflict categories dog"):
        B.shape_bias(_fake_model(), conflict_dir, state=state, categories=other, progress=False)
    changed = _fake_model()
    with torch.no_grad():
        changed.module.scale.weight.add_(1)
    with pytest.raises(StateMismatchError, match="different model"):
        B.shape_bias(changed, conflict_dir, state=state, progress=False)
    _write(conflict_dir / "bird" / "bird1-cat1.png", 2)
    with pytest.raises(StateMismatchError, match="6 inputs then, 7 now; input 2 was 'cue-conflict/car/car4-car2.png', "
                       "is now 'cue-conflict/bird/bird1-cat1.png'"):
        B.shape_bias(_fake_model(), conflict_dir, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="a shape bias state, not a shape accuracy state"):
        B.shape_accuracy(_fake_model(), conflict_dir, kind="x", state=state, progress=False)


def test_unreadable_stimuli_are_skipped_and_listed(conflict_dir, tmp_path):
    (conflict_dir / "cat" / "cat2-bird1.png").write_bytes(b"not a png")
    with pytest.warns(SkippedImagesWarning, match="skipped 1 unreadable"):
        r = B.shape_bias(_fake_model(), conflict_dir, batch_size=4, progress=False)
    assert r.total == 7 and r.processed == 7 and len(r.decisions) == 6 and r.complete
    assert [f for f, _ in r.unreadable] == ["cat/cat2-bird1.png"] and "cat2-bird1.png" in r.unreadable[0][1]
    assert "cat/cat2-bird1.png" not in [d.file for d in r.decisions] and r.shape_bias == pytest.approx(3 / 4)
    assert r.to_dict()["unreadable"] == [{"file": "cat/cat2-bird1.png", "reason": r.unreadable[0][1]}]
    assert "1 unreadable left out" in str(r)
    broken = tmp_path / "broken"
    for name in ("cat/cat1-dog1.png", "dog/dog1-cat1.png"):
        (broken / name).parent.mkdir(parents=True)
        (broken / name).write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        with pytest.raises(UnreadableImagesError, match="none of the 2 image"):
            B.shape_accuracy(_fake_model(), broken)


def test_one_state_for_every_set_of_the_command(conflict_dir, tmp_path, monkeypatch, capsys):
    sil = tmp_path / "silhouettes"
    _write(sil / "airplane" / "airplane1.png", 0)
    _write(sil / "bird" / "bird3.png", 2)
    (sil / "dog").mkdir()
    (sil / "dog" / "dog1.png").write_bytes(b"broken")
    state = tmp_path / "cli.state"
    models = []

    def fake(args):
        models.append(_fake_model())
        if len(models) == 1:
            models[0].module.interrupt_at = 3  # Ctrl-C in the cue conflicts' third batch
        return models[-1]

    monkeypatch.setattr(cmd_bias, "load_model_from_args", fake)
    argv = ["bias", "--data", str(conflict_dir), "--silhouettes", str(sil), "--no-progress", "--batch-size", "2",
            "--state", str(state), "--json"]
    code, out, err = _run(capsys, *argv)
    assert code == 130 and "run the same command again to continue" in err
    assert json.loads(out)["shape_bias"]["processed"] == 4 and json.loads(out)["shape_only"] == []
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert models[1].module.calls == 1 + 1  # the last cue-conflict batch, then the silhouettes' readable batch
    assert "silhouettes: skipped 1 unreadable image(s)" in err and "dog1.png" in err
    data = json.loads(out)
    plain = B.shape_bias(_fake_model(), conflict_dir, progress=False)
    assert [d["decision"] for d in data["shape_bias"]["decisions"]] == [d.decision for d in plain.decisions]
    assert data["shape_only"][0]["n"] == 2 and data["shape_only"][0]["unreadable"][0]["file"] == "dog/dog1.png"
    code, out2, _ = _run(capsys, *argv)
    assert code == 0 and models[2].module.calls == 0 and json.loads(out2)["shape_bias"] == data["shape_bias"]
    code, _, err = _run(capsys, *argv, "--crop")
    assert code == 2 and err.count("\n") == 1 and "preprocessing" in err
    code, _, err = _run(capsys, *[a for a in argv if a not in ("--silhouettes", str(sil))])
    assert code == 2 and "'sets'" not in err and "inputs" in err  # a set less: other inputs
    store = B.stimuli_state(state, _fake_model(), data=conflict_dir, shape_only=[("silhouettes", sil)])
    with pytest.raises(StateMismatchError, match="it holds the sets cue-conflict, shape-only:silhouettes, not 'shape-only:edges'"):
        B.shape_accuracy(_fake_model(), sil, kind="edges", state=store)
