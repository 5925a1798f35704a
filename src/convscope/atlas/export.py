"""The static export of an atlas: a folder of plain files that shows the atlas's pages from ``file://``.

``export_static(ATLAS, OUT)`` (``convscope atlas export ATLAS --static OUT``) writes::

    OUT/index.html, atlas.js, atlas.css    the same page as ``convscope serve --atlas`` (in static mode)
    OUT/data/model.js                      the model page's data and the file name of every layer
    OUT/data/images.js                     the dataset images (id, source, class, thumbnail)
    OUT/data/search.js                     the search index: layer, unit, concept, IoU, top class, picture
    OUT/data/layer/SLUG.js                 a layer page's data
    OUT/data/unit/SLUG/UNIT.js             a unit page's data
    OUT/data/atlas/SLUG.js                 a layer's activation atlas (layers that have one)
    OUT/data/flow/IMAGE.js                 the layer view of one image
    OUT/files/...                          the atlas's pictures, copied (only pictures inside its files/)
    OUT/atlas-export.json                  what was exported from where (a folder with it may be overwritten)

Browsers refuse ``fetch`` of ``file://`` URLs, so the data travel as scripts: each data file is one statement
``window.__atlas_data[KEY] = {...};`` whose object is exactly what the server's ``/atlas/api/KEY`` answers,
and the page inserts a ``<script>`` for the file it needs. The folder is written under a temporary name and
renamed into place, so an interrupted export never leaves half a site.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .serve import PAGES, page_file, picture_path, to_json
from .store import AtlasError, AtlasStore, slug

#: Name of the export's manifest (a folder holding it is a previous export, replaced without asking).
MANIFEST = "atlas-export.json"
FORMAT = "convscope-atlas-static"
VERSION = 1

SERVER_MODE = b'data-mode="server"'
STATIC_MODE = b'data-mode="static"'


def layer_slugs(names: list[str]) -> dict[str, str]:
    """A distinct file name for every layer (:func:`~convscope.atlas.store.slug`, numbered on a clash)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = candidate = slug(name)
        n = 2
        while candidate.lower() in taken:  # case-insensitive file systems
            candidate = f"{base}-{n}"
            n += 1
        taken.add(candidate.lower())
        out[name] = candidate
    return out


def data_script(key: str, payload: Any) -> str:
    """One data file: ``window.__atlas_data[KEY] = PAYLOAD;`` (JSON is valid JavaScript)."""
    return f"(window.__atlas_data = window.__atlas_data || {{}})[{json.dumps(key)}] = {to_json(payload)};\n"


def search_index(store: AtlasStore) -> dict[str, Any]:
    """Every unit with a concept or a top class, as compact rows for the page's search."""
    fields = ["layer", "unit", "concept", "iou", "top_class", "vis"]
    with store.connect() as db:
        rows = db.execute("SELECT layer, unit, concept, iou, top_class, vis FROM units "
                          "WHERE concept IS NOT NULL OR top_class IS NOT NULL ORDER BY layer, unit").fetchall()
    return {"fields": fields, "rows": [list(r) for r in rows]}


def _check_target(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise AtlasError(f"{out}: exists and is not a folder")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise AtlasError(f"{out}: a folder that is not empty and not an atlas export; choose a new or empty folder")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_site(store: AtlasStore, site: Path) -> dict[str, int]:
    """Write the page, the data scripts and the pictures of ``store`` into the folder ``site``."""
    for name in PAGES:
        content = page_file(name)
        if name == "index.html":
            if SERVER_MODE not in content:
                raise AtlasError("the atlas page has no data-mode marker (a broken installation)")
            content = content.replace(SERVER_MODE, STATIC_MODE, 1)
        (site / name).write_bytes(content)
    data = site / "data"
    model = store.model()
    slugs = layer_slugs([layer["name"] for layer in model["layers"]])
    _write(data / "model.js", data_script("model", model) + data_script("slugs", slugs))
    _write(data / "images.js", data_script("images", store.images()))
    _write(data / "search.js", data_script("search", search_index(store)))
    counts = {"layers": 0, "units": 0, "atlases": 0, "flows": 0, "pictures": 0}
    for name, s in slugs.items():
        layer = store.layer(name)
        _write(data / "layer" / f"{s}.js", data_script(f"layer/{name}", layer))
        counts["layers"] += 1
        for row in layer["units"]:
            u = row["unit"]
            _write(data / "unit" / s / f"{u}.js", data_script(f"unit/{name}/{u}", store.unit(name, u)))
            counts["units"] += 1
        if layer["atlas"]:
            _write(data / "atlas" / f"{s}.js", data_script(f"atlas/{name}", store.atlas(name)))
            counts["atlases"] += 1
    for image in model["flows"]:
        _write(data / "flow" / f"{image}.js", data_script(f"flow/{image}", store.flow(image)))
        counts["flows"] += 1
    counts["pictures"] = _copy_pictures(store.root, site / "files")
    return counts


def _copy_pictures(root: Path, dest: Path) -> int:
    """Copy the pictures of ``root/files`` to ``dest``: the files the server would hand out (pictures whose
    real path, links resolved, is inside ``files/``), nothing else."""
    files = root / "files"
    copied = 0
    for folder, _dirs, names in os.walk(files):
        for name in names:
            rel = (Path(folder) / name).relative_to(files)
            source = picture_path(root, rel.as_posix())
            if source is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied += 1
    return copied


def export_static(atlas_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the atlas at ``atlas_dir`` as a static site into ``out_dir`` (made, or replaced if it holds a
    previous export) and return ``out_dir``'s path; open ``out_dir/index.html`` in a browser, no server needed.

    Raises :class:`~convscope.atlas.store.AtlasError` for a folder that is not an atlas, or an ``out_dir``
    that exists and holds something else than an earlier export.
    """
    store = AtlasStore(atlas_dir)
    out = Path(out_dir)
    if out.resolve() == store.root.resolve() or out.resolve().is_relative_to(store.root.resolve()):
        raise AtlasError(f"{out}: the export must go outside the atlas folder {store.root}")
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts = _write_site(store, site)
        manifest = {"format": FORMAT, "version": VERSION, "atlas": str(store.root.resolve()),
                    "schema": store.meta("schema"), "model": store.meta("model"),
                    "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **counts}
        _write(site / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        site.chmod(0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.{os.getpid()}.old"
            out.rename(old)
        site.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(site, ignore_errors=True)
        raise
    return out
