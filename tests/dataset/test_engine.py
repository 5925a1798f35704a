"""The dataset engine: decode pipeline equals the model's preprocessing, reducers share one pass, statistics are
exact, states survive kill -9 mid-write, Ctrl-C keeps committed work, autocast agrees, the model is untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
import statecheck
from convscope.dataset.engine import (
    ChannelStats,
    EngineError,
    Loader,
    StateStore,
    default_workers,
    run,
)
from convscope.dataset.folder import (
    ImageSource,
    SkippedImagesWarning,
    StateMismatchError,
    UnreadableImagesError,
)
from convscope.dataset.topk import TopKReducer, top_activations

SIZE = 20


def tiny_module() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(6, 5, 3, stride=2, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(5, 3),
    ))


@pytest.fixture
def model() -> cs.Model:
    return cs.Model(tiny_module(), input_size=(SIZE, SIZE), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
                    labels=["a", "b", "c"], resize_size=SIZE + 4)


def write_images(root, n: int = 14, classes: tuple[str, ...] = ("cats", "dogs")) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (SIZE + 8 + i % 3, SIZE + 6, 3), dtype=np.uint8)
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_images(root)
    return root


def test_pipeline_equals_model_preprocess_bit_for_bit(model, folder):
    files = sorted(str(p) for p in folder.rglob("*.png"))
    source = ImageSource(files)
    expected = model.preprocess(files)
    for workers in (0, 3):
        got = torch.cat([b.x for b in Loader(model, source, 4, workers=workers)])
        assert torch.equal(got, expected), workers
    assert default_workers() >= 1


def test_class_subfolders_become_labels(model, folder):
    source = ImageSource(folder)
    assert source.class_names == ["cats", "dogs"]
    labels = torch.cat([b.labels for b in Loader(model, source, 5, workers=2)])
    assert labels.tolist() == source.classes and set(labels.tolist()) == {0, 1}


def test_channel_stats_exact_and_shared_pass(model, folder):
    files = sorted(str(p) for p in folder.rglob("*.png"))
    x = model.preprocess(files)
    with torch.no_grad(), cs.Capture(model.module, ["conv2"]) as cap:
        cap.forward(x)
    act = cap.activations["conv2"].double()
    calls = []
    handle = model.module.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        out = run(model, folder, [TopKReducer("conv2", k=3), ChannelStats("conv2")], batch_size=4, progress=False)
    finally:
        handle.remove()
    # 14 images in batches of 4: one forward pass per batch for both reducers (then one 1-image dry run: the
    # layer table, for the receptive fields of the top-k patches)
    assert calls[:4] == [4, 4, 4, 2] and sum(calls[4:]) <= 1
    topk, stats = out.results
    assert torch.equal(topk.indices, top_activations(model, folder, "conv2", k=3, batch_size=5, progress=False).indices)
    flat = act.transpose(0, 1).reshape(act.shape[1], -1)
    assert torch.allclose(stats.mean.double(), flat.mean(1), atol=1e-6)
    assert torch.allclose(stats.std.double(), flat.std(1, unbiased=False), atol=1e-5)
    assert torch.equal(stats.max, flat.amax(1).float())
    assert torch.allclose(stats.sparsity.double(), (flat <= 0).double().mean(1))
    assert torch.allclose(stats.fires.double(), (act.amax(dim=(2, 3)) > 0).double().mean(0))
    assert stats.images == 14 and stats.to_dict()["channels"][0]["channel"] == 0


def test_never_fires(model, folder):
    with torch.no_grad():
        model.module.conv2.bias[2] = -1e3  # channel 2 of relu2 can never be above 0
    stats = run(model, folder, [ChannelStats("relu2")], batch_size=8, progress=False).results[0]
    assert stats.never_fires == [2] and stats.fires[2] == 0 and stats.sparsity[2] == 1


def test_ctrl_c_keeps_committed_batches_and_resumes(model, folder, tmp_path):
    state = tmp_path / "run.state"
    once = run(model, folder, [TopKReducer("conv2", k=3), ChannelStats("conv2")], batch_size=3, progress=False)

    def stop(done, total):
        if done == 9:
            raise KeyboardInterrupt

    part = run(model, folder, [TopKReducer("conv2", k=3), ChannelStats("conv2")], batch_size=3, state=state,
               save_every=100, progress=stop)
    assert part.info.interrupted and part.info.processed == 9
    rest = run(model, folder, [TopKReducer("conv2", k=3), ChannelStats("conv2")], batch_size=3, state=state, progress=False)
    assert rest.info.complete
    assert torch.equal(rest[0].values, once[0].values) and torch.equal(rest[0].indices, once[0].indices)
    for name in ("mean", "std", "max", "sparsity", "fires"):
        assert torch.equal(getattr(rest[1], name), getattr(once[1], name)), name
    with pytest.raises(StateMismatchError, match="stats:conv2"):  # another set of reducers: refused, naming it
        run(model, folder, [TopKReducer("conv2", k=3)], batch_size=3, state=state, progress=False)


def test_model_untouched_when_interrupted(model, folder):
    def stop(done, total):
        raise KeyboardInterrupt

    with statecheck.untouched(model.module):
        out = run(model, folder, [ChannelStats("relu1")], batch_size=4, progress=stop)
    assert out.info.interrupted


def test_unreadable_images_skipped_listed_and_all_unreadable_is_an_error(model, folder, tmp_path):
    (folder / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(SkippedImagesWarning, match="broken.png"):
        out = run(model, folder, [ChannelStats("conv2")], batch_size=4, progress=False)
    assert out.info.scored == 14 and len(out.info.skipped) == 1 and "broken.png" in out.info.skipped[0][1]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.raises(UnreadableImagesError), pytest.warns(SkippedImagesWarning):
        run(model, bad, [ChannelStats("conv2")], progress=False)


def test_torch_dataset_source(model):
    class Pictures(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return Image.new("RGB", (SIZE, SIZE), (40 * i, 10, 200 - 30 * i)), i % 2

    out = run(model, Pictures(), [ChannelStats("conv2")], batch_size=4, progress=False)
    assert out.info.scored == 6 and out.results[0].images == 6


def test_bad_options(model, folder):
    with pytest.raises(EngineError, match="unique"):
        run(model, folder, [ChannelStats("conv2"), ChannelStats("conv2")], progress=False)
    with pytest.raises(EngineError, match="engine"):
        run(model, folder, [ChannelStats("conv2")], engine="spark", progress=False)
    with pytest.raises(EngineError, match="fp16"):
        run(model, folder, [ChannelStats("conv2")], amp="fp16", progress=False)
    with pytest.raises(cs.LayerNotFoundError):
        run(model, folder, [ChannelStats("conv9")], progress=False)


def test_bf16_autocast_topk_sets_agree(model, folder):
    full = top_activations(model, folder, "conv2", k=4, batch_size=8, progress=False)
    raw = top_activations(model, folder, "conv2", k=4, batch_size=8, amp="bf16", rescore=False, progress=False)
    same = sum(len(set(a) & set(b)) for a, b in zip(full.indices.tolist(), raw.indices.tolist()))
    assert same / full.indices.numel() >= 0.75 and raw.values.shape == full.values.shape
    # rescored (the default): autocast finds 3k candidates, float32 ranks them: the float32 answer
    half = top_activations(model, folder, "conv2", k=4, batch_size=8, amp="bf16", progress=False)
    assert torch.equal(half.indices, full.indices) and torch.equal(half.values, full.values)
    assert torch.equal(half.positions, full.positions) and half.k == 4


def test_state_store_refuses_other_formats(model, folder, tmp_path):
    state = tmp_path / "old.state"
    torch.save({"meta": '{"format": "convscope-topk/1"}'}, state)
    with pytest.raises(StateMismatchError, match="format"):
        top_activations(model, folder, "conv2", state=state, progress=False)
    assert StateStore(None, "x", {"what": "x"}).path is None


# ============================================================================ kill -9 in the middle of a save

CHILD = textwrap.dedent("""
    import os, sys, time
    from collections import OrderedDict
    import torch
    from torch import nn
    import convscope as cs
    import convscope.files as files
    from convscope.dataset.topk import top_activations

    folder, state, marker = sys.argv[1:4]
    real = files.atomic_write

    def slow_write(path, write, *a, **k):
        def half_then_wait(tmp):
            write(tmp)
            open(marker, "w").close()   # the temporary file is written, not yet moved into place
            time.sleep(30)              # the parent kills us here
        return real(path, half_then_wait, *a, **k) if os.path.exists(str(path)) and str(path).endswith(".state") else real(path, write, *a, **k)

    files.atomic_write = slow_write
    import convscope.dataset.folder as folder_mod
    folder_mod.atomic_write = slow_write
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 6, 3, padding=1), relu1=nn.ReLU(inplace=True),
                      conv2=nn.Conv2d(6, 5, 3, stride=2, padding=1), relu2=nn.ReLU(),
                      pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(5, 3)))
    model = cs.Model(m, input_size=(20, 20), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), labels=["a", "b", "c"],
                     resize_size=24)
    top_activations(model, folder, "conv2", k=3, batch_size=3, state=state, save_every=1, progress=False)
""")


def test_kill_9_mid_write_leaves_a_loadable_state_and_resume_equals_one_run(model, folder, tmp_path):
    state = tmp_path / "run.state"
    marker = tmp_path / "writing"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    once = top_activations(model, folder, "conv2", k=3, batch_size=3, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(state), str(marker)], env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists():  # the first save is fast (no file yet); the second one waits mid-write
            assert proc.poll() is None, "the child ended before its second save"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the state file is the one before the interrupted save: loadable, one batch done
    store = StateStore(state, "top-k", {"what": "top-k"}, check=False)
    assert store.stages["run"]["processed"] == 3 and not store.stages["run"]["complete"]
    rest = top_activations(model, folder, "conv2", k=3, batch_size=3, state=state, progress=False)
    assert rest.complete
    assert torch.equal(rest.values, once.values) and torch.equal(rest.indices, once.indices)
    assert torch.equal(rest.positions, once.positions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is exercised where one is")
def test_cuda_path_equals_cpu_and_fp16_rescored(model, folder):
    cpu = top_activations(model, folder, "conv2", k=3, batch_size=4, progress=False)
    gpu_model = cs.Model(model.module, input_size=model.input_size, mean=model.mean, std=model.std, labels=model.labels,
                         resize_size=model.resize_size).to("cuda")
    try:
        gpu = top_activations(gpu_model, folder, "conv2", k=3, batch_size=4, progress=False)
        assert torch.allclose(gpu.values, cpu.values, atol=1e-4) and torch.equal(gpu.indices, cpu.indices)
        half = top_activations(gpu_model, folder, "conv2", k=3, batch_size=4, amp="fp16", progress=False)
        assert torch.equal(half.indices, gpu.indices)  # rescored in float32
        stats = run(gpu_model, folder, [ChannelStats("conv2")], batch_size=4, progress=False).results[0]
        assert stats.images == 14
    finally:
        model.module.to("cpu")
