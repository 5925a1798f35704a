"""Neighbours and maps at scale: FAISS exact = brute force, approximate recall, openTSNE and UMAP separate a
mixture, PCA without an N x D SVD = SVD, limits checked before any image is embedded."""

from __future__ import annotations

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
from convscope.dataset import maps
from convscope.dataset.embed import EmbeddingError, embed
from convscope.dataset.maps import build_index, check_map_size, knn, pca, tsne, umap_projection


def mixture(per: int = 60, clusters: int = 5, dims: int = 50, spread: float = 6.0, seed: int = 0):
    """``clusters`` Gaussian blobs of ``per`` points (unit noise, centres ~N(0, spread^2)) and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dims, generator=g) * spread
    labels = torch.arange(clusters).repeat_interleave(per)
    return centres[labels] + torch.randn(len(labels), dims, generator=g), labels


def knn_accuracy(y: torch.Tensor, labels: torch.Tensor, k: int = 10) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote in the map ``y``."""
    _, rows = knn(y, k, metric="euclidean")
    return (torch.mode(labels[rows], 1).values == labels).float().mean().item()


def brute_force(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Every pairwise distance (N, N) in float64, the way convscope reports them."""
    x = x.double()
    if metric == "euclidean":
        return torch.cdist(x, x)
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (1 - u @ u.T).clamp(0, 2)


# ============================================================================ neighbours


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_knn_equals_brute_force(metric):
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(3)) + 0.5  # continuous: no ties
    d = brute_force(x, metric)
    d_self = d.clone()
    d_self.fill_diagonal_(float("inf"))
    want = torch.sort(d_self, dim=1, stable=True)
    dist, rows = knn(x, 10, metric=metric)
    assert dist.shape == rows.shape == (300, 10) and dist.dtype == torch.float32 and rows.dtype == torch.int64
    assert torch.equal(rows, want.indices[:, :10])
    torch.testing.assert_close(dist.double(), want.values[:, :10], atol=1e-5, rtol=0)
    with_self, rows_self = knn(x, 10, metric=metric, exclude_self=False)
    assert torch.equal(rows_self[:, 0], torch.arange(300)) and with_self[:, 0].abs().max() < 1e-5
    assert torch.equal(rows_self[:, 1:], rows[:, :9])
    q = torch.randn(7, 16, generator=torch.Generator().manual_seed(4))  # queries outside the set
    qd, qi = build_index(x, metric).search(q, 5)
    full = torch.cdist(q.double(), x.double()) if metric == "euclidean" else \
        1 - (q.double() / q.double().norm(dim=1, keepdim=True)) @ (x.double() / x.double().norm(dim=1, keepdim=True)).T
    assert torch.equal(qi, torch.sort(full, dim=1, stable=True).indices[:, :5])
    torch.testing.assert_close(qd.double(), torch.sort(full, 1).values[:, :5], atol=1e-5, rtol=0)


def test_duplicates_ties_zero_vectors_and_exact_small_distances():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    x[12] = x[4]  # an exact duplicate: it stays row 4's neighbour at 0 when row 4 itself is left out
    _, rows = knn(x, 3, metric="euclidean")
    assert rows[4, 0] == 12 and rows[12, 0] == 4
    dist, rows = knn(x, 2, metric="euclidean", exclude_self=False)
    assert rows[4].tolist() == [4, 12] and rows[12].tolist() == [4, 12] and dist[12].tolist() == [0.0, 0.0]  # ties: lower row first
    z = torch.cat([x, torch.zeros(1, 8)])
    d, _ = build_index(z, "cosine").search(torch.zeros(8), 5)
    assert torch.allclose(d, torch.ones(5))  # a zero vector is orthogonal to everything
    # far from the origin, |x|^2 + |y|^2 - 2 x.y rounds a 1e-3 distance away; the pairs found are recomputed
    far = torch.randn(50, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 1000
    far[1] = far[0] + 1e-3 / 8  # 64 coordinates of 1/8000: distance 1e-3
    d, rows = knn(far.float(), 1, metric="euclidean")
    exact = (far[0].float() - far[1].float()).double().norm().item()
    assert rows[0, 0] == 1 and d[0, 0].item() == pytest.approx(exact, rel=1e-3)


def test_approximate_indexes_have_high_recall_on_a_mixture():
    x, _ = mixture(per=200, clusters=10, dims=32, spread=3.0, seed=1)
    _, exact = knn(x, 10, metric="cosine")
    for kind in ("ivf", "hnsw"):
        d, rows = knn(x, 10, metric="cosine", index=kind)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])
        assert recall >= 0.9, (kind, recall)
        assert (d[:, 1:] >= d[:, :-1]).all()
    ivf = build_index(x, "euclidean", "ivf", nlist=20, nprobe=20)  # every cell probed: exact
    _, rows = ivf.search(x[:50], 5)
    assert torch.equal(rows, build_index(x, "euclidean").search(x[:50], 5)[1])
    with pytest.raises(EmbeddingError, match="index"):
        build_index(x, "cosine", "annoy")
    with pytest.raises(EmbeddingError, match="metric"):
        knn(x, 3, metric="manhattan")
    with pytest.raises(EmbeddingError, match="k must be"):
        knn(x[:5], 5)


# ============================================================================ maps


def test_pca_covariance_and_gram_paths_equal_svd(monkeypatch):
    monkeypatch.setattr(maps, "PCA_SVD_MAX", 0)  # force the large-input paths on small data
    g = torch.Generator().manual_seed(2)
    for shape in ((500, 12), (12, 40)):  # N >= D: covariance; D > N: Gram matrix
        x = torch.randn(*shape, generator=g) * torch.linspace(1, 5, shape[1])
        got = pca(x, 3).double().numpy()
        xc = x.double().numpy() - x.double().numpy().mean(0)
        u, s, _ = np.linalg.svd(xc, full_matrices=False)
        want = u[:, :3] * s[:3]
        signs = np.sign((got * want).sum(0))
        assert np.all(signs != 0)
        np.testing.assert_allclose(got, want * signs, atol=1e-3 * s[0] / np.sqrt(shape[0]))
    monkeypatch.undo()
    x = torch.randn(60, 9, generator=g)
    torch.testing.assert_close(pca(x, 2), pca(x * 1.0, 2))


def test_tsne_separates_a_mixture_and_is_reproducible():
    x, labels = mixture()
    y = tsne(x, perplexity=15, iterations=300, progress=False)
    assert y.shape == (300, 2) and torch.isfinite(y).all()
    assert knn_accuracy(y, labels) >= 0.9
    assert torch.equal(y, tsne(x, perplexity=15, iterations=300, progress=False))
    seen = []
    y3 = tsne(x, 3, perplexity=15, iterations=60, init="random", seed=1, progress=lambda d, t: seen.append((d, t)))
    assert y3.shape == (300, 3) and seen[-1] == (60, 60)


def test_tsne_small_sets_and_limits():
    x, _ = mixture(per=4, clusters=4, dims=20)  # 16 points: perplexity 30 is lowered to 5
    with pytest.warns(UserWarning, match="perplexity 30 lowered to 5"):
        y = tsne(x, perplexity=30, iterations=100, progress=False)
    assert y.shape == (16, 2) and torch.isfinite(y).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(tsne(x[:3], iterations=50, progress=False)).all()
    with pytest.raises(EmbeddingError, match="at least 3"):
        tsne(x[:2])
    with pytest.raises(EmbeddingError, match="1 to 3 dimensions"):
        tsne(x, 4)
    with pytest.raises(EmbeddingError, match="max_points"):
        tsne(x, max_points=10)


def test_umap_separates_a_mixture():
    x, labels = mixture()
    y = umap_projection(x, seed=0)
    assert y.shape == (300, 2) and torch.isfinite(y).all()
    assert knn_accuracy(y, labels) >= 0.9
    assert torch.isfinite(umap_projection(x[:4], seed=0)).all()  # too few for a spectral start: random
    with pytest.raises(EmbeddingError, match="at least 3"):
        umap_projection(x[:2])


def test_check_map_size():
    check_map_size("tsne", 100_000)
    check_map_size("pca", 10**9)  # no cap: one pass over the features
    with pytest.raises(EmbeddingError, match="default limit 1,000,000 of tsne"):
        check_map_size("tsne", 1_000_001)
    check_map_size("tsne", 1_000_001, max_points=2_000_000)
    with pytest.raises(EmbeddingError, match="max_points=500"):
        check_map_size("umap", 501, max_points=500)
    with pytest.raises(EmbeddingError, match="between 1 and 6"):
        check_map_size("pca", 100, 7, features=6)
    with pytest.raises(EmbeddingError, match="unknown method"):
        check_map_size("isomap", 100)
    with pytest.raises(EmbeddingError, match="at most 2 dimensions"):
        check_map_size("umap", 4, 3)


# ============================================================================ command line: limits first


def tiny_model() -> cs.Model:
    torch.manual_seed(0)
    module = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                       flat=nn.Flatten(), fc=nn.Linear(4, 3)))
    return cs.Model(module, input_size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, labels=["a", "b", "c"], resize_size=16)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
    return root


def test_cli_checks_the_map_size_before_embedding(monkeypatch, capsys, folder, tmp_path):
    model = tiny_model()

    def broken_forward(*args, **kwargs):
        raise AssertionError("the model ran before the size check")

    monkeypatch.setattr(model.module, "forward", broken_forward)
    monkeypatch.setattr(cmd_embed, "load_model_from_args", lambda args: model)
    code = main(["embed", str(folder), "--method", "tsne", "--max-points", "5", "-o", str(tmp_path / "m.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "tsne of 8 points is over max_points=5" in err and "--max-points" in err
    assert not (tmp_path / "m.png").exists()
    with pytest.raises(EmbeddingError, match="max_points=5"):  # the API checks first too
        embed(tiny_model(), folder, progress=False).project("umap", max_points=5)


def test_cli_tsne_with_index_and_max_points(monkeypatch, capsys, folder, tmp_path):
    monkeypatch.setattr(cmd_embed, "load_model_from_args", lambda args: tiny_model())
    code = main(["embed", str(folder), "--method", "tsne", "--index", "hnsw", "--max-points", "8", "--iterations", "60",
                 "-o", str(tmp_path / "m.png"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0].startswith("8 images") and (tmp_path / "m.png").exists()
