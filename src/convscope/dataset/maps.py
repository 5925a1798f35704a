"""Nearest neighbours and 2-D maps of a set of feature vectors, at the scale of 100,000s of points.

- **Neighbours**: :func:`build_index` / :func:`knn` search with `FAISS <https://github.com/facebookresearch/faiss>`_.
  ``index="flat"`` (default) is exact brute force (``IndexFlatIP`` on L2-normalised vectors for cosine,
  ``IndexFlatL2`` for euclidean); ``"ivf"`` (``IndexIVFFlat``: k-means cells, ``nprobe`` of ``nlist`` cells
  searched) and ``"hnsw"`` (``IndexHNSWFlat``: a navigable small-world graph) are approximate and meant for
  millions of vectors. Distances are reported as everywhere in convscope: cosine = 1 - cos, in [0, 2]
  (a zero vector is at distance 1 from everything), euclidean = the L2 norm of the difference (recomputed
  exactly for the pairs found, so near-duplicates get ~0, not the rounding noise of |x|^2 + |y|^2 - 2 x.y).
  Ties: the lower row first.
- **Maps**: :func:`pca` (torch; covariance eigendecomposition for large N, no N x D SVD), :func:`tsne`
  (`openTSNE <https://opentsne.readthedocs.io>`_: FFT-accelerated interpolation, O(N) per iteration, on a
  kNN graph built here with FAISS after a PCA to 50 dimensions) and :func:`umap_projection` (umap-learn).
- **Limits**: :func:`check_map_size` says, before any work, whether a method can map N points
  (:data:`MAX_POINTS`; raise a cap with ``max_points``), so a long embedding run does not end in an error.

Measured on 2 shared CPU cores (``benchmarks/bench_maps.py``, 100,000 x 1,280 vectors): exact neighbours
(k=10) of every vector 151 s, a t-SNE map 153 s (PCA to 50-D 2 s, exact kNN graph + 750 iterations),
peak memory 2.3 GB for the whole run; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..options import Option
from ..progress import tqdm
from .folder import DatasetError

METRICS = ("cosine", "euclidean")
METHODS = ("tsne", "pca", "umap")
INDEXES = ("flat", "ivf", "hnsw")
#: t-SNE iterations in all (early exaggeration included): openTSNE's 250 + 500 by default.
ITERATIONS = Option(int, 750, "t-SNE iterations", minimum=1, maximum=100_000)
#: Early exaggeration (factor, iterations) of t-SNE, the values of van der Maaten 2014 and openTSNE; the
#: exaggeration phase is at most a third of ``iterations``.
EXAGGERATION, EXAGGERATION_ITERS = 12.0, 250
#: Largest set each method maps by default (``None``: no cap). t-SNE scales about linearly: 100,000 points
#: take 2.5 minutes on 2 cores (benchmarks/bench_maps.py), so a million takes roughly half an hour to an hour
#: and several GB for the neighbour graph and affinities on top of the features (UMAP: similar or slower, one
#: thread with a seed); raise the cap (``max_points``, ``--max-points``) to go on.
#: PCA makes one pass over the features for a C x C covariance and has no cap of its own.
TSNE_MAX_POINTS = 1_000_000
UMAP_MAX_POINTS = 1_000_000
MAX_POINTS: dict[str, int | None] = {"pca": None, "tsne": TSNE_MAX_POINTS, "umap": UMAP_MAX_POINTS}
#: Fewest points each method maps (t-SNE: a neighbour and a non-neighbour for every point).
MIN_POINTS = {"pca": 2, "tsne": 3, "umap": 3}
#: t-SNE first reduces inputs with more features than this by PCA (van der Maaten 2008; openTSNE's advice).
TSNE_PCA_DIMS = 50
#: t-SNE's kNN graph with ``index="auto"``: exact (flat) up to this many points, HNSW beyond.
EXACT_GRAPH_POINTS = 200_000
#: openTSNE's gradient: Barnes-Hut below this many points (one thread by default), FFT from here (all cores).
FFT_POINTS = 10_000
#: PCA by a thin SVD of the centred data up to this many values (N x C), by the C x C covariance beyond.
PCA_SVD_MAX = 1 << 22
#: IVF training: k-means iterations, and at most this many sample rows per cell (FAISS wants >= 39).
IVF_KMEANS_ITERS, IVF_TRAIN_PER_CELL = 10, 64
#: Rows per chunk when a pass over the features is split to bound memory.
CHUNK = 8192


class EmbeddingError(DatasetError):
    """An embedding option or query that cannot be used (unknown pool/metric/method, a bad index, k < 1...)."""


# ============================================================================ helpers


def check_points(x: Any) -> torch.Tensor:
    """``x`` as a tensor (N, D), N >= 2, all finite; else :class:`EmbeddingError`."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise EmbeddingError(f"expected points (N, D) with N >= 2, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise EmbeddingError("the features hold NaN or infinite values")
    return x


def _float32(x: Any) -> np.ndarray:
    """A C-contiguous float32 numpy view (a copy only when needed) of a tensor or array (N, D)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a new array; zero rows stay zero, so their cosine distance is 1)."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return (x / np.maximum(norm, 1e-30)[:, None].astype(np.float32)).astype(np.float32, copy=False)


def cpu_count() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise EmbeddingError(f"unknown metric {metric!r}; choose {' or '.join(METRICS)}")


# ============================================================================ limits


def _import_umap() -> Any:
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        raise EmbeddingError("UMAP needs the package umap-learn, which is not installed: "
                             "pip install umap-learn (or use method='tsne' or 'pca')") from None
    return umap


def check_map_size(method: str, n: int, dims: int = 2, *, max_points: int | None = None,
                   features: int | None = None) -> None:
    """Raise :class:`EmbeddingError` if ``method`` cannot map ``n`` points into ``dims`` dimensions.

    Cheap, so callers run it before any work: ``convscope embed`` runs it with the number of input files
    before the first image is embedded (and :meth:`Embedding.project`, :func:`tsne`, :func:`umap_projection`
    run it again on the real count). Checks: the method is known; ``n`` is at least :data:`MIN_POINTS`
    and at most ``max_points`` (default: :data:`MAX_POINTS` of the method; ``None`` there means no cap);
    ``dims`` is 1..3 for t-SNE (openTSNE's FFT gradient works in 1 or 2 dimensions, Barnes-Hut in 3), at
    most ``features`` (the feature length, when known) and ``n`` for PCA, below ``n - 1`` for UMAP; UMAP's
    package can be imported.
    """
    if method not in METHODS:
        raise EmbeddingError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    if not isinstance(dims, (int, np.integer)) or isinstance(dims, bool) or dims < 1:
        raise EmbeddingError(f"dims must be a positive integer, got {dims!r}")
    if n < MIN_POINTS[method]:
        raise EmbeddingError(f"a {method} map needs at least {MIN_POINTS[method]} images, got {n}")
    cap = MAX_POINTS[method] if max_points is None else max_points
    if cap is not None and n > cap:
        default = MAX_POINTS[method]
        why = (f"the default limit {default:,} of {method} (up to an hour and several GB at that size on a laptop)"
               if max_points is None else f"max_points={cap:,}")
        raise EmbeddingError(f"{method} of {n:,} points is over {why}; raise it with max_points= (--max-points) "
                             "if you have the time and memory, use method='pca', or map a sample")
    if method == "tsne" and dims > 3:
        raise EmbeddingError(f"t-SNE maps into 1 to 3 dimensions (openTSNE), got dims={dims}; use method='pca'")
    if method == "pca" and dims > min(n, features if features is not None else n):
        limit = min(n, features) if features is not None else n
        raise EmbeddingError(f"dims must be between 1 and {limit} for {n} points"
                             + (f" in {features}-D" if features is not None else "") + f", got {dims}")
    if method == "umap":
        if dims >= n - 1:
            raise EmbeddingError(f"UMAP of {n} points maps into at most {max(n - 2, 0)} dimensions, got dims={dims}")
        _import_umap()


# ============================================================================ neighbours


class NeighbourIndex:
    """A FAISS index over the rows of ``features`` (N, D) for one metric; see :func:`build_index`.

    :meth:`search` answers (Q, D) queries with distances as convscope reports them (cosine: 1 - cos;
    euclidean: L2 norm, recomputed exactly for the pairs found) and rows, closest first, ties by row.
    """

    def __init__(self, features: Any, metric: str = "cosine", index: str = "flat", *, nlist: int | None = None,
                 nprobe: int | None = None, m: int = 32, ef_search: int | None = None, seed: int = 0):
        import faiss  # heavy: imported when an index is built

        _check_metric(metric)
        if index not in INDEXES:
            raise EmbeddingError(f"unknown index {index!r}; choose {', '.join(INDEXES)}")
        base = _float32(features)
        if base.ndim != 2 or base.shape[0] < 1 or base.shape[1] < 1:
            raise EmbeddingError(f"expected features (N, D) with N >= 1, got shape {base.shape}")
        if not np.isfinite(base).all():
            raise EmbeddingError("the features hold NaN or infinite values")
        n, d = base.shape
        self.metric, self.kind, self.dims = metric, index, d
        # euclidean: the rows are kept (a view, not a copy) for the exact distances of the pairs found
        self._base = base if metric == "euclidean" else None
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        self.nlist = self.nprobe = None
        self.ef_search = None
        if index == "flat":
            self.index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        elif index == "ivf":
            # k-means cells: ~sqrt(N) of them, each with at least the 39 training points FAISS asks for
            nlist = nlist or max(1, min(int(round(math.sqrt(n))), n // 39))
            if not 1 <= nlist <= n:
                raise EmbeddingError(f"nlist must be between 1 and N = {n}, got {nlist}")
            quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
            self.index.cp.seed = int(seed)
            self.index.cp.spherical = metric == "cosine"  # unit-norm centroids for inner-product cells
            self.index.cp.niter = IVF_KMEANS_ITERS
            self._quantizer = quantizer  # the IVF index does not own it: keep it alive
            most = IVF_TRAIN_PER_CELL * nlist
            take = np.sort(np.random.default_rng(seed).choice(n, most, replace=False)) if n > most else None
            train = base if take is None else base[take]
            self.index.train(_normalised(train) if metric == "cosine" else train)
            self.nlist = nlist
            self.nprobe = min(nlist, nprobe or max(8, nlist // 32))
            self.index.nprobe = self.nprobe
        else:
            self.index = faiss.IndexHNSWFlat(d, int(m), faiss_metric)
            self.index.hnsw.efConstruction = max(40, 2 * int(m))
            self.ef_search = ef_search
        for lo in range(0, n, CHUNK * 4):  # normalised chunk by chunk: no second full copy of the features
            chunk = base[lo:lo + CHUNK * 4]
            self.index.add(_normalised(chunk) if metric == "cosine" else chunk)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest rows of every query (Q, D): distances (Q, k) float32 and rows (Q, k) int64,
        closest first (ties: lower row first). An approximate index that finds fewer than ``k`` rows for a
        query fills the rest with row -1 at distance inf."""
        q = _float32(queries)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dims:
            raise EmbeddingError(f"queries must be (Q, {self.dims}), got shape {q.shape}")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= len(self):
            raise EmbeddingError(f"k must be between 1 and the {len(self)} indexed rows, got {k!r}")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search or 64, 2 * k)
        dist = np.empty((q.shape[0], k), np.float32)
        rows = np.empty((q.shape[0], k), np.int64)
        for lo in range(0, q.shape[0], CHUNK):
            chunk = q[lo:lo + CHUNK]
            d, i = self.index.search(_normalised(chunk) if self.metric == "cosine" else chunk, k)
            missing = i < 0
            if self.metric == "cosine":
                d = np.clip(1.0 - d, 0.0, 2.0)
            else:
                d = self._exact_l2(chunk, i)
            d[missing] = np.inf
            order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, i), d), axis=-1)
            dist[lo:lo + CHUNK] = np.take_along_axis(d, order, 1)
            rows[lo:lo + CHUNK] = np.take_along_axis(i, order, 1)
        return torch.from_numpy(dist), torch.from_numpy(rows)

    def _exact_l2(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """|q - x_row| for every pair, from the differences (FAISS's |q|^2 + |x|^2 - 2 q.x loses near-zero
        distances to rounding); a few hundred queries at a time to bound the (B, k, D) temporary."""
        out = np.empty(rows.shape, np.float32)
        step = max(1, (1 << 24) // max(1, rows.shape[1] * self.dims))
        for lo in range(0, rows.shape[0], step):
            assert self._base is not None
            diff = self._base[np.maximum(rows[lo:lo + step], 0)] - queries[lo:lo + step, None, :]
            out[lo:lo + step] = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff))
        return out


def build_index(features: Any, metric: str = "cosine", index: str = "flat", **options: Any) -> NeighbourIndex:
    """A FAISS neighbour index over the rows of ``features`` (N, D), a tensor or an array.

    ``index``: ``"flat"`` (exact; memory N x D float32, search O(N D) per query), ``"ivf"`` (approximate:
    ``nlist`` k-means cells, default ~sqrt(N); ``nprobe`` cells searched per query, default
    max(8, nlist / 32); 10 k-means iterations on at most 64 nlist rows drawn with ``seed``) or ``"hnsw"``
    (approximate: graph with ``m`` links per node, 32; ``ef_search`` candidates, default max(64, 2k)).
    Cosine indexes hold L2-normalised copies and search by inner product. The same data and options give
    the same flat and IVF results; HNSW built on several threads may differ slightly run to run.
    """
    return NeighbourIndex(features, metric, index, **options)


def knn(features: Any, k: int = 10, *, metric: str = "cosine", index: str = "flat", exclude_self: bool = True,
        **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest neighbours of every row of ``features`` (N, D) among the rows: distances (N, k)
    float32 and rows (N, k) int64, closest first (ties: lower row first).

    ``exclude_self``: leave each row out of its own list (it is dropped wherever it appears, so an exact
    duplicate stays a neighbour at distance 0; an approximate index that misses the row itself drops its
    last hit instead). ``metric``, ``index`` and ``options`` as for :func:`build_index`; all rows are
    searched in one batched call (chunks of :data:`CHUNK` queries).
    """
    _check_metric(metric)
    x = _float32(features)
    n = x.shape[0] if x.ndim == 2 else 0
    most = n - 1 if exclude_self else n
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= most:
        raise EmbeddingError(f"k must be between 1 and {most} for {n} points"
                             + (" (each point's own row left out)" if exclude_self else "") + f", got {k!r}")
    idx = build_index(x, metric, index, **options)
    dist, rows = idx.search(x, k + 1 if exclude_self else k)
    if not exclude_self:
        return dist, rows
    drop = rows == torch.arange(n)[:, None]
    found = drop.any(1)
    drop[~found, -1] = True  # one entry left out of every row
    keep = ~drop
    return dist[keep].reshape(n, k), rows[keep].reshape(n, k)


# ============================================================================ PCA


def pca(x: Any, dims: int = 2, *, device: str | torch.device | None = None) -> torch.Tensor:
    """Scores (N, dims) on the first ``dims`` principal components of ``x`` (N, D), exact.

    Up to :data:`PCA_SVD_MAX` values: U S of the centred data's thin SVD. Larger inputs never build an
    N x D decomposition: for N >= D the D x D covariance is accumulated chunk by chunk (float64 sums of
    float32 products) and eigendecomposed, the scores are the centred rows times the top eigenvectors
    (100,000 x 1,280: ~1 s on 2 cores, against ~10 s and 0.5 GB more for the SVD); for D > N the
    N x N Gram matrix is used the same way. Signs are fixed so the largest-magnitude loading of each
    component is positive (the decomposition's own sign is arbitrary). ``device``: where to compute
    (default: where ``x`` is); the result is on the CPU.
    """
    x = check_points(x)
    n, d = x.shape
    if not isinstance(dims, (int, np.integer)) or isinstance(dims, bool) or not 1 <= dims <= min(n, d):
        raise EmbeddingError(f"dims must be between 1 and {min(n, d)} for {n} points in {d}-D, got {dims}")
    device = torch.device(device) if device is not None else x.device
    x = x.to(device, torch.float32)
    mean = x.mean(0, keepdim=True)
    if n * d <= PCA_SVD_MAX:
        u, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        scores, vh = u[:, :dims] * s[:dims], vh[:dims]
    elif n >= d:
        cov = torch.zeros((d, d), dtype=torch.float64, device=device)
        for lo in range(0, n, CHUNK):
            c = x[lo:lo + CHUNK] - mean
            cov += (c.T @ c).double()
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        vh = vecs[:, -dims:].flip(1).T.to(torch.float32)
        scores = torch.cat([(x[lo:lo + CHUNK] - mean) @ vh.T for lo in range(0, n, CHUNK)])
    else:
        xc = x - mean
        gram = (xc @ xc.T).double()
        vals, vecs = torch.linalg.eigh(gram)
        s = vals[-dims:].flip(0).clamp_min(0).sqrt()
        u = vecs[:, -dims:].flip(1)
        scores = (u * s).to(torch.float32)
        vh = ((u.T @ xc.double()) / s.clamp_min(1e-30)[:, None]).to(torch.float32)
    sign = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1
    return (scores * sign).cpu()


# ============================================================================ t-SNE


def tsne(x: Any, dims: int = 2, *, perplexity: float = 30.0, iterations: int = ITERATIONS.default,
         learning_rate: float | str = "auto", init: str = "pca", seed: int = 0, pca_dims: int | None = TSNE_PCA_DIMS,
         max_points: int | None = None, index: str = "auto", n_jobs: int | None = None,
         device: str | torch.device | None = None,
         progress: bool | None | Callable[[int, int], None] = None) -> torch.Tensor:
    """t-SNE (van der Maaten & Hinton 2008) of points ``x`` (N, D) -> (N, dims), centred, by openTSNE.

    Steps: inputs with more than ``pca_dims`` features are reduced by :func:`pca` (default 50, the usual
    preprocessing; ``None`` keeps them); the kNN graph (3 x perplexity neighbours, euclidean) is built with
    :func:`knn` (``index="auto"``: exact flat up to :data:`EXACT_GRAPH_POINTS` points, HNSW beyond) and
    turned into perplexity-calibrated affinities by openTSNE; openTSNE then optimises with early
    exaggeration 12 for min(250, iterations / 3) iterations and no exaggeration for the rest (momentum
    0.8, openTSNE's defaults), the repulsive forces by FFT-accelerated interpolation (Linderman et al.
    2019; N >= 10,000 and dims <= 2) or Barnes-Hut (smaller sets, dims = 3). ``learning_rate="auto"``:
    N / exaggeration (Belkina et al. 2019). ``init="pca"``: the first ``dims`` principal components scaled
    to standard deviation 1e-4 in the first (stable global layout); ``"random"``: N(0, 1e-4^2) from
    ``seed``. ``perplexity`` above (N - 1) / 3 is lowered to that with a warning (a point needs 3 x
    perplexity neighbours). ``n_jobs``: threads (default: one below :data:`FFT_POINTS` points, where
    Barnes-Hut's threads cost more than they save, else all cores this process may use). The same inputs
    and seed give the same map (with an exact graph). ``device``: where the PCA runs; openTSNE is CPU only.
    Limits: :func:`check_map_size` (at most ``max_points``, default :data:`TSNE_MAX_POINTS`).
    """
    x = check_points(x)
    n = x.shape[0]
    check_map_size("tsne", n, dims, max_points=max_points)
    if init not in ("pca", "random"):
        raise EmbeddingError(f"unknown init {init!r}; choose pca or random")
    ITERATIONS.check("iterations", iterations)
    if not (isinstance(perplexity, (int, float)) and math.isfinite(perplexity) and perplexity > 0):
        raise EmbeddingError(f"perplexity must be a positive number, got {perplexity!r}")
    if learning_rate != "auto" and not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise EmbeddingError(f"learning_rate must be 'auto' or a positive number, got {learning_rate!r}")
    if index not in ("auto", *INDEXES):
        raise EmbeddingError(f"unknown index {index!r}; choose auto, {', '.join(INDEXES)}")
    if perplexity > (n - 1) / 3:
        lowered = (n - 1) / 3
        warnings.warn(f"t-SNE of {n} points: perplexity {perplexity:g} lowered to {lowered:.3g}, the most "
                      "(N - 1) / 3 points allow", stacklevel=2)
        perplexity = lowered
    from openTSNE import TSNE  # heavy: imported when a map is made
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    # Barnes-Hut's threads cost more than they save on small sets (300 points: 0.5 s on one thread, 3-10 s on
    # two of a busy 2-core machine); the FFT gradient of large sets scales with the cores
    jobs = n_jobs or (1 if n < FFT_POINTS else cpu_count())
    if pca_dims is not None and x.shape[1] > pca_dims:
        x = pca(x, min(pca_dims, n), device=device)
    data = _float32(x)
    k = min(n - 1, int(3 * perplexity))
    kind = index if index != "auto" else ("flat" if n <= EXACT_GRAPH_POINTS else "hnsw")
    dist, rows = knn(data, k, metric="euclidean", index=kind, exclude_self=True, seed=seed)
    if bool((rows < 0).any()):
        raise EmbeddingError(f"the {kind} index found fewer than {k} neighbours for some points; "
                             "use index='flat' or 'hnsw', or a larger nprobe")
    affinities = PerplexityBasedNN(perplexity=perplexity, n_jobs=jobs,
                                   knn_index=PrecomputedNeighbors(rows.numpy(), dist.numpy().astype(np.float64)))
    start = _initial_map(data, dims, init, seed)
    early = min(EXAGGERATION_ITERS, iterations // 3)
    report = progress if callable(progress) else None
    bar = tqdm(total=iterations, desc="t-SNE", unit="it", leave=False,
               disable=True if report else (None if progress is None else not progress))
    every = max(1, min(10, iterations // 20))
    done = [0]

    def tick(*_: Any) -> bool:
        done[0] = min(iterations, done[0] + every)
        bar.update(done[0] - bar.n)
        if report:
            report(done[0], iterations)
        return False  # never stop early

    watch = report is not None or not bar.disable
    method = "bh" if dims > 2 or n < FFT_POINTS else "fft"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            y = TSNE(n_components=dims, learning_rate=learning_rate, early_exaggeration_iter=early,
                     early_exaggeration=EXAGGERATION, n_iter=iterations - early, n_jobs=jobs, random_state=seed,
                     negative_gradient_method=method, callbacks=[tick] if watch else None,
                     callbacks_every_iters=every).fit(affinities=affinities, initialization=start)
        bar.update(iterations - bar.n)
    finally:
        bar.close()
    if report and done[0] < iterations:
        report(iterations, iterations)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    return y - y.mean(0)


def _initial_map(data: np.ndarray, dims: int, init: str, seed: int) -> np.ndarray:
    """t-SNE's starting map (N, dims), standard deviation 1e-4 in the first coordinate."""
    rng = np.random.default_rng(seed)
    if init == "random":
        return rng.normal(0.0, 1e-4, (data.shape[0], dims))
    take = min(dims, data.shape[1], data.shape[0])
    y = pca(torch.from_numpy(data), take).double().numpy()
    if take < dims:  # fewer features than map dimensions: small random extra coordinates
        y = np.concatenate([y, rng.normal(0.0, y[:, 0].std() or 1.0, (y.shape[0], dims - take))], 1)
    return y / max(float(y[:, 0].std()), 1e-30) * 1e-4


# ============================================================================ UMAP


def umap_projection(x: Any, dims: int = 2, *, seed: int = 0, max_points: int | None = None,
                    **options: Any) -> torch.Tensor:
    """UMAP (McInnes, Healy & Melville 2018) through umap-learn -> (N, dims).

    ``seed`` becomes ``random_state`` (reproducible, which makes umap-learn single-threaded); other
    keywords (``n_neighbors``, default min(15, N - 1); ``min_dist``; ``metric`` ...) go to ``umap.UMAP``.
    Sets too small for umap-learn's spectral start (N <= dims + 2) start from a random layout. Limits:
    :func:`check_map_size` (at most ``max_points``, default :data:`UMAP_MAX_POINTS`).
    """
    x = check_points(x)
    n = x.shape[0]
    check_map_size("umap", n, dims, max_points=max_points)
    umap = _import_umap()
    options.setdefault("n_neighbors", min(15, n - 1))
    if n <= dims + 2:
        options.setdefault("init", "random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap-learn warns that a seed disables its parallelism
        out = umap.UMAP(n_components=dims, random_state=seed, **options).fit_transform(_float32(x))
    return torch.as_tensor(np.asarray(out), dtype=torch.float32)
