"""Neighbours and a t-SNE map of 100,000 feature vectors on a few CPU cores: time, peak memory, quality.

Data: a seeded Gaussian mixture standing in for CNN embeddings: ``--n`` points (100,000) in ``--dims``
(1,280, EfficientNet's penultimate width) around ``--clusters`` (100) centres drawn from N(0, 1), unit
noise. Stages, each timed, with the process's peak resident memory (``ru_maxrss``) after it:

1. exact neighbours (k=10, cosine, FAISS flat index, each point's own row left out) of every point;
   recall@10 against a float64 brute-force search for ``--queries`` (500) random points (must be 1.0);
2. the approximate indexes (``--approx``, default ivf): time and recall@10 against the exact lists;
3. PCA 1,280 -> 50 (covariance eigendecomposition) and t-SNE of the 50-D points (openTSNE, FFT gradient,
   exact FAISS kNN graph, 750 iterations), then the leave-one-out accuracy of a k=10 nearest-neighbour
   vote on the cluster labels in the 2-D map (must be >= 0.9);
4. optionally UMAP (``--umap``; umap-learn with a seed is single-threaded).

The run fails (exit 1) if recall < 1, the map's accuracy < 0.9 or the peak memory reaches 4 GB.

    nice .venv/bin/python benchmarks/bench_maps.py --threads 2 --markdown /tmp/maps_results.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

from convscope.dataset.maps import cpu_count, knn, pca, tsne, umap_projection

GB = 1 << 30


def peak_bytes() -> int:
    """The process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mixture(n: int, dims: int, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around ``clusters`` N(0, 1) centres with unit noise, built in chunks (no second copy)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dims, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    x = torch.empty(n, dims)
    for lo in range(0, n, 8192):
        hi = min(n, lo + 8192)
        x[lo:hi] = centres[labels[lo:hi]] + torch.randn(hi - lo, dims, generator=g)
    return x, labels


def brute_cosine(x: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` nearest rows of ``x`` to each of its rows ``queries`` by cosine distance, in float64, own row out."""
    q = x[queries].double()
    q = q / q.norm(dim=1, keepdim=True)
    sims = torch.empty(len(queries), x.shape[0], dtype=torch.float64)
    for lo in range(0, x.shape[0], 8192):
        c = x[lo:lo + 8192].double()
        sims[:, lo:lo + 8192] = q @ (c / c.norm(dim=1, keepdim=True)).T
    sims[torch.arange(len(queries)), queries] = -np.inf
    return sims.topk(k, dim=1).indices


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist())]))


def vote_accuracy(y: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    _, rows = knn(y, k, metric="euclidean")
    return (torch.mode(labels[rows], 1).values == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=1280)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=500, help="brute-force checked queries for recall@k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, cpu_count()))
    ap.add_argument("--iterations", type=int, default=750, help="t-SNE iterations (250 exaggerated)")
    ap.add_argument("--approx", default="ivf", help="approximate indexes to time, comma-separated (ivf,hnsw) or ''")
    ap.add_argument("--umap", action="store_true", help="also time a UMAP map")
    ap.add_argument("--markdown", default=None, metavar="FILE", help="also write the results as markdown")
    args = ap.parse_args(argv)

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows: list[tuple[str, float, int, str]] = []

    def stage(name: str, seconds: float, result: str = "") -> None:
        rows.append((name, seconds, peak_bytes(), result))
        print(f"{name:<44} {seconds:8.1f} s   peak RSS {peak_bytes() / GB:5.2f} GB   {result}", flush=True)

    print(f"{args.n:,} x {args.dims} float32 ({args.n * args.dims * 4 / GB:.2f} GB), {args.clusters} clusters, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, faiss {faiss.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    t = time.perf_counter()
    x, labels = mixture(args.n, args.dims, args.clusters, args.seed)
    stage("data", time.perf_counter() - t)

    t = time.perf_counter()
    dist, found = knn(x, args.k, metric="cosine", index="flat")
    stage(f"exact neighbours, k={args.k}, all points (flat)", time.perf_counter() - t)
    queries = torch.from_numpy(np.random.default_rng(args.seed).choice(args.n, args.queries, replace=False))
    t = time.perf_counter()
    truth = brute_cosine(x, queries, args.k)
    exact_recall = recall(found[queries], truth)
    stage(f"float64 brute force, {args.queries} queries", time.perf_counter() - t, f"recall@{args.k} {exact_recall:.4f}")

    for kind in filter(None, args.approx.split(",")):
        t = time.perf_counter()
        _, approx = knn(x, args.k, metric="cosine", index=kind, seed=args.seed)
        stage(f"approximate neighbours ({kind})", time.perf_counter() - t,
              f"recall@{args.k} {recall(approx, found):.4f} (vs exact, all points)")
        del approx
    del dist

    t = time.perf_counter()
    x50 = pca(x, 50)
    stage(f"PCA {args.dims} -> 50", time.perf_counter() - t)
    t = time.perf_counter()
    y = tsne(x50, 2, perplexity=30, iterations=args.iterations, seed=args.seed, n_jobs=args.threads, progress=False)
    seconds = time.perf_counter() - t
    accuracy = vote_accuracy(y, labels, args.k)
    stage(f"t-SNE of the 50-D points ({args.iterations} it.)", seconds, f"kNN accuracy (k={args.k}) {accuracy:.4f}")

    if args.umap:
        t = time.perf_counter()
        u = umap_projection(x50, seed=args.seed)
        seconds = time.perf_counter() - t
        stage("UMAP of the 50-D points", seconds, f"kNN accuracy (k={args.k}) {vote_accuracy(u, labels, args.k):.4f}")

    peak = peak_bytes()
    ok = exact_recall == 1.0 and accuracy >= 0.9 and peak < 4 * GB
    print(f"peak RSS {peak / GB:.2f} GB; {'PASS' if ok else 'FAIL'} (recall 1.0, accuracy >= 0.9, peak < 4 GB); "
          f"load average now {os.getloadavg()[0]:.1f}")
    if args.markdown:
        lines = ["| stage | seconds | peak RSS (GB) | result |", "|---|---:|---:|---|"]
        lines += [f"| {name} | {s:.1f} | {p / GB:.2f} | {r} |" for name, s, p, r in rows]
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
