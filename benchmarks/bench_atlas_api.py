"""Atlas pages are fast: wall time of every ``/atlas/api/...`` answer (``convscope serve --atlas``) and of the
static export.

    .venv/bin/python benchmarks/bench_atlas_api.py                 # a synthetic atlas of realistic size
    .venv/bin/python benchmarks/bench_atlas_api.py --atlas ATLAS   # a built atlas (convscope atlas build)

The synthetic atlas has layers of 64, 256, 512 and 1024 units (9 dataset examples each, a 40x40 activation
atlas on the largest, layer views of 20 images) over 5,000 images; its pictures are a few shared files (the
API hands out paths, so their number does not matter here). Each request opens a fresh HTTP connection, as a
browser's first load. Prints per endpoint the first answer (read from the store) and the median, 95th
percentile and maximum of the next ones (kept answers), then units each read once, whether the bar
(< 100 ms per answer) holds, and the time of ``export_static``.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from convscope.atlas.export import export_static
from convscope.atlas.store import AtlasStore
from convscope.server import make_server

BAR_MS = 100.0
LAYERS = (("stem", "Conv2d", 64, 56, 56), ("blocks.2", "ReLU", 256, 28, 28), ("blocks.4", "ReLU", 512, 14, 14),
          ("blocks.6", "ReLU", 1024, 7, 7))


def synthetic(root: Path) -> AtlasStore:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "atlas"))
    import atlaskit  # the tests' synthetic filler

    atlaskit.FLOW_IMAGES = tuple(range(20))
    atlaskit.ATLAS_LAYER = LAYERS[-1][0]
    atlaskit.GRID = 40
    return atlaskit.fill_synthetic_atlas(root, LAYERS, images=5000, distinct_pictures=False)


def timed_get(port: int, path: str, token: str) -> tuple[float, int]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"X-Convscope-Token": token})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status}: {body[:200]!r}")
    return 1000 * (time.perf_counter() - start), len(body)


def endpoints_layer(store: AtlasStore) -> str:
    """The layer with the most units (the worst case)."""
    return max(store.model()["layers"], key=lambda layer: layer["channels"] or 0)["name"]


def endpoints(store: AtlasStore) -> list[tuple[str, str]]:
    """(label, path) of every kind of answer, on the largest layer."""
    model = store.model()
    biggest = endpoints_layer(store)
    with_atlas = next((layer["name"] for layer in model["layers"] if store.atlas(layer["name"])["cells"]), biggest)
    layer = store.layer(biggest)
    unit = layer["units"][len(layer["units"]) // 2]
    concept = next((u["concept"] for u in layer["units"] if u["concept"]), "a")
    out = [("model", "/atlas/api/model"), ("images", "/atlas/api/images"),
           (f"layer ({len(layer['units'])} units)", f"/atlas/api/layer/{quote(biggest, safe='')}"),
           ("unit", f"/atlas/api/unit/{quote(biggest, safe='')}/{unit['unit']}"),
           ("atlas", f"/atlas/api/atlas/{quote(with_atlas, safe='')}"),
           ("search", f"/atlas/api/search?q={quote(concept)}")]
    if model["flows"]:
        out.append(("flow", f"/atlas/api/flow/{model['flows'][0]}"))
    if unit["vis"]:
        out.append(("picture", f"/atlas/api/{quote(unit['vis'])}"))
    out.append(("page", "/atlas/"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlas", help="a built atlas folder (default: a synthetic one in a temporary folder)")
    ap.add_argument("--requests", type=int, default=50, help="requests per endpoint (default 50)")
    ap.add_argument("--no-export", action="store_true", help="skip timing the static export")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.atlas:
            store = AtlasStore(args.atlas)
        else:
            start = time.perf_counter()
            store = synthetic(Path(tmp) / "atlas")
            print(f"synthetic atlas: {sum(n for _, _, n, _, _ in LAYERS)} units, 5000 images, "
                  f"filled in {time.perf_counter() - start:.1f} s")
        server = make_server(None, port=0, quiet=True, atlas=store)
        server.start()
        ok = True
        try:
            for label, path in endpoints(store):
                cold, size = timed_get(server.port, path, server.token)  # first: read from the store
                ms = [timed_get(server.port, path, server.token)[0] for _ in range(args.requests)]
                p95 = statistics.quantiles(ms, n=20)[-1] if len(ms) >= 20 else max(ms)
                good = p95 < BAR_MS and cold < BAR_MS
                ok &= good
                print(f"{label:22s} {size / 1024:8.1f} KiB  first {cold:6.1f} ms  then median {statistics.median(ms):5.1f} ms  "
                      f"p95 {p95:5.1f} ms  max {max(ms):5.1f} ms  {'ok' if good else 'OVER THE BAR'}")
            units = store.layer(endpoints_layer(store))["units"]
            ms = [timed_get(server.port, f"/atlas/api/unit/{quote(endpoints_layer(store), safe='')}/{u['unit']}",
                            server.token)[0] for u in units[: args.requests]]
            good = max(ms) < BAR_MS
            ok &= good
            print(f"{'unit, each new':22s} {'':8s}      median {statistics.median(ms):6.1f} ms  max {max(ms):6.1f} ms  "
                  f"({len(ms)} units read once each)  {'ok' if good else 'OVER THE BAR'}")
        finally:
            server.stop()
        if not args.no_export:
            start = time.perf_counter()
            site = export_static(store.root, Path(tmp) / "site")
            files = sum(1 for p in site.rglob("*") if p.is_file())
            print(f"static export: {files} files in {time.perf_counter() - start:.1f} s")
    print(f"bar (p95 < {BAR_MS:.0f} ms per answer): {'holds' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
