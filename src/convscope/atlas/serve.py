"""The atlas in the web server: its page under ``/atlas/`` and its JSON API under ``/atlas/api/``.

:func:`atlas_routes` gives the Starlette routes that :func:`convscope.server.app.build_app` mounts when
``convscope serve --atlas ATLAS`` runs. Every answer is read from the :class:`~convscope.atlas.store.AtlasStore`
as it is (nothing is recomputed); the same page (``pages/``) runs from the server and from a static export
(:mod:`convscope.atlas.export`).

``GET /atlas/``  the page (``/atlas`` redirects there, keeping ``?token=``); ``/atlas/atlas.js``, ``/atlas/atlas.css``.

``GET /atlas/api/model``                    :meth:`AtlasStore.model`: model, provenance, layers, flow images
``GET /atlas/api/images``                   :meth:`AtlasStore.images`
``GET /atlas/api/layer/LAYER``              :meth:`AtlasStore.layer`: the layer and every unit's summary
``GET /atlas/api/unit/LAYER/UNIT``          :meth:`AtlasStore.unit`: statistics, pictures, top dataset examples
``GET /atlas/api/atlas/LAYER``              :meth:`AtlasStore.atlas`: the activation atlas's cells
``GET /atlas/api/flow/IMAGE``               :meth:`AtlasStore.flow`: per layer a sprite of the image's feature maps
``GET /atlas/api/search?q=TEXT&limit=50``   :meth:`AtlasStore.search`: units by concept or top class
``GET /atlas/api/files/PATH``               a picture of the atlas (``files/PATH`` inside the atlas folder)

``LAYER`` is URL-encoded (a ``/`` in a name as ``%2F``). Unknown layers, units and images answer 404 with
``{"error": "..."}`` naming what exists. Encoded answers are kept (:class:`Answers`, up to 64 MiB) while the
atlas's index files are unchanged, so a page seen once comes back in a millisecond; a build writing into the
atlas changes them, and the next request reads the store again. Pictures are served only from inside the atlas's ``files/`` folder
(after resolving ``..`` and links) and only as PNG, JPEG, WebP or GIF. The API and the pictures sit under
``/api/`` of the atlas, so the server's guard asks for the token and refuses cross-site requests there as
for the explorer's API (the page appends ``?token=`` to picture URLs).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from .store import DB_NAME, AtlasError, AtlasStore

#: Where the atlas lives in the server's URL space.
PREFIX = "/atlas"

#: The page's files, shipped in ``convscope/atlas/pages`` (also copied by the static export).
PAGES = {
    "index.html": "text/html; charset=utf-8",
    "atlas.js": "text/javascript; charset=utf-8",
    "atlas.css": "text/css; charset=utf-8",
}
PAGES_DIR = Path(__file__).with_name("pages")

#: Picture types served from ``files/``, by suffix.
PICTURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                 ".gif": "image/gif"}

#: Most search results one request may ask for.
MAX_SEARCH = 500

#: Bytes of encoded answers :class:`Answers` keeps.
CACHE_BYTES = 64 * 1024 * 1024

JSON_TYPE = "application/json; charset=utf-8"


def page_file(name: str) -> bytes:
    """The bytes of one of the page's files (:data:`PAGES`)."""
    return (PAGES_DIR / name).read_bytes()


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def to_json(payload: Any) -> str:
    """Strict JSON of a store answer (non-finite numbers as ``null``)."""
    try:
        return json.dumps(payload, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(finite(payload), allow_nan=False, separators=(",", ":"))


def json_answer(payload: Any, status: int = 200) -> Response:
    return Response(to_json(payload), status, media_type=JSON_TYPE)


class Answers:
    """The store's answers as encoded JSON, kept (least recently used dropped beyond ``limit`` bytes) while
    the atlas's index files (``atlas.sqlite`` and its write-ahead log) keep their size and modification time."""

    def __init__(self, store: AtlasStore, limit: int = CACHE_BYTES):
        self.store = store
        self.limit = limit
        self.size = 0
        self._kept: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._stamp: tuple[Any, ...] | None = None
        self._lock = threading.Lock()

    def stamp(self) -> tuple[Any, ...]:
        out = []
        for path in (self.store.db, self.store.root / f"{DB_NAME}-wal"):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def get(self, read: Callable[..., Any], *args: Any) -> bytes:
        """``read(*args)`` encoded, from the kept answers when the index has not changed since."""
        key = (read.__name__, *args)
        stamp = self.stamp()
        with self._lock:
            if stamp != self._stamp:
                self._kept.clear()
                self.size = 0
                self._stamp = stamp
            body = self._kept.get(key)
            if body is not None:
                self._kept.move_to_end(key)
                return body
        body = to_json(read(*args)).encode("utf-8")
        with self._lock:
            if stamp == self._stamp and len(body) <= self.limit:
                self._kept[key] = body
                self.size += len(body)
                while self.size > self.limit:
                    _, dropped = self._kept.popitem(last=False)
                    self.size -= len(dropped)
        return body


def refuse(status: int, message: str) -> Response:
    return json_answer({"error": message}, status)


def picture_path(root: Path, rel: str) -> Path | None:
    """The file ``rel`` names inside ``root/files`` if it is a picture there (links and ``..`` resolved), else None."""
    base = (root / "files").resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not target.is_relative_to(base) or target.suffix.lower() not in PICTURE_TYPES or not target.is_file():
        return None
    return target


def atlas_routes(store: AtlasStore) -> list[Route]:
    """The routes of the atlas page and its API over ``store`` (all under :data:`PREFIX`)."""
    answers = Answers(store)

    def search_answer(text: str, limit: int) -> dict[str, Any]:
        return {"query": text, "results": store.search(text, limit) if text.strip() else []}

    async def read(call: Callable[..., Any], *args: Any) -> Response:
        try:
            body = await run_in_threadpool(answers.get, call, *args)
        except AtlasError as exc:
            return refuse(404, str(exc))
        return Response(body, media_type=JSON_TYPE)

    async def redirect(request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{PREFIX}/{query}", status_code=307)

    async def page(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        if name not in PAGES:
            return refuse(404, f"no such page: {request.url.path}")
        return Response(page_file(name), media_type=PAGES[name])

    async def model(request: Request) -> Response:
        return await read(store.model)

    async def images(request: Request) -> Response:
        return await read(store.images)

    async def layer(request: Request) -> Response:
        return await read(store.layer, request.path_params["layer"])

    async def unit(request: Request) -> Response:
        raw = request.path_params["unit"]
        number = _number(raw)
        if number is None:
            return refuse(404, f"no unit {raw!r} in layer {request.path_params['layer']!r}: units are numbers")
        return await read(store.unit, request.path_params["layer"], number)

    async def atlas(request: Request) -> Response:
        return await read(store.atlas, request.path_params["layer"])

    async def flow(request: Request) -> Response:
        raw = request.path_params["image"]
        image = _number(raw)
        if image is None:
            return refuse(404, f"no image {raw!r}: images are numbers")
        return await read(store.flow, image)

    async def search(request: Request) -> Response:
        text = request.query_params.get("q", "")
        raw = request.query_params.get("limit", "50")
        try:
            limit = int(raw)
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_SEARCH:
            return refuse(400, f"limit must be an integer in 1..{MAX_SEARCH}, got {raw!r}")
        return await read(search_answer, text, limit)

    async def picture(request: Request) -> Response:
        rel = request.path_params["path"]
        path = picture_path(store.root, rel)
        if path is None:
            return refuse(404, f"no picture {rel!r} in this atlas's files/")
        return FileResponse(path, media_type=PICTURE_TYPES[path.suffix.lower()])

    async def unknown(request: Request) -> Response:
        return refuse(404, f"no such atlas endpoint: {request.url.path} (see /atlas/api/model)")

    api = f"{PREFIX}/api"
    return [
        Route(PREFIX, redirect, methods=["GET"]),
        Route(f"{PREFIX}/", page, methods=["GET"]),
        Route(f"{api}/model", model, methods=["GET"]),
        Route(f"{api}/images", images, methods=["GET"]),
        Route(f"{api}/layer/{{layer:path}}", layer, methods=["GET"]),
        Route(f"{api}/unit/{{layer:path}}/{{unit}}", unit, methods=["GET"]),
        Route(f"{api}/atlas/{{layer:path}}", atlas, methods=["GET"]),
        Route(f"{api}/flow/{{image}}", flow, methods=["GET"]),
        Route(f"{api}/search", search, methods=["GET"]),
        Route(f"{api}/files/{{path:path}}", picture, methods=["GET"]),
        Route(f"{api}/{{rest:path}}", unknown, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        Route(f"{PREFIX}/{{name}}", page, methods=["GET"]),
    ]


def _number(raw: str) -> int | None:
    """A path part as a unit or image number; ``None`` when it is not one."""
    try:
        return int(raw)
    except ValueError:
        return None
