"""Embeddings on the dataset engine: rows written to disk as they come (never all in memory), resumable runs equal
uninterrupted ones, one forward pass shared with top-k and channel statistics, Ray-style partial states."""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.cli import cmd_embed
from convscope.cli.main import main
from convscope.dataset import engine
from convscope.dataset.embed import EmbeddingError, EmbeddingReducer, embed, features_path, predictions_path
from convscope.dataset.folder import SkippedImagesWarning, StateFileError, StateMismatchError
from convscope.dataset.rowfile import RowFile
from convscope.dataset.topk import TopKReducer, top_activations

SIZE = 16
N = 11
BATCH = 3  # 11 images: batches of 3, 3, 3, 2
BROKEN = 5  # the image made unreadable in `broken`


def tiny_model() -> cs.Model:
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(4, 6, 3, stride=2, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3),
    ))
    return cs.Model(m, input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                    labels=["a", "b", "c"], resize_size=SIZE)


@pytest.fixture
def model() -> cs.Model:
    return tiny_model()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        a = np.clip(rng.random(3) * 200 + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / f"img_{i:02d}.png")
    return root


@pytest.fixture
def broken(folder):
    (folder / f"img_{BROKEN:02d}.png").write_bytes(b"\x89PNG not really")
    return folder


def direct(model: cs.Model, paths: list, layer: str = "relu2") -> torch.Tensor:
    with torch.no_grad(), cs.Capture(model.module, [layer]) as cap:
        cap.forward(model.preprocess([str(p) for p in paths]))
    return cap.activations[layer].mean(dim=(2, 3))


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory map holds ``t``'s data (Linux: /proc/self/maps), ``None`` for anonymous memory."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) == 6 else None
    return None


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def forwards(counter: list[int], model: cs.Model):
    """Count the model's forward passes (a pre-hook on the root: passes stopped early count too)."""
    return model.module.register_forward_pre_hook(lambda m, a: counter.append(1))


def same(a, b) -> None:
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.positions, b.positions)
    assert a.sources == b.sources
    for name in ("predictions", "probabilities"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y)


# ============================================================================ resuming


def test_interrupt_then_resume_equals_one_run(model, folder, tmp_path):
    whole = embed(model, folder, batch_size=BATCH, progress=False)
    state = tmp_path / "emb.state"

    def stop_after_two_batches(done, total):
        if done >= 2 * BATCH:
            raise KeyboardInterrupt

    first = embed(model, folder, batch_size=BATCH, state=state, progress=stop_after_two_batches)
    assert first.interrupted and len(first) == 2 * BATCH and first.total == N
    assert torch.equal(first.features, whole.features[: 2 * BATCH])
    assert first.store == os.path.abspath(features_path(state))
    calls: list[int] = []
    hook = forwards(calls, model)
    try:
        second = embed(model, folder, batch_size=BATCH, state=state, progress=False)
    finally:
        hook.remove()
    assert len(calls) == math.ceil((N - 2 * BATCH) / BATCH)  # only the batches left were computed
    assert not second.interrupted
    same(second, whole)
    assert torch.equal(first.features, whole.features[: 2 * BATCH])  # the earlier result still reads its rows
    stored = np.load(features_path(state), mmap_mode="r")  # the features file: row i = image i
    assert stored.shape == (N, 6) and np.array_equal(stored, whole.features.numpy())
    both = np.load(predictions_path(features_path(state)))
    assert np.array_equal(both[:, 0].astype(np.int64), whole.predictions.numpy())
    again = embed(model, folder, batch_size=BATCH, state=state, progress=False)  # complete: read back, no pass
    same(again, whole)


def test_resume_with_other_layer_pool_or_files_refused(model, folder, tmp_path):
    state = tmp_path / "emb.state"
    embed(model, folder, "relu2", batch_size=BATCH, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="pool"):
        embed(model, folder, "relu2", pool="max", batch_size=BATCH, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="relu"):
        embed(model, folder, "relu1", batch_size=BATCH, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="predict"):
        embed(model, folder, "relu2", predict=True, batch_size=BATCH, state=state, progress=False)
    with pytest.raises(StateMismatchError, match="store"):
        embed(model, folder, "relu2", batch_size=BATCH, state=state, store=tmp_path / "other.npy", progress=False)
    # an interrupted state whose features file is gone cannot be resumed: its rows are lost
    cut = tmp_path / "cut.state"

    def stop(done, total):
        raise KeyboardInterrupt

    embed(model, folder, "relu2", batch_size=BATCH, state=cut, progress=stop)
    os.unlink(features_path(cut))
    with pytest.raises(StateFileError, match="missing"):
        embed(model, folder, "relu2", batch_size=BATCH, state=cut, progress=False)
    with pytest.raises(EmbeddingError, match="model"):
        EmbeddingReducer()  # the penultimate features need the model to find its classifier


# ============================================================================ memory


class Recording(EmbeddingReducer):
    """Keeps every state the driver commits (to check their size)."""

    seen: list

    def merge_states(self, a, b):
        out = super().merge_states(a, b)
        self.seen.append(out)
        return out


@linux_only
def test_features_on_disk_and_state_small(model, folder, tmp_path):
    store = tmp_path / "features.npy"
    state = tmp_path / "run.state"
    r = Recording("relu2", store=store)
    r.seen = []
    run = engine.run(model, folder, [r], batch_size=BATCH, state=state, save_every=1, progress=False)
    e = run.results[0]
    torch.testing.assert_close(e.features, direct(model, sorted(folder.glob("*.png"))), rtol=1e-5, atol=1e-6)
    assert mapped_file(e.features) == str(store)  # the result maps the file: the rows are not in the heap
    assert e.store == str(store)
    # every committed state is plain data: the file, the size and the runs of positions done, no rows
    assert len(r.seen) == math.ceil(N / BATCH)
    for s in r.seen:
        assert set(s) == {"store", "dims", "runs"} and s["runs"] == [[0, s["runs"][0][1]]]
    payload = torch.load(state, weights_only=True)
    assert [k for k in payload if isinstance(payload[k], torch.Tensor)] == []  # the saved state holds no tensor
    saved = json.loads(payload["meta"])["stages"]["run"]["states"][r.name]
    assert saved == {"store": str(store), "dims": 6, "runs": [[0, N]]}
    # without a store: a temporary file, deleted once the features are no longer used
    tmp = embed(model, folder, "relu2", batch_size=BATCH, progress=False)
    path = mapped_file(tmp.features)
    assert tmp.store is None and path is not None and os.path.exists(path)
    assert torch.equal(tmp.features, e.features)
    del tmp
    gc.collect()
    assert not os.path.exists(path)


def test_reusing_a_store_never_cuts_an_earlier_result(model, folder, tmp_path):
    """A file is never truncated under a live memory map (reading it would crash the process with SIGBUS)."""
    store = tmp_path / "f.npy"
    first = embed(model, folder, "relu2", batch_size=BATCH, store=store, progress=False)
    kept = first.features.clone()
    fewer = embed(model, sorted(folder.glob("*.png"))[:4], "relu2", batch_size=BATCH, store=store, progress=False)
    assert np.load(store).shape == (4, 6) and torch.equal(fewer.features, kept[:4])
    assert torch.equal(first.features, kept)  # the rows past the shorter run's end are still there
    other = embed(model, folder, "relu1", batch_size=BATCH, store=store, progress=False)  # 4 columns: a new file
    assert np.load(store).shape == (N, 4) and other.dims == 4
    assert torch.equal(first.features, kept)
    # the same at the file level, over many pages: map 3000 rows, then shrink and recreate the file
    big = RowFile(tmp_path / "big.npy")
    big.create(6)
    rows = np.arange(3000 * 6, dtype=np.float32).reshape(3000, 6)
    big.write(np.arange(3000), rows)
    mapped = big.map(3000)
    big.resize(4)
    assert big.shape() == (4, 6) and np.array_equal(np.load(big.path), rows[:4])
    assert np.array_equal(mapped, rows)
    big.create(3)
    assert big.shape() == (0, 3) and np.array_equal(mapped, rows)


def test_unknown_length_source_grows_the_file(model, folder):
    x = model.preprocess([str(p) for p in sorted(folder.glob("*.png"))])
    stream = (x[i:i + 4] for i in range(0, N, 4))  # an iterable of unknown length
    e = embed(model, stream, "relu2", batch_size=BATCH, progress=False)
    assert e.total == N and len(e) == N
    torch.testing.assert_close(e.features, direct(model, sorted(folder.glob("*.png"))), rtol=1e-5, atol=1e-6)


# ============================================================================ one pass, several analyses


def test_topk_stats_and_embedding_share_one_pass(model, folder):
    calls: list[int] = []
    at_batch: list[int] = []  # passes counted after each batch (top-k's finish measures receptive fields by a pass)

    def progress(done, total):
        at_batch.append(len(calls))

    hook = forwards(calls, model)
    try:
        shared = engine.run(model, folder, [TopKReducer("relu2", k=3), engine.ChannelStats("relu1"),
                                            EmbeddingReducer(model=model)], batch_size=BATCH, progress=progress)
        assert at_batch == [1, 2, 3, 4]  # one forward pass per batch for the three analyses
        at_batch.clear()
        calls.clear()
        topk = top_activations(model, folder, "relu2", k=3, batch_size=BATCH, progress=progress)
        n = len(calls)
        stats = engine.run(model, folder, [engine.ChannelStats("relu1")], batch_size=BATCH, progress=progress).results[0]
        emb = embed(model, folder, batch_size=BATCH, progress=progress)
        assert at_batch == [1, 2, 3, 4] + [n + k for k in (1, 2, 3, 4)] + [n + 4 + k for k in (1, 2, 3, 4)]
    finally:
        hook.remove()
    t, s, e = shared.results
    assert torch.equal(t.values, topk.values) and torch.equal(t.indices, topk.indices)
    assert torch.equal(t.positions, topk.positions)
    for name in ("mean", "std", "max", "min", "sparsity", "fires"):
        assert torch.equal(getattr(s, name), getattr(stats, name))
    same(e, emb)
    assert e.head == "fc" and e.label(0) in model.labels


# ============================================================================ unreadable images


def test_unreadable_image_skipped_and_listed(model, broken, tmp_path):
    store = tmp_path / "f.npy"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = embed(model, broken, "relu2", batch_size=BATCH, store=store, progress=False)
    assert [w for w in caught if issubclass(w.category, SkippedImagesWarning)]
    assert [i for i, _ in e.skipped] == [BROKEN] and e.total == N
    kept = [i for i in range(N) if i != BROKEN]
    assert e.positions.tolist() == kept
    paths = sorted(broken.glob("*.png"))
    assert e.sources == [str(paths[i]) for i in kept]
    torch.testing.assert_close(e.features, direct(model, [paths[i] for i in kept]), rtol=1e-5, atol=1e-6)
    rows = np.load(store)
    assert rows.shape == (N, 6) and not rows[BROKEN].any()  # row i = input i; the unreadable one is zeros
    assert np.array_equal(rows[kept], e.features.numpy())
    assert "skipped" in str(e)


# ============================================================================ Ray-style partial states


def test_partial_states_from_copies_merge_like_the_local_run(model, folder, tmp_path):
    """The Ray engine's contract without Ray: pickled copies (the actors) fold batch ranges into partial states that
    keep their rows in memory and write nothing; the driver merges them in input order into its file."""
    local = embed(model, folder, batch_size=BATCH, progress=False)
    store = tmp_path / "driver.npy"
    driver = EmbeddingReducer(model=model, store=store)
    actor = pickle.loads(pickle.dumps(driver))
    source = engine.as_source(folder, model.device)
    fwds = [f for _, f in engine.forward_batches(model, source, BATCH, workers=0, inputs_of=driver.inputs,
                                                 needs_output=True)]
    committed = None
    for lo in range(0, len(fwds), 2):  # ranges of two batches per "actor call"
        part = None
        for f in fwds[lo:lo + 2]:
            part = actor.step(part, f)
        assert part["store"] is None and part["features"].shape[0] == sum(len(f.index) for f in fwds[lo:lo + 2])
        assert not store.exists() or lo > 0  # the copy never writes
        plain, tensors = engine.pack(part)
        committed = driver.merge_states(committed, engine.unpack(plain, tensors))
        assert "features" not in committed
    info = engine.RunInfo(names=source.names, paths=source.paths, processed=N, total=N, scored=N, model=model)
    same(driver.finish(committed, info), local)
    # two committed states written to different files: merging copies b's rows into a's file
    a = EmbeddingReducer(model=model, store=tmp_path / "a.npy")
    b = EmbeddingReducer(model=model, store=tmp_path / "b.npy")
    for f in fwds[:2]:
        a.update(f)
    for f in fwds[2:]:
        b.update(f)
    a.merge(b)
    assert a.state["store"] == str(tmp_path / "a.npy") and a.state["runs"] == [[0, N]]
    same(a.result(info), local)
    assert RowFile(tmp_path / "a.npy").shape() == (N, 6)


# ============================================================================ command line


def test_cli_state_and_store(monkeypatch, capsys, model, folder, tmp_path):
    monkeypatch.setattr(cmd_embed, "load_model_from_args", lambda args: model)
    state, out = tmp_path / "cli.state", tmp_path / "map.png"
    args = ["embed", str(folder), "--method", "pca", "--state", str(state), "-o", str(out), "--no-progress", "--json",
            "--batch-size", str(BATCH), "--workers", "0", "--save-every", "2"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert features_path(state).exists() and state.exists()
    assert np.load(features_path(state)).shape == (N, 6)
    assert main(args) == 0  # complete: read back from the state and its features file
    assert json.loads(capsys.readouterr().out)["points"] == first["points"]
    assert main(["embed", str(folder), "--address", "x:1", "-o", str(out)]) == 2  # --address needs --engine ray
    assert "--engine ray" in capsys.readouterr().err
