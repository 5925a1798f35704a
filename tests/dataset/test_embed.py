"""Feature embeddings: pooled features exact, neighbours = brute force, t-SNE separates blobs, PCA = SVD.

The neighbour indexes and map methods at scale (FAISS, openTSNE, umap-learn) are tested in test_maps.py."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
import statecheck
from convscope.cli import cmd_embed
from convscope.cli.main import main
from convscope.dataset.embed import (
    EmbeddingError,
    embed,
    load_embedding,
    pca,
    sidecar_path,
    tsne,
)

SIZE = 24
N = 15
DUPLICATE_OF = 3  # image N (the 16th) is a slightly perturbed copy of this one


def tiny_module() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(8, 6, 3, stride=2, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 4),
    ))


@pytest.fixture
def model() -> cs.Model:
    return cs.Model(tiny_module(), input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                    labels=["a", "b", "c", "d"], resize_size=SIZE)


@pytest.fixture
def folder(tmp_path):
    """``N`` random colour images plus ``dup.png``, a copy of image ``DUPLICATE_OF`` with +-2 grey levels of noise."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    arrays = []
    for i in range(N):
        base = rng.random(3) * 200  # each image its own mean colour, so features differ
        a = np.clip(base + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / f"img_{i:02d}.png")
        arrays.append(a)
    dup = np.clip(arrays[DUPLICATE_OF].astype(int) + rng.integers(-2, 3, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(dup).save(root / "zz_dup.png")  # sorts last: row N
    return root


def direct_features(model: cs.Model, folder, layer: str) -> torch.Tensor:
    paths = sorted(folder.glob("*.png"))
    x = model.preprocess([str(p) for p in paths])
    with torch.no_grad(), cs.Capture(model.module, [layer]) as cap:
        cap.forward(x)
    return cap.activations[layer].mean(dim=(2, 3))


# ============================================================================ features


def test_pooled_features_equal_direct_capture(model, folder):
    e = embed(model, folder, "relu2", batch_size=4, progress=False)  # 16 images, batches of 4, 4, 4, 4 ... and 7 below
    expected = direct_features(model, folder, "relu2")
    assert e.features.shape == (N + 1, 6) and e.features.dtype == torch.float32
    torch.testing.assert_close(e.features, expected, rtol=1e-5, atol=1e-6)
    e7 = embed(model, folder, "relu2", batch_size=7, progress=False)  # 7 does not divide 16
    torch.testing.assert_close(e7.features, expected, rtol=1e-5, atol=1e-6)
    assert e.predictions is None  # the passes stopped at relu2
    assert [s.rsplit("/", 1)[-1] for s in e.sources] == [f"img_{i:02d}.png" for i in range(N)] + ["zz_dup.png"]
    assert e.positions.tolist() == list(range(N + 1))
    mx = embed(model, folder, "relu2", pool="max", batch_size=5, progress=False)
    paths = sorted(folder.glob("*.png"))
    with torch.no_grad(), cs.Capture(model.module, ["relu2"]) as cap:
        cap.forward(model.preprocess([str(p) for p in paths]))
    torch.testing.assert_close(mx.features, cap.activations["relu2"].amax(dim=(2, 3)))


def test_penultimate_is_classifier_input_with_predictions(model, folder):
    e = embed(model, folder, batch_size=6, progress=False)
    assert e.layer is None and e.head == "fc"
    # this model's classifier input is the average-pooled relu2
    torch.testing.assert_close(e.features, direct_features(model, folder, "relu2"), rtol=1e-5, atol=1e-6)
    logits = model.logits([str(p) for p in sorted(folder.glob("*.png"))])
    assert torch.equal(e.predictions, logits.argmax(1).cpu())
    torch.testing.assert_close(e.probabilities, logits.softmax(1).max(1).values.cpu())
    assert e.label(0) in model.labels


def test_tensor_inputs_and_bad_options(model, folder):
    x = model.preprocess([str(p) for p in sorted(folder.glob("*.png"))])
    e = embed(model.module, x, "relu2", batch_size=4, progress=False)
    torch.testing.assert_close(e.features, direct_features(model, folder, "relu2"), rtol=1e-5, atol=1e-6)
    assert e.sources == [None] * (N + 1)
    with pytest.raises(EmbeddingError, match="pool"):
        embed(model, folder, "relu2", pool="median")
    with pytest.raises(cs.LayerNotFoundError, match="relu2"):
        embed(model, folder, "relu3")
    with pytest.raises(EmbeddingError, match="in-memory"):
        e.picture(0)
    assert e.picture(0, images=x).size == (SIZE, SIZE)


# ============================================================================ neighbours


def test_neighbours_self_then_duplicate_and_brute_force(model, folder):
    e = embed(model, folder, "relu2", progress=False)
    found = e.neighbours(DUPLICATE_OF, k=5)
    assert found[0].index == DUPLICATE_OF and found[0].distance == pytest.approx(0, abs=1e-6)
    assert found[1].index == N and found[1].source.endswith("zz_dup.png") and found[1].distance < 1e-3
    f = e.features.double().numpy()
    for metric in ("cosine", "euclidean"):
        q = f[DUPLICATE_OF]
        if metric == "cosine":
            d = 1 - f @ q / (np.linalg.norm(f, axis=1) * np.linalg.norm(q))
        else:
            d = np.linalg.norm(f - q, axis=1)
        got = e.neighbours(DUPLICATE_OF, k=N + 1, metric=metric)
        assert [n.index for n in got][:2] == [DUPLICATE_OF, N]
        assert [n.index for n in got][2:] == list(np.argsort(d, kind="stable"))[2:]
        np.testing.assert_allclose([n.distance for n in got], np.sort(d), atol=1e-5)
    by_path = e.neighbours(str(folder / "img_03.png"), k=3)  # an image is embedded the same way
    by_vector = e.neighbours(e.features[DUPLICATE_OF], k=3)
    assert [n.index for n in by_path] == [n.index for n in by_vector] == [n.index for n in found[:3]]
    with pytest.raises(EmbeddingError, match="out of range"):
        e.neighbours(99)
    with pytest.raises(EmbeddingError, match="6 values"):
        e.neighbours(torch.zeros(5))
    with pytest.raises(EmbeddingError, match="metric"):
        e.neighbours(0, metric="manhattan")
    picture = e.neighbours_image(DUPLICATE_OF, k=3, cell=40)
    assert picture.size[0] >= 4 * 40


# ============================================================================ projections


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 20, generator=g) * 10
    labels = torch.arange(3).repeat_interleave(20)
    return centres[labels] + torch.randn(60, 20, generator=g), labels


def test_tsne_separates_blobs_and_is_reproducible():
    x, labels = blobs()
    y = tsne(x, perplexity=10, iterations=300, seed=0, progress=False)
    assert y.shape == (60, 2) and torch.isfinite(y).all()
    d = torch.cdist(y, y)
    d.fill_diagonal_(float("inf"))
    accuracy = (labels[d.argmin(1)] == labels).float().mean().item()
    assert accuracy >= 0.95
    assert torch.equal(y, tsne(x, perplexity=10, iterations=300, seed=0, progress=False))
    r1 = tsne(x, perplexity=10, iterations=50, init="random", seed=1, progress=False)
    assert torch.equal(r1, tsne(x, perplexity=10, iterations=50, init="random", seed=1, progress=False))
    assert not torch.equal(r1, tsne(x, perplexity=10, iterations=50, init="random", seed=2, progress=False))


def test_tsne_limits():
    with pytest.raises(EmbeddingError, match="pca"):
        tsne(torch.randn(30, 4), max_points=20)


def test_pca_equals_svd_up_to_sign():
    x = torch.randn(40, 7, generator=torch.Generator().manual_seed(2)) * torch.arange(1, 8)
    got = pca(x, 3).double().numpy()
    xc = x.double().numpy() - x.double().numpy().mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    want = u[:, :3] * s[:3]
    signs = np.sign((got * want).sum(0))
    assert np.all(signs != 0)
    np.testing.assert_allclose(got, want * signs, atol=1e-4)
    with pytest.raises(EmbeddingError, match="dims"):
        pca(x, 8)


def test_umap_absent_gives_install_hint(monkeypatch, model, folder):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    e = embed(model, folder, "relu2", progress=False)
    with pytest.raises(EmbeddingError, match="pip install umap-learn"):
        e.project("umap")
    with pytest.raises(EmbeddingError, match="unknown method"):
        e.project("isomap")


# ============================================================================ saving, the model, pictures


def test_save_load_round_trip(model, folder, tmp_path):
    e = embed(model, folder, progress=False)
    coords = e.project("pca")
    path = e.save(tmp_path / "emb.pt")
    payload = torch.load(path, weights_only=True)  # plain tensors only
    assert set(payload) == {"features", "positions", "predictions", "probabilities", "coords"}
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["sources"] == e.sources and meta["head"] == "fc"
    back = load_embedding(path, model=model)
    assert torch.equal(back.features, e.features) and torch.equal(back.predictions, e.predictions)
    assert torch.equal(back.coords, coords) and back.sources == e.sources and back.layer is None and back.pool == "avg"
    assert [n.index for n in back.neighbours(str(folder / "img_05.png"), k=4)] == [n.index for n in e.neighbours(5, k=4)]
    plain = load_embedding(path)  # without the model: class names come from the sidecar
    assert plain.label(0) == e.label(0)
    with pytest.raises(EmbeddingError, match="model"):
        plain.neighbours(str(folder / "img_05.png"))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(EmbeddingError):
        load_embedding(tmp_path / "bad.pt")


def test_model_untouched(model, folder):
    module = model.module
    module.train()  # a user's model in training mode must come back in training mode
    with statecheck.untouched(module):
        e = embed(model, folder, progress=False)
        e.neighbours(str(folder / "img_01.png"), k=2)
        embed(model, folder, "relu1", pool="max", predict=True, progress=False)
        with pytest.raises(EmbeddingError):
            embed(model, folder, "relu2", pool="bad")
    assert module.training


def test_map_image_thumbnails_and_points(model, folder):
    e = embed(model, folder, progress=False)
    e.project("tsne", perplexity=4, iterations=100, progress=False)
    pic = e.map_image(size=300, thumb=20)
    assert pic.size[0] == 300 and pic.size[1] > 300
    assert len(np.unique(np.asarray(pic).reshape(-1, 3), axis=0)) > 50  # thumbnails drawn, not only dots
    dots = e.map_image(size=200, thumbnails=False)
    assert dots.size[0] == 200
    with pytest.raises(EmbeddingError, match="coords"):
        e.map_image(torch.zeros(3, 2))


# ============================================================================ command line


def test_cli_json_map_neighbours_save(monkeypatch, capsys, model, folder, tmp_path):
    monkeypatch.setattr(cmd_embed, "load_model_from_args", lambda args: model)
    out, nn_out, saved = tmp_path / "map.png", tmp_path / "nn.png", tmp_path / "emb.pt"
    code = main(["embed", str(folder), "--method", "tsne", "--perplexity", "4", "--iterations", "100", "--json",
                 "-o", str(out), "--neighbours", str(folder / "img_03.png"), "--k", "3", "--neighbours-out", str(nn_out),
                 "--save", str(saved), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    data = json.loads(stdout)
    assert data["count"] == N + 1 and data["method"] == "tsne" and len(data["points"]) == N + 1
    assert data["points"][0]["source"] == "img_00.png" and len(data["points"][0]["coords"]) == 2
    assert [n["source"] for n in data["neighbours"]][:2] == ["img_03.png", "zz_dup.png"]
    assert Image.open(out).size[0] == 1200 and Image.open(nn_out).size[0] > 3 * 64
    assert load_embedding(saved).features.shape == (N + 1, 6)
    code = main(["embed", str(folder), "--layer", "relu2", "--method", "pca", "-o", str(out), "--no-progress"])
    stdout, _ = capsys.readouterr()
    assert code == 0 and stdout.splitlines()[0].startswith("16 images")


def test_cli_bad_input_exits_2(monkeypatch, capsys, model, folder, tmp_path):
    monkeypatch.setattr(cmd_embed, "load_model_from_args", lambda args: model)
    assert main(["embed", str(tmp_path / "nope"), "-o", str(tmp_path / "m.png")]) == 2
    assert main(["embed", str(folder), "--layer", "nope", "-o", str(tmp_path / "m.png"), "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "umap", None)
    assert main(["embed", str(folder), "--method", "umap", "-o", str(tmp_path / "m.png"), "--no-progress"]) == 2
    assert "umap-learn" in capsys.readouterr().err
