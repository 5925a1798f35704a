"""A synthetic atlas for the page tests and the API benchmark: an :class:`AtlasStore` filled without a model.

Two layers by default (``conv1``: 8 units of 16x16, ``blocks.4``: 6 units of 8x8), every unit with its
statistics, concept, visualisations (positive, negative, 4 diversity), filter, neighbours and 9 dataset
examples (patch and projection); an activation atlas for ``conv1`` (4x4 grid); the layer view (flow) of
images 0 and 1. Pictures are small PNGs of seeded noise, one per thing shown (or a few shared ones with
``distinct_pictures=False``, for large benchmark atlases).
"""

from __future__ import annotations

import http.client
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from convscope.atlas.store import AtlasStore, slug

#: (name, kind, channels, height, width) of the default layers.
LAYERS = (("conv1", "Conv2d", 8, 16, 16), ("blocks.4", "ReLU", 6, 8, 8))
CONCEPTS = (("dog", "object"), ("striped", "texture"), ("sky", "scene"), ("grass", "material"), (None, None))
CLASSES = ("tabby cat", "golden retriever", "zebra", "fire truck", "daisy", "tree frog")
DEAD = {("conv1", 3)}
HITS = 9
FLOW_IMAGES = (0, 1)
ATLAS_LAYER = "conv1"
GRID = 4


def _png(path: Path, rng: np.random.Generator, size: int, mode: str = "RGB") -> None:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def fill_synthetic_atlas(root: str | Path, layers: Sequence[tuple[str, str, int, int, int]] = LAYERS, *,
                         images: int = 12, seed: int = 0, distinct_pictures: bool = True) -> AtlasStore:
    """Make an atlas folder at ``root`` holding synthetic data for ``layers`` and ``images`` dataset images."""
    rng = np.random.default_rng(seed)
    store = AtlasStore(root, create=True)
    shared: dict[str, str] = {}

    def picture(size: int, *parts: str, mode: str = "RGB") -> str:
        key = f"{size}-{mode}" if not distinct_pictures else None
        if key is not None and key in shared:
            return shared[key]
        path, rel = store.file(*(("shared", f"{key}.png") if key is not None else parts))
        _png(path, rng, size, mode)
        if key is not None:
            shared[key] = rel
        return rel

    store.set_meta(model="synthetic-tiny", provenance={"built_by": "tests/atlas/atlaskit.py", "seed": seed},
                   labels_count=len(CLASSES))
    store.add_images([(i, f"dataset/{CLASSES[i % len(CLASSES)]}/img{i:03d}.png", i % len(CLASSES),
                       picture(24, "images", f"{i:04d}.png")) for i in range(images)])
    for position, (name, kind, channels, height, width) in enumerate(layers):
        s = slug(name)
        store.put_layer(name, position, kind=kind, channels=channels, height=height, width=width,
                        rf_size=3 + 4 * position, rf_stride=2 ** position, fingerprint="synthetic",
                        info={"module": kind})
        rows, hits = [], []
        for u in range(channels):
            concept, category = CONCEPTS[u % len(CONCEPTS)]
            dead = (name, u) in DEAD
            rows.append({
                "unit": u, "mean": 0.0 if dead else round(0.1 + 0.37 * ((u * 5 + position) % 7), 3),
                "std": 0.2, "max": 0.0 if dead else round(1.0 + 0.83 * ((u * 3 + 1) % 5), 3),
                "sparsity": 1.0 if dead else round(0.1 * (u % 9), 3), "fires": 0.0 if dead else 0.5,
                "dead": dead, "concept": None if dead else concept, "concept_category": None if dead else category,
                "iou": None if dead or concept is None else round(0.05 + 0.04 * u, 3),
                "filter_norm": 0.0 if dead else 1.5, "filter_health": "dead" if dead else "ok",
                "top_class": CLASSES[u % len(CLASSES)],
                "vis": picture(16, s, f"u{u:03d}-vis.png"), "negative": picture(16, s, f"u{u:03d}-neg.png"),
                "diversity": [picture(16, s, f"u{u:03d}-div{k}.png") for k in range(4)],
                "filter": picture(8, s, f"u{u:03d}-filter.png"),
                "neighbours": [[(u + 1) % channels, 0.8], [(u + 2) % channels, 0.55]],  # [unit, correlation]
            })
            for rank in range(HITS):
                image = (u + 3 * rank) % images
                hits.append({"unit": u, "rank": rank, "image": image, "value": round(5.0 - 0.4 * rank, 3),
                             "y": rank % height, "x": (u + rank) % width, "box": [2, 2, 12, 12],
                             "patch": picture(16, s, f"u{u:03d}-hit{rank}-patch.png"),
                             "projection": picture(16, s, f"u{u:03d}-hit{rank}-proj.png")})
        store.put_units(name, rows)
        store.put_hits(name, hits)
        store.mark_built(name)
        if name == ATLAS_LAYER:
            cells = []
            for gy in range(GRID):
                for gx in range(GRID):
                    if (gx + gy) % 5 == 4:
                        continue  # a few empty cells
                    cells.append({"gx": gx, "gy": gy, "count": 6 + 3 * gx + gy,
                                  "classes": [[CLASSES[(gx + gy) % len(CLASSES)], 4 + gx],  # [label, count]
                                              [CLASSES[(gx + 2 * gy + 1) % len(CLASSES)], 2]],
                                  "icon": picture(16, s, "atlas", f"{gx:02d}-{gy:02d}.png"),
                                  "units": [(gx + gy) % channels, (gx * gy + 1) % channels]})
            store.put_cells(name, cells)
            store.set_meta(**{f"atlas:{name}": {"grid": GRID, "samples": sum(c["count"] for c in cells),
                                                "method": "umap"}})
    flows = []
    for image in FLOW_IMAGES:
        for name, _kind, channels, height, _width in layers:
            columns = max(1, math.ceil(math.sqrt(channels)))
            rows_n = -(-channels // columns)
            path, rel = store.file("flow", f"{image:04d}", f"{slug(name)}.png")
            Image.fromarray(rng.integers(0, 256, (rows_n * height, columns * height), dtype=np.uint8), "L").save(path)
            flows.append({"image": image, "layer": name, "sprite": rel, "columns": columns, "tile": height,
                          "units": channels})
    store.put_flows(flows)
    return store


def http_get(server, path: str, *, token: bool = True, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """``GET path`` from ``server`` as sent (no path normalisation, no redirects): (status, headers, body)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        sent = {"Host": f"127.0.0.1:{server.port}", **({"X-Convscope-Token": server.token} if token else {}),
                **(headers or {})}
        conn.request("GET", path, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def http_json(server, path: str, **kwargs) -> tuple[int, object]:
    status, headers, body = http_get(server, path, **kwargs)
    assert headers["content-type"].startswith("application/json"), (path, headers)
    return status, json.loads(body)
