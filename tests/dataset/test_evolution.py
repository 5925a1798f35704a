"""Evolution over training: CKA against the explicit HSIC formula, drift and CKA on a real tiny training run,
permuted filters (cosine low, CKA 1), architecture checks, models untouched and freed, the CLI; resumable runs
(Ctrl-C between or inside checkpoints, then the same call equals one run), refused resumes, unreadable probe images."""

from __future__ import annotations

import gc
import json
import os
import warnings
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
import statecheck
from convscope.cli.main import main
from convscope.dataset.evolution import (
    EvolutionError,
    centered_gram,
    checkpoint_identity,
    evolution,
    gram_cka,
    linear_cka,
)
from convscope.dataset.folder import SkippedImagesWarning, StateMismatchError, UnreadableImagesError

SIZE = 32
STEPS = (0, 5, 20, 60)


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 5, padding=2), relu1=nn.ReLU(inplace=True), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(8, 16, 3, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 3),
    ))


def shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of 3 classes: a red square, a green disc, a blue horizontal bar, at random places, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.15 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for i in range(n):
        cy, cx = (torch.randint(8, SIZE - 8, (2,), generator=g)).tolist()
        if y[i] == 0:
            mask = ((yy - cy).abs() <= 5) & ((xx - cx).abs() <= 5)
        elif y[i] == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        else:
            mask = ((yy - cy).abs() <= 2) & ((xx - cx).abs() <= 8)
        x[i, int(y[i]), mask] += 2.0
    return x, y


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny CNN trained by SGD for 60 steps; state_dicts saved after steps 0, 5, 20 and 60."""
    torch.manual_seed(0)
    net = tiny_cnn()
    x, y = shapes(96, seed=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # with momentum 0.9, lr 0.05 the run has a transient dip in CKA
    folder = tmp_path_factory.mktemp("ckpt")
    states, paths = [], []
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            states.append(state)
            paths.append(folder / f"step{step:03d}.pt")
            torch.save(state, paths[-1])
        if step == STEPS[-1]:
            break
        idx = torch.randint(0, len(x), (24,))
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe, probe_y = shapes(48, seed=2)
    return {"states": states, "paths": paths, "probe": probe, "probe_y": probe_y}


def modules_of(states: list[dict]) -> list[nn.Module]:
    out = []
    for s in states:
        m = tiny_cnn()
        m.load_state_dict(s)
        out.append(m)
    return out


# ============================================================================ CKA itself


def hsic_reference(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hsic_reference(k, l) / np.sqrt(hsic_reference(k, k) * hsic_reference(l, l))


def test_linear_cka_equals_explicit_hsic_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 7))
    y = x @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(20, 5))
    ours = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
    assert ours == pytest.approx(cka_reference(x, y), abs=1e-10)
    assert 0.0 < ours < 1.0
    z = rng.normal(size=(20, 30))
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(z)) == pytest.approx(cka_reference(x, z), abs=1e-10)


def test_cka_is_one_for_identical_and_invariant_to_rotation_and_scale():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(16, 6)))
    y = torch.from_numpy(rng.normal(size=(16, 6)))
    q, _ = torch.linalg.qr(torch.from_numpy(rng.normal(size=(6, 6))))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert base < 0.9
    assert linear_cka(x @ q * 3.0, y) == pytest.approx(base, abs=1e-12)
    # not invariant to a general (non-orthogonal) linear map
    a = torch.from_numpy(np.diag([10.0, 1, 1, 1, 1, 0.1]))
    assert abs(linear_cka(x @ a, y) - base) > 1e-3
    # the kernel form used by the streaming run gives the same number
    assert gram_cka(centered_gram(x), centered_gram(y)) == pytest.approx(base, abs=1e-12)


def test_cka_needs_two_inputs_and_same_rows():
    with pytest.raises(EvolutionError, match="same inputs"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(EvolutionError, match="at least 2"):
        linear_cka(torch.ones(1, 2), torch.ones(1, 2))


# ============================================================================ a real training run


def test_training_run_drift_cka_and_agreement(run):
    mods = modules_of(run["states"])
    ev = evolution(mods, run["probe"], labels=[f"step {s}" for s in STEPS], batch_size=16, progress=False)
    assert ev.layers == ["conv1", "conv2"]
    assert ev.images == 48 and all(ev.done) and not ev.interrupted
    final = len(STEPS) - 1
    # the final checkpoint: no drift from itself, CKA 1, every filter cosine 1, agreement 1
    assert torch.all(ev.drift_final[final] == 0)
    assert torch.allclose(ev.cka[final], torch.ones(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(ev.filter_cosine[final], torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert float(ev.agreement[final]) == 1.0
    # drift from previous is undefined at the first checkpoint, positive afterwards
    assert torch.isnan(ev.drift_previous[0]).all() and (ev.drift_previous[1:] > 0).all()
    # in this run CKA to final rises monotonically along training, and drift to final falls
    cka = ev.cka.numpy()
    assert np.all(np.diff(cka, axis=0) >= -1e-9), cka
    assert np.all(np.diff(ev.drift_final.numpy(), axis=0) < 0)
    assert np.all(np.diff(ev.filter_cosine.numpy(), axis=0) > 0)
    assert cka[0].max() < 0.99
    # the trained network learned the task: accuracy rises to the end
    ev2 = evolution(mods, run["probe"], targets=run["probe_y"], layers=["conv2"], progress=False)
    assert ev2.accuracy is not None and float(ev2.accuracy[-1]) > float(ev2.accuracy[0])
    assert float(ev2.accuracy[-1]) >= 0.9
    data = json.loads(json.dumps(ev.to_dict()))
    assert data["drift_previous"][0] == [None, None] and data["cka"][-1] == pytest.approx([1.0, 1.0])


def test_files_load_through_load_model_one_at_a_time(run, tmp_path, monkeypatch):
    """resnet18 (random weights) state_dicts saved twice with a perturbation, loaded by path; each model is
    freed before the next one loads."""
    torch.manual_seed(0)
    net = cs.load_model("resnet18", weights=None, num_classes=5, device="cpu").module
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(net.state_dict(), a)
    w_a = net.conv1.weight.detach().clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(net.state_dict(), b)
    w_b = net.conv1.weight.detach().clone()
    alive: list[weakref.ref] = []
    real = cs.load_model

    def tracking(*args, **kwargs):
        gc.collect()
        assert all(r() is None for r in alive), "a checkpoint model is still alive while the next one loads"
        m = real(*args, **kwargs)
        alive.append(weakref.ref(m.module))
        return m

    monkeypatch.setattr(cs.models, "load_model", tracking)
    probe = torch.randn(4, 3, 64, 64)
    ev = evolution([a, b], probe, arch="resnet18", num_classes=5, layers=["conv1", "layer4.1.conv2"], device="cpu",
                   progress=False)
    assert len(alive) == 2
    gc.collect()
    assert all(r() is None for r in alive)
    assert ev.checkpoints == ["a.pt", "b.pt"]
    expected = float((w_a.double() - w_b.double()).norm() / w_b.double().norm())
    assert float(ev.drift_final[0, 0]) == pytest.approx(expected, rel=1e-6) and float(ev.drift_final[1, 0]) == 0.0
    assert float(ev.drift_previous[1, 0]) == pytest.approx(float((w_b.double() - w_a.double()).norm() / w_a.double().norm()),
                                                           rel=1e-6)
    assert float(ev.drift_previous[1, 0]) > 0 and float(ev.cka[1, 1]) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(cs.ModelLoadError, match="arch"):
        evolution([a, b], probe, progress=False)


def test_permuted_filters_low_cosine_but_cka_one(run):
    """Permuting conv1's filters (and conv2's inputs to match) keeps the function: CKA stays 1, cosines drop."""
    final = modules_of(run["states"][-1:])[0]
    perm = torch.roll(torch.arange(8), 3)
    permuted = tiny_cnn()
    state = {k: v.clone() for k, v in final.state_dict().items()}
    state["conv1.weight"], state["conv1.bias"] = state["conv1.weight"][perm], state["conv1.bias"][perm]
    state["conv2.weight"] = state["conv2.weight"][:, perm]
    permuted.load_state_dict(state)
    x = run["probe"]
    assert torch.allclose(permuted(x), final(x), atol=1e-5)
    ev = evolution([permuted, final], x, progress=False)
    assert torch.allclose(ev.cka[0], torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert float(ev.filter_cosine[0, 0]) < 0.5 and float(ev.filter_cosine[0, 1]) < 0.5
    assert float(ev.drift_final[0, 0]) > 0.5
    assert float(ev.agreement[0]) == 1.0


def test_mismatched_architectures_are_refused(run):
    wide = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 12, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(12, 16, 3, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 3)))
    final = modules_of(run["states"][-1:])[0]
    with pytest.raises(EvolutionError, match=r"conv1.weight has shape \(12, 3, 5, 5\), expected \(8, 3, 5, 5\)"):
        evolution([wide, final], run["probe"], progress=False)
    with pytest.raises(EvolutionError, match="at least two"):
        evolution([final], run["probe"], progress=False)
    with pytest.raises(EvolutionError, match="a file path, a convscope Model or an nn.Module"):
        evolution([42, final], run["probe"], progress=False)
    with pytest.raises(cs.LayerNotFoundError):
        evolution([final, final], run["probe"], layers=["conv9"], progress=False)


def test_models_untouched_and_features_options(run):
    mods = modules_of(run["states"])
    mods[1].train()
    mods[2].conv1.weight.grad = torch.ones_like(mods[2].conv1.weight)
    snaps = [statecheck.snapshot(m) for m in mods]
    wrapped = cs.load_model(mods[0], input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3, labels=["r", "g", "b"],
                            device="cpu")
    snaps[0] = statecheck.snapshot(mods[0])
    ev = evolution([wrapped] + mods[1:], [cs.sample_image("coffee"), cs.sample_image("chelsea"), "sample:rocket"],
                   features="spatial", grid=2, progress=False)
    for m, s in zip(mods, snaps):
        statecheck.assert_untouched(m, s)
    assert ev.images == 3 and ev.features == "spatial"
    assert ev.cka[-1, 0] == pytest.approx(1.0, abs=1e-9)
    # pictures: one row per checkpoint of the same filters; curves over checkpoints
    pic = ev.filters_image("conv1", max_filters=4)
    assert pic.size[0] > 4 * 24 and pic.size[1] > 4 * 24
    deep = ev.filters_image("conv2", max_filters=5)
    assert deep.size[0] > 5 * 24
    curves = ev.curves_image()
    assert curves.size[0] > 600
    with pytest.raises(EvolutionError, match="features"):
        evolution(mods, run["probe"], features="full", progress=False)


def test_cli_json(run, tmp_path, capsys):
    out, filt = tmp_path / "curves.png", tmp_path / "filters.png"
    code = main(["evolution", *map(str, run["paths"]), "--arch", "resnet18", "--json", "-o", str(out), "--no-progress"])
    assert code == 2  # tiny CNN weights do not fit resnet18: one line, exit 2
    assert "do not fit resnet18" in capsys.readouterr().err
    torch.manual_seed(0)
    net = cs.load_model("resnet18", weights=None, num_classes=3, device="cpu").module
    paths = []
    for i in range(3):
        with torch.no_grad():
            net.fc.weight.add_(0.1 * torch.randn_like(net.fc.weight))
            net.conv1.weight.mul_(1.1)
        paths.append(tmp_path / f"r{i}.pt")
        torch.save(net.state_dict(), paths[-1])
    code = main(["evolution", *map(str, paths), "--arch", "resnet18", "--num-classes", "3", "--images",
                 "sample:chelsea", "--images", "sample:coffee", "--images", "sample:rocket", "--layers", "conv1,layer1.0.conv1", "--json",
                 "-o", str(out), "--filters-out", str(filt), "--no-progress", "--device", "cpu"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoints"] == ["r0.pt", "r1.pt", "r2.pt"] and data["layers"] == ["conv1", "layer1.0.conv1"]
    assert data["images"] == 3 and data["drift_final"][2] == [0.0, 0.0]
    assert data["drift_previous"][1][0] == pytest.approx(0.1, rel=1e-4)  # conv1 scaled by 1.1: drift 0.1
    assert data["drift_previous"][1][1] == 0.0 and data["filter_cosine"][0][0] == pytest.approx(1.0, abs=1e-6)
    assert data["cka"][0][0] == pytest.approx(1.0, abs=1e-6)  # isotropic scaling: CKA 1 at conv1
    assert out.exists() and filt.exists()
    code = main(["evolution", str(paths[0]), str(tmp_path / "missing.pt"), "--arch", "resnet18"])
    assert code == 2


def test_ctrl_c_keeps_the_checkpoints_done(run):
    mods = modules_of(run["states"])

    def stop_after_three(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    ev = evolution(mods, run["probe"], progress=stop_after_three)
    # the final checkpoint goes first, then training order: steps 0 and 5 are done, step 20 is not
    assert ev.interrupted and ev.done == [True, True, False, True]
    assert torch.isnan(ev.cka[2]).all() and not torch.isnan(ev.cka[:2]).any()
    full = evolution(mods, run["probe"], progress=False)
    assert torch.allclose(ev.cka[:2], full.cka[:2]) and torch.allclose(ev.drift_previous[1], full.drift_previous[1])
    assert ev.filters_image("conv1").size[1] < full.filters_image("conv1").size[1]  # rows only for those done

    def ctrl_c(*_args) -> None:
        raise KeyboardInterrupt

    before = statecheck.snapshot(mods[-1])
    handle = mods[-1].conv2.register_forward_pre_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):  # nothing to keep before the final checkpoint is measured
            evolution(mods, run["probe"], progress=False)
    finally:
        handle.remove()
    statecheck.assert_untouched(mods[-1], before)


# ============================================================================ resumable, on the dataset engine (issue 9)


def assert_same_evolution(a, b) -> None:
    """Every number of two Evolution results equal (NaN where NaN), kernels and cosines included."""
    def same(x, y):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)

    assert a.checkpoints == b.checkpoints and a.layers == b.layers and a.done == b.done and a.images == b.images
    for name in ("drift_previous", "drift_final", "filter_cosine", "cka", "cka_previous"):
        same(getattr(a, name), getattr(b, name))
    for name in ("agreement", "accuracy"):
        assert (getattr(a, name) is None) == (getattr(b, name) is None), name
        if getattr(a, name) is not None:
            same(getattr(a, name), getattr(b, name))
    assert a.kernels.keys() == b.kernels.keys() and a.strongest.keys() == b.strongest.keys()
    for n in a.kernels:
        same(a.kernels[n], b.kernels[n])
        assert (a.strongest[n] is None and b.strongest[n] is None) or torch.equal(a.strongest[n], b.strongest[n])
    assert [sorted(c) for c in a.filter_cosines] == [sorted(c) for c in b.filter_cosines]
    for ca, cb in zip(a.filter_cosines, b.filter_cosines):
        for n in ca:
            same(ca[n], cb[n])
    assert a.skipped == b.skipped


def counting(mods: list[nn.Module]) -> list[int]:
    """Forward calls per module, counted by a hook (removed with the modules)."""
    calls = [0] * len(mods)
    for i, m in enumerate(mods):
        m.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_interrupt_then_resume_equals_one_run(run, tmp_path):
    mods = modules_of(run["states"])
    probe, targets = run["probe"][:12], run["probe_y"][:12]
    once = evolution(mods, probe, targets=targets, batch_size=5, progress=False)
    state = tmp_path / "evo.state"

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    part = evolution(mods, probe, targets=targets, batch_size=5, state=state, progress=stop_after_two)
    assert part.interrupted and part.done == [True, False, False, True] and part.resumed == 0
    calls = counting(mods)
    reports: list[int] = []
    rest = evolution(mods, probe, targets=targets, batch_size=5, state=state, progress=lambda d, t: reports.append(d))
    assert rest.resumed == 2 and reports == [3, 4] and not rest.interrupted
    assert calls[0] == 0 and calls[3] == 0 and calls[1] > 0 and calls[2] > 0  # the checkpoints done are not run again
    assert_same_evolution(rest, once)
    before = list(calls)
    again = evolution(mods, probe, targets=targets, batch_size=5, state=state, progress=lambda d, t: reports.append(-1))
    assert -1 not in reports and again.resumed == 4 and calls == before  # complete: read back, nothing run
    assert_same_evolution(again, once)
    manifest = json.loads((tmp_path / "evo.state.json").read_text())
    assert manifest["stages"]["evolution"]["complete"] and manifest["fingerprint"]["checkpoint_count"] == 4


def test_ctrl_c_inside_a_probe_pass_then_resume(run, tmp_path):
    """Ctrl-C in the middle of a checkpoint's probe pass: that checkpoint is not kept, and the resume measures it."""
    mods = modules_of(run["states"])
    probe = run["probe"][:10]
    once = evolution(mods, probe, layers=["conv2", "relu2"], features="spatial", grid=2, batch_size=4, progress=False)
    state = tmp_path / "evo.state"
    seen = [0]

    def ctrl_c_at_second_batch(*_args) -> None:
        seen[0] += 1
        if seen[0] == 2:
            raise KeyboardInterrupt

    handle = mods[1].conv1.register_forward_pre_hook(ctrl_c_at_second_batch)
    part = evolution(mods, probe, layers=["conv2", "relu2"], features="spatial", grid=2, batch_size=4, state=state,
                     progress=False)
    handle.remove()
    assert part.interrupted and part.done == [True, False, False, True]
    rest = evolution(mods, probe, layers=["conv2", "relu2"], features="spatial", grid=2, batch_size=4, state=state,
                     progress=False)
    assert rest.resumed == 2 and "relu2" not in rest.kernels  # relu2: CKA only
    assert_same_evolution(rest, once)


def test_resume_with_other_checkpoints_or_options_is_refused(run, tmp_path):
    mods = modules_of(run["states"][:3])
    probe = run["probe"][:6]
    state = tmp_path / "evo.state"
    evolution(mods, probe, layers=["conv1"], state=state, progress=False)
    with pytest.raises(StateMismatchError, match="features 'pooled', this run asks for 'spatial'"):
        evolution(mods, probe, layers=["conv1"], features="spatial", state=state, progress=False)
    with pytest.raises(StateMismatchError, match="layers"):
        evolution(mods, probe, layers=["conv2"], state=state, progress=False)
    with pytest.raises(StateMismatchError, match="max_images 256, this run asks for 100"):
        evolution(mods, probe, layers=["conv1"], max_images=100, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="different list of inputs"):
        evolution(mods, probe + 1, layers=["conv1"], state=state, progress=False)  # the same count, other values
    with pytest.raises(StateMismatchError, match="checkpoints #1 module abs_sum"):
        evolution([mods[0], mods[2], mods[2]], probe, layers=["conv1"], state=state, progress=False)
    with pytest.raises(StateMismatchError, match="checkpoint_count 3, this run asks for 4"):
        evolution(modules_of(run["states"]), probe, layers=["conv1"], state=state, progress=False)
    with pytest.raises(StateMismatchError, match="targets"):
        evolution(mods, probe, layers=["conv1"], targets=[0] * 6, state=state, progress=False)
    same = evolution(mods, probe, layers=["conv1"], labels=["a", "b", "c"], state=state, progress=False)
    assert same.resumed == 3 and same.checkpoints == ["a", "b", "c"]  # names are not part of the run's identity


def test_checkpoint_files_are_known_by_path_size_and_time(tmp_path):
    f = tmp_path / "a.pt"
    torch.save({"w": torch.zeros(3)}, f)
    first = checkpoint_identity(f)
    assert first["file"] == str(f.resolve()) and first["size"] == f.stat().st_size
    assert checkpoint_identity(str(f)) == first
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert checkpoint_identity(f) != first
    m = tiny_cnn()
    assert checkpoint_identity(m) == checkpoint_identity(cs.as_model(m)) == {"module": cs.models.model_fingerprint(m)}


def test_unreadable_probe_images_are_skipped_and_listed(run, tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "p1.png").write_bytes(b"broken")
    mods = [cs.load_model(m, input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu") for m in modules_of(run["states"][-2:])]
    with pytest.warns(SkippedImagesWarning) as caught:
        ev = evolution(mods, paths, progress=False)
    assert len([w for w in caught if issubclass(w.category, SkippedImagesWarning)]) == 1  # once, not per checkpoint
    assert ev.images == 3 and [p for p, _ in ev.skipped] == [1] and "p1.png" in ev.skipped[0][1]
    assert ev.to_dict()["skipped"][0]["position"] == 1 and all(ev.done)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        assert evolution(mods, paths, max_images=3, progress=False).images == 2  # the probe set: the first 3 inputs
        with pytest.raises(EvolutionError, match="at least 2 readable probe images, got 1"):
            evolution(mods, paths, max_images=2, progress=False)
    for p in paths:
        p.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        with pytest.raises(UnreadableImagesError):
            evolution(mods, paths, progress=False)


def test_cli_state_resumes(run, tmp_path, capsys, monkeypatch):
    """The CLI with --state: a Ctrl-C in the third checkpoint's pass exits 130; the same command continues and prints
    what one uninterrupted run prints."""
    folder = tmp_path / "probe"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    loads: list[str] = []
    interrupt = {"at": "step020.pt"}

    def fake_load(path, **_kw):  # tiny CNN state_dicts, with the CLI's loading replaced
        loads.append(os.path.basename(path))
        m = tiny_cnn()
        m.load_state_dict(torch.load(path, weights_only=True))
        if interrupt["at"] == os.path.basename(path):
            m.conv1.register_forward_pre_hook(lambda *_a: (_ for _ in ()).throw(KeyboardInterrupt()))
        return cs.load_model(m, input_size=SIZE, device="cpu")

    monkeypatch.setattr(cs.models, "load_model", fake_load)
    state = tmp_path / "evo.state"
    argv = ["evolution", *map(str, run["paths"]), "--arch", "tiny", "--images", str(folder), "--json", "--no-progress",
            "-o", str(tmp_path / "curves.png")]
    assert main([*argv, "--state", str(state)]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    assert loads == ["step060.pt", "step000.pt", "step005.pt", "step020.pt"]
    interrupt["at"] = None
    loads.clear()
    assert main([*argv, "--state", str(state)]) == 0
    out, err = capsys.readouterr()
    assert loads == ["step020.pt"] and "(3 read back from" in err
    assert main(argv) == 0  # one uninterrupted run, no state
    plain = json.loads(capsys.readouterr().out)
    resumed = json.loads(out)
    assert resumed.pop("resumed") == 3 and plain.pop("resumed") == 0
    resumed.pop("seconds"), plain.pop("seconds")
    assert resumed == plain
    assert main([*argv, "--state", str(state), "--features", "spatial"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "features 'pooled', this run asks for 'spatial'" in err
