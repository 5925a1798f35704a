"""The atlas store: one folder, an SQLite index plus picture files, written by the build, read by pages.

Layout of an atlas folder::

    ATLAS/atlas.sqlite        the index: model, layers, units, dataset examples, atlas cells, flows (WAL mode)
    ATLAS/files/...           pictures (PNG), named by what they show; paths in the index are relative to ATLAS
    ATLAS/state/...           the dataset engine's saved reducer states (an interrupted build resumes from them)

Why SQLite and not DuckDB: the pages read single rows and small row sets by key (a unit, a layer's units, a cell),
which is what a B-tree row store does best; it ships with Python (no dependency); and in WAL mode readers see the
last committed transaction while a build writes, so ``convscope serve --atlas`` can browse an atlas being built.
DuckDB is a columnar engine for scans and aggregates over millions of rows, which the atlas never runs (its
statistics are computed by the engine's reducers before they are stored). Pictures are files, not blobs: the
server and the static export hand them out unchanged, and a browser caches them.

Every read method returns JSON-ready data (dicts, lists, numbers, strings); file fields are paths relative to the
atlas folder (the server serves them under ``files/``, the static export copies them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConvscopeError

#: Version of the store's schema; an atlas of another version is refused with a clear message.
SCHEMA_VERSION = 1
DB_NAME = "atlas.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, source TEXT NOT NULL, class INTEGER, thumb TEXT);
CREATE TABLE IF NOT EXISTS layers (
    name TEXT PRIMARY KEY, position INTEGER NOT NULL, kind TEXT, channels INTEGER, height INTEGER, width INTEGER,
    rf_size INTEGER, rf_stride INTEGER, built INTEGER NOT NULL DEFAULT 0, fingerprint TEXT, info TEXT);
CREATE TABLE IF NOT EXISTS units (
    layer TEXT NOT NULL, unit INTEGER NOT NULL, mean REAL, std REAL, max REAL, sparsity REAL, fires REAL,
    dead INTEGER, concept TEXT, concept_category TEXT, iou REAL, filter_norm REAL, filter_health TEXT,
    top_class TEXT, vis TEXT, negative TEXT, diversity TEXT, filter TEXT, neighbours TEXT,
    PRIMARY KEY (layer, unit));
CREATE TABLE IF NOT EXISTS hits (
    layer TEXT NOT NULL, unit INTEGER NOT NULL, rank INTEGER NOT NULL, image INTEGER NOT NULL, value REAL,
    y INTEGER, x INTEGER, box TEXT, patch TEXT, projection TEXT, PRIMARY KEY (layer, unit, rank));
CREATE TABLE IF NOT EXISTS cells (
    layer TEXT NOT NULL, gx INTEGER NOT NULL, gy INTEGER NOT NULL, count INTEGER NOT NULL, classes TEXT,
    icon TEXT, units TEXT, PRIMARY KEY (layer, gx, gy));
CREATE TABLE IF NOT EXISTS flows (
    image INTEGER NOT NULL, layer TEXT NOT NULL, sprite TEXT NOT NULL, columns INTEGER NOT NULL, tile INTEGER NOT NULL,
    units INTEGER NOT NULL, PRIMARY KEY (image, layer));
CREATE INDEX IF NOT EXISTS units_concept ON units (concept);
"""

UNIT_FIELDS = ("unit", "mean", "std", "max", "sparsity", "fires", "dead", "concept", "concept_category", "iou",
               "filter_norm", "filter_health", "top_class", "vis", "negative", "diversity", "filter", "neighbours")
JSON_FIELDS = {"diversity", "neighbours", "box", "classes", "units", "info"}


class AtlasError(ConvscopeError, ValueError):
    """An atlas folder that cannot be used: missing, not an atlas, another schema version, an unknown layer or unit."""


def slug(name: str) -> str:
    """A layer name as a file-name part: ``blocks.4.0`` stays, other characters become ``_``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "_"


class AtlasStore:
    """An atlas folder's index. ``AtlasStore(path, create=True)`` makes the folder and schema; without ``create`` the
    folder must hold an atlas. Connections are short-lived per call (safe across threads: the server's handlers)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.root = Path(path)
        self.db = self.root / DB_NAME
        if create:
            if self.root.exists() and not self.root.is_dir():
                raise AtlasError(f"{self.root}: exists and is not a folder")
            (self.root / "files").mkdir(parents=True, exist_ok=True)
            (self.root / "state").mkdir(exist_ok=True)
            with self.connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
                version = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if version is None:
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (json.dumps(SCHEMA_VERSION),))
        if not self.db.is_file():
            raise AtlasError(f"{self.root}: not an atlas folder (no {DB_NAME}); build one with `convscope atlas build`")
        version = self.meta("schema")
        if version != SCHEMA_VERSION:
            raise AtlasError(f"{self.root}: an atlas of schema version {version}, this convscope reads version "
                             f"{SCHEMA_VERSION}; rebuild it")

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction (committed on success, rolled back on error), then closed."""
        db = sqlite3.connect(self.db, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    # ------------------------------------------------------------------ writing (the build)
    def set_meta(self, **values: Any) -> None:
        with self.connect() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])

    def add_images(self, rows: Sequence[tuple[int, str, int | None, str | None]]) -> None:
        with self.connect() as db:
            db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?)", rows)

    def put_layer(self, name: str, position: int, *, kind: str, channels: int, height: int, width: int,
                  rf_size: int | None, rf_stride: int | None, fingerprint: str, info: dict[str, Any] | None = None) -> None:
        with self.connect() as db:
            db.execute("INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (name, position, kind, channels, height, width, rf_size, rf_stride, 0, fingerprint,
                        json.dumps(info or {})))

    def mark_built(self, name: str) -> None:
        with self.connect() as db:
            db.execute("UPDATE layers SET built=1 WHERE name=?", (name,))

    def put_units(self, layer: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or update units of ``layer``: each row a dict of :data:`UNIT_FIELDS` (missing fields keep their value)."""
        with self.connect() as db:
            for row in rows:
                fields = [f for f in UNIT_FIELDS if f in row and f != "unit"]
                values = [json.dumps(row[f]) if f in JSON_FIELDS else row[f] for f in fields]
                db.execute("INSERT OR IGNORE INTO units (layer, unit) VALUES (?, ?)", (layer, int(row["unit"])))
                if fields:
                    db.execute(f"UPDATE units SET {', '.join(f + '=?' for f in fields)} WHERE layer=? AND unit=?",
                               (*values, layer, int(row["unit"])))

    def put_hits(self, layer: str, rows: Sequence[dict[str, Any]]) -> None:
        with self.connect() as db:
            db.execute("DELETE FROM hits WHERE layer=?", (layer,))
            db.executemany("INSERT INTO hits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(layer, r["unit"], r["rank"], r["image"], r["value"], r.get("y"), r.get("x"),
                             json.dumps(r.get("box")), r.get("patch"), r.get("projection")) for r in rows])

    def put_cells(self, layer: str, rows: Sequence[dict[str, Any]]) -> None:
        with self.connect() as db:
            db.execute("DELETE FROM cells WHERE layer=?", (layer,))
            db.executemany("INSERT INTO cells VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(layer, r["gx"], r["gy"], r["count"], json.dumps(r.get("classes", [])), r.get("icon"),
                             json.dumps(r.get("units", []))) for r in rows])

    def put_flows(self, rows: Sequence[dict[str, Any]]) -> None:
        with self.connect() as db:
            db.executemany("INSERT OR REPLACE INTO flows VALUES (?, ?, ?, ?, ?, ?)",
                           [(r["image"], r["layer"], r["sprite"], r["columns"], r["tile"], r["units"]) for r in rows])

    def file(self, *parts: str) -> tuple[Path, str]:
        """A picture's absolute path (its folder made) and its path relative to the atlas, for the index."""
        rel = "/".join(["files", *parts])
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, rel

    # ------------------------------------------------------------------ reading (pages)
    def meta(self, key: str, default: Any = None) -> Any:
        with self.connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def model(self) -> dict[str, Any]:
        """The model page: name, provenance, counts and the layer table (every layer with its shape, receptive
        field, unit count and whether it is built)."""
        with self.connect() as db:
            meta = {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT key, value FROM meta")}
            layers = [self._layer_row(r) for r in db.execute("SELECT * FROM layers ORDER BY position")]
            images = db.execute("SELECT COUNT(*) AS n FROM images").fetchone()["n"]
            flows = [r["image"] for r in db.execute("SELECT DISTINCT image FROM flows ORDER BY image")]
        model = meta.get("model")
        name = model.get("name") if isinstance(model, dict) else model
        return {"model": name, "model_info": model if isinstance(model, dict) else None,
                "provenance": meta.get("provenance"), "labels": meta.get("labels_count"),
                "images": images, "layers": layers, "flows": flows, "schema": meta.get("schema")}

    @staticmethod
    def _layer_row(r: sqlite3.Row) -> dict[str, Any]:
        return {"name": r["name"], "position": r["position"], "kind": r["kind"], "channels": r["channels"],
                "shape": [r["channels"], r["height"], r["width"]], "receptive_field": {"size": r["rf_size"], "stride": r["rf_stride"]},
                "built": bool(r["built"]), "info": json.loads(r["info"] or "{}")}

    def layers(self) -> list[str]:
        with self.connect() as db:
            return [r["name"] for r in db.execute("SELECT name FROM layers ORDER BY position")]

    def layer(self, name: str) -> dict[str, Any]:
        """The layer page: the layer's row and every unit's summary (statistics, concept, visualisation)."""
        with self.connect() as db:
            row = db.execute("SELECT * FROM layers WHERE name=?", (name,)).fetchone()
            if row is None:
                raise AtlasError(f"no layer {name!r} in this atlas (layers: {', '.join(self.layers())})")
            units = [self._unit_row(r) for r in db.execute("SELECT * FROM units WHERE layer=? ORDER BY unit", (name,))]
            cells = db.execute("SELECT COUNT(*) AS n FROM cells WHERE layer=?", (name,)).fetchone()["n"]
        return {**self._layer_row(row), "units": units, "atlas": cells > 0}

    @staticmethod
    def _unit_row(r: sqlite3.Row) -> dict[str, Any]:
        out = {}
        for f in UNIT_FIELDS:
            v = r[f]
            out[f] = json.loads(v) if f in JSON_FIELDS and v is not None else v
        out["dead"] = bool(out["dead"]) if out["dead"] is not None else None
        return out

    def unit(self, layer: str, unit: int) -> dict[str, Any]:
        """The unit page: statistics, visualisations, concept, filter, the top dataset examples with their patches
        and projections, neighbouring units."""
        with self.connect() as db:
            row = db.execute("SELECT * FROM units WHERE layer=? AND unit=?", (layer, int(unit))).fetchone()
            if row is None:
                if db.execute("SELECT 1 FROM layers WHERE name=?", (layer,)).fetchone() is None:
                    raise AtlasError(f"no layer {layer!r} in this atlas (layers: {', '.join(self.layers())})")
                n = db.execute("SELECT channels FROM layers WHERE name=?", (layer,)).fetchone()["channels"]
                raise AtlasError(f"no unit {unit} in layer {layer!r} (units 0..{(n or 0) - 1})")
            hits = [{"rank": h["rank"], "image": h["image"], "source": h["source"], "thumb": h["thumb"], "value": h["value"],
                     "y": h["y"], "x": h["x"], "box": json.loads(h["box"]) if h["box"] else None,
                     "patch": h["patch"], "projection": h["projection"]}
                    for h in db.execute("SELECT hits.*, images.source, images.thumb FROM hits LEFT JOIN images "
                                        "ON images.id = hits.image WHERE layer=? AND unit=? ORDER BY rank", (layer, int(unit)))]
            channels = db.execute("SELECT channels FROM layers WHERE name=?", (layer,)).fetchone()["channels"]
        return {"layer": layer, **self._unit_row(row), "hits": hits, "channels": channels}

    def atlas(self, layer: str) -> dict[str, Any]:
        """The layer's activation atlas: the grid size and its cells (count, top classes, icon, nearest units)."""
        with self.connect() as db:
            if db.execute("SELECT 1 FROM layers WHERE name=?", (layer,)).fetchone() is None:
                raise AtlasError(f"no layer {layer!r} in this atlas (layers: {', '.join(self.layers())})")
            cells = [{"gx": r["gx"], "gy": r["gy"], "count": r["count"], "classes": json.loads(r["classes"] or "[]"),
                      "icon": r["icon"], "units": json.loads(r["units"] or "[]")}
                     for r in db.execute("SELECT * FROM cells WHERE layer=? ORDER BY gy, gx", (layer,))]
        info = self.meta(f"atlas:{layer}", {})
        return {"layer": layer, "grid": info.get("grid"), "samples": info.get("samples"), "cells": cells,
                "method": info.get("method")}

    def flow(self, image: int) -> dict[str, Any]:
        """The layer stack for one dataset image: per layer a sprite of its feature maps (tile px, columns)."""
        with self.connect() as db:
            rows = db.execute("SELECT flows.*, layers.position FROM flows JOIN layers ON layers.name = flows.layer "
                              "WHERE image=? ORDER BY layers.position", (int(image),)).fetchall()
            img = db.execute("SELECT * FROM images WHERE id=?", (int(image),)).fetchone()
        if not rows:
            raise AtlasError(f"no layer view stored for image {image}")
        return {"image": int(image), "source": img["source"] if img else None, "thumb": img["thumb"] if img else None,
                "layers": [{"layer": r["layer"], "sprite": r["sprite"], "columns": r["columns"], "tile": r["tile"],
                            "units": r["units"]} for r in rows]}

    def search(self, text: str, limit: int = 50) -> list[dict[str, Any]]:
        """Units whose concept or top class contains ``text`` (case-insensitive), best IoU first."""
        q = f"%{text.strip().lower()}%"
        with self.connect() as db:
            rows = db.execute("SELECT layer, unit, concept, iou, top_class, vis FROM units WHERE lower(concept) LIKE ? "
                              "OR lower(top_class) LIKE ? ORDER BY iou IS NULL, iou DESC, layer, unit LIMIT ?",
                              (q, q, int(limit))).fetchall()
        return [dict(r) for r in rows]

    def images(self) -> list[dict[str, Any]]:
        with self.connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM images ORDER BY id")]
