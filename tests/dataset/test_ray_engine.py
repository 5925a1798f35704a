"""The Ray engine (``engine="ray"``) gives the local engine's results: top-k with ties, channel statistics,
embeddings, dissection, resumed runs, skipped images. One local Ray instance (2 CPUs, no dashboard) serves the whole module."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.dataset import engine
from convscope.dataset.dissect import dissect, make_synthetic_broden
from convscope.dataset.embed import EmbeddingReducer
from convscope.dataset.folder import SkippedImagesWarning
from convscope.dataset.topk import TopKError, TopKReducer, top_activations

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data] (pip install convscope[ray])")
pytest.importorskip("ray.data")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray Data's own context options

SIZE = 16


def tiny_model() -> cs.Model:
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(4, 6, 3, stride=2, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3),
    ))
    return cs.Model(m, input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                    labels=["a", "b", "c"], resize_size=SIZE)


@pytest.fixture(scope="module")
def ray_instance():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """21 noise images; images 5, 11 and 17 are copies of image 2 (ties), image 20 is not an image."""
    root = tmp_path_factory.mktemp("ray") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(20)]
    for i in (5, 11, 17):
        arrays[i] = arrays[2]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(root / f"img_{i:02d}.png")
    (root / "img_20.png").write_bytes(b"\x89PNG not really")
    return root


def both(fn):
    """``fn(engine)`` with the local engine and the Ray engine, skipped-image warnings recorded."""
    out = []
    for name in ("local", "ray"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn(name)
        out.append((result, [w for w in caught if issubclass(w.category, SkippedImagesWarning)]))
    return out


def test_topk_stats_embeddings_equal_local_with_ties_and_skipped(ray_instance, folder):
    """One pass, four reducers: layer outputs (stopped early? no: the classifier's input and the logits are needed)."""
    model = tiny_model()

    def go(name):
        return engine.run(model, folder, [TopKReducer("conv2", k=6), TopKReducer("relu1", k=4, reduce="mean"),
                                          engine.ChannelStats("conv1"), EmbeddingReducer(model=model)],
                          batch_size=4, progress=False, engine=name, actors=2)

    (local, lw), (remote, rw) = both(go)
    for a, b in zip(local.results[:2], remote.results[:2]):
        assert torch.equal(a.values, b.values)
        assert torch.equal(a.indices, b.indices)  # tie order included
        assert torch.equal(a.positions, b.positions)
        assert a.sources == b.sources and a.input_size == b.input_size and a.map_size == b.map_size
    # the duplicated images tie: where they rank, they come together, earliest first (cut by k at the end)
    tied = [2, 5, 11, 17]
    rows = [r for r in local.results[0].indices.tolist() if set(tied) & set(r)]
    assert rows
    for r in rows:
        at = r.index(2)
        assert r[at:at + 4] == tied[:len(r) - at]
    s, t = local.results[2], remote.results[2]
    assert s.images == t.images == 20
    for name in ("mean", "std", "max", "min", "sparsity", "fires"):
        torch.testing.assert_close(getattr(s, name), getattr(t, name), rtol=0, atol=1e-6)
    assert local.info.skipped == remote.info.skipped and len(local.info.skipped) == 1
    assert local.info.skipped[0][0] == 20
    assert (local.info.processed, local.info.scored) == (remote.info.processed, remote.info.scored) == (21, 20)
    assert len(lw) == len(rw) == 1 and str(lw[0].message) == str(rw[0].message)
    e, f = local.results[3], remote.results[3]  # penultimate features (the classifier's input) and predictions
    assert e.features.shape == (20, 6) and torch.equal(e.features, f.features)
    assert torch.equal(e.positions, f.positions) and e.sources == f.sources
    assert torch.equal(e.predictions, f.predictions) and torch.equal(e.probabilities, f.probabilities)


def test_dissection_equals_local(ray_instance, tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 2, stride=2), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                       flat=nn.Flatten()))
    with torch.no_grad():
        module.conv.weight[0] = torch.tensor([0.25, -0.25, -0.25]).view(3, 1, 1)  # unit 0: the red squares
        module.conv.bias[0] = -0.5
    model = cs.Model(module, input_size=SIZE * 2, mean=(0, 0, 0), std=(1, 1, 1), labels=list("abcd"),
                     resize_size=SIZE * 2)
    root = make_synthetic_broden(tmp_path / "broden", 12, size=SIZE * 2, square_every=3)
    a = dissect(model, root, "relu", batch_size=5, progress=False)
    b = dissect(model, root, "relu", batch_size=5, progress=False, engine="ray")
    assert b.stage == "done" and b.processed == a.processed == 12
    torch.testing.assert_close(b.thresholds, a.thresholds, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.iou, a.iou, rtol=0, atol=1e-6)
    assert torch.equal(b.top_images, a.top_images)
    assert a.iou[0].max() > 0.5  # the planted detector was found (the comparison is not between empty results)


def test_top_activations_engine_ray_list_of_images(ray_instance, folder):
    """The public API with engine="ray"; in-memory PIL images are shipped to the actors with the list."""
    model = tiny_model()
    pictures = [Image.open(p).convert("RGB") for p in sorted(folder.glob("img_0*.png"))]
    a = top_activations(model, pictures, "conv2", k=3, batch_size=3, progress=False)
    b = top_activations(model, pictures, "conv2", k=3, batch_size=3, progress=False, engine="ray")
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    assert b.sources == [None] * 10 and b.complete


def test_interrupted_ray_run_resumes_to_the_same_result(ray_instance, folder, tmp_path):
    model = tiny_model()
    state = tmp_path / "topk.state"
    seen = []

    def stop_after_two(done, total):
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        full = top_activations(model, folder, "conv2", k=5, batch_size=3, progress=False)
        part = top_activations(model, folder, "conv2", k=5, batch_size=3, state=state, save_every=1,
                               progress=stop_after_two, engine="ray")
        assert part.interrupted and part.processed == 6
        done = top_activations(model, folder, "conv2", k=5, batch_size=3, state=state, progress=False, engine="ray")
    assert done.complete and not done.interrupted and done.processed == 21
    assert torch.equal(done.values, full.values) and torch.equal(done.indices, full.indices)
    assert torch.equal(done.positions, full.positions) and done.skipped == full.skipped


def test_errors_raised_in_actors_reach_the_caller(ray_instance, folder):
    model = tiny_model()
    with pytest.raises(TopKError, match="out of range"):
        top_activations(model, folder, "conv2", channels=[40], progress=False, engine="ray")
    with pytest.raises(engine.EngineError, match="unknown length"):
        top_activations(model, iter([torch.zeros(2, 3, SIZE, SIZE)]), "conv2", progress=False, engine="ray")
    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(engine.EngineError, match="no GPU"):
            top_activations(model, folder, "conv2", progress=False, engine="ray", num_gpus=1)
    with pytest.raises(engine.EngineError, match="actors must be >= 1"):
        engine.run(model, folder, [TopKReducer("conv2")], progress=False, engine="ray", actors=0)
