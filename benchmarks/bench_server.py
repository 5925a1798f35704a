"""The explorer stays responsive while the model works: latency of the page and ``/api/info`` with 10 long
jobs queued (one running, nine waiting), on the built-in model (224 px, CPU).

    .venv/bin/python benchmarks/bench_server.py              # 10 integrated-gradients jobs, 200 requests each
    .venv/bin/python benchmarks/bench_server.py --tiny       # the tiny test network instead (no weights needed)

Prints the median, 95th percentile and maximum of each endpoint's wall time (a fresh HTTP connection per
request, as a browser's first load), idle and under load, and whether the bar (< 100 ms) holds.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import convscope as cs
from convscope.server import make_server

BAR_MS = 100.0


def timed_get(port: int, path: str, token: str) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"X-Convscope-Token": token})
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status}")
    return 1000 * (time.perf_counter() - start)


def measure(port: int, token: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"/": [], "/api/info": []}
    for _ in range(n):
        for path in out:
            out[path].append(timed_get(port, path, token))
    return out


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=20)[-1] if len(ms) >= 20 else max(ms)
    return f"median {statistics.median(ms):6.1f} ms  p95 {q:6.1f} ms  max {max(ms):6.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test network instead of the built-in model")
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "server"))
        from serverkit import tiny_model

        model, job = tiny_model(), "method=rise&opt.masks=100000&opt.batch_size=8"
    else:
        model, job = cs.load_model(), "method=integrated_gradients&opt.steps=512&opt.batch_size=1"
    server = make_server(model, port=0, quiet=True, max_queued=args.jobs)
    server.start()
    port, token = urlsplit(server.url).port, server.token
    try:
        idle = measure(port, token, args.requests // 4)
        ids = []
        for _ in range(args.jobs):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", f"/api/jobs?kind=explain&image=sample:chelsea&{job}", headers={"X-Convscope-Token": token})
            r = conn.getresponse()
            body = r.read()
            conn.close()
            if r.status != 202:
                raise RuntimeError(f"submitting a job: HTTP {r.status} {body[:200]!r}")
            ids.append(body)
        time.sleep(1.0)  # the first job is running
        busy = server.jobs.busy()
        loaded = measure(port, token, args.requests)
        still = server.jobs.busy()
    finally:
        server.stop(timeout=10)
    print(f"model {model.name}, {args.jobs} jobs submitted ({job}); during the run: {busy} -> {still}")
    ok = True
    for path in ("/", "/api/info"):
        worst = statistics.quantiles(loaded[path], n=20)[-1]
        ok &= worst < BAR_MS
        print(f"{path:10s} idle:   {summary(idle[path])}")
        print(f"{path:10s} loaded: {summary(loaded[path])}   {'ok' if worst < BAR_MS else 'OVER'} (p95 < {BAR_MS:g} ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
