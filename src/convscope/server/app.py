"""The web explorer as an ASGI application (Starlette): the page, the JSON API, jobs, and the guards.

``GET /`` is the page (``static/index.html``), ``GET /static/NAME`` its script and style sheet, and
``/api/...`` the endpoints of :mod:`convscope.server.api` plus the jobs:

``POST /api/jobs?kind=explain|visualize&budget=SECONDS&...``
    Queue a long call with the query parameters of ``GET /api/KIND``; answers ``{"id", "status",
    "position", ...}`` at once (503 when :data:`~convscope.server.jobs.MAX_QUEUED` jobs are waiting).
    ``budget``: the job's first steps give an estimate of its time; over the budget it stops there with
    status ``estimate`` and ``estimate_seconds`` (submit it again without a budget to run it anyway).
``GET /api/jobs/ID``
    ``{"id", "kind", "status": queued|running|done|error|cancelled|estimate, "stage", "done", "total",
    "fraction", "elapsed", "position"}``, with ``result`` when done and ``error`` after an error. A job
    nobody asks about for 30 s is cancelled (its page went away).
``DELETE /api/jobs/ID`` (or ``POST /api/jobs/ID/cancel``)
    Cancel: a waiting job is dropped, a running one stops at its next step.

``GET /api/explain`` and ``GET /api/visualize`` still answer in one request: they queue a job and wait
for it, and a client that hangs up cancels it.

With an atlas (``convscope serve --atlas ATLAS``), its page and API live under ``/atlas/`` (routes in
:mod:`convscope.atlas.serve`); without a model (the atlas alone), ``/`` redirects to ``/atlas/`` and
``/api/...`` answers 404.

Guards, in order, on every request: the ``Host`` header must name this server (DNS rebinding); on
``/api/`` and ``/atlas/api/`` (:data:`API_PREFIXES`), a request a browser marks as cross-site
(``Sec-Fetch-Site``) or from another ``Origin`` is refused, and the per-launch token must come as the
``X-Convscope-Token`` header (the page takes it from its own URL, ``?token=...``, as Jupyter does) or as
a ``token`` query parameter (for ``curl``, and the atlas's pictures). The pages and their scripts need no
token: they hold no data. Every error is JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable
from importlib import resources
from ipaddress import ip_address
from typing import Any
from urllib.parse import parse_qs

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.responses import Response as HttpResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..atlas.serve import atlas_routes
from ..atlas.store import AtlasStore
from .api import ApiError, Explorer, Response
from .jobs import JobQueue, QueueFull

#: Files of the page, by URL path: (file name in ``static/``, content type).
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}

#: The page loads nothing from elsewhere; pictures are data: URIs, uploads previews blob: URLs.
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")

#: Paths under these prefixes hold data: the token and the cross-site checks apply there.
API_PREFIXES = ("/api/", "/atlas/api/")

TOKEN_HEADER = "x-convscope-token"
CLIENT_HEADER = "x-convscope-client"

#: An oversized upload is read and thrown away up to this many times the limit (so the client gets
#: its 413 instead of a broken connection); beyond that the connection is simply closed.
DRAIN_FACTOR = 4

#: Seconds an upload may pause between two pieces of its body (a trickling client is cut off).
BODY_TIMEOUT = 30.0

#: Endpoints that run as jobs.
JOB_KINDS = ("explain", "visualize")


def static_file(name: str) -> bytes:
    """The bytes of a file shipped in ``convscope/server/static``."""
    return resources.files(__package__).joinpath("static", name).read_bytes()


def json_response(status: int, payload: dict[str, Any]) -> HttpResponse:
    body = json.dumps(payload, allow_nan=False).encode("utf-8")
    return HttpResponse(body, status, media_type="application/json; charset=utf-8")


def error(status: int, message: str) -> HttpResponse:
    return json_response(status, {"error": message})


def host_name(host: str) -> str:
    """``name`` of a ``Host`` header ``name:port`` (``[v6]:port`` -> ``v6``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware: Host check, cross-site refusal and token on ``/api/``, safety headers, log lines."""

    def __init__(self, app: ASGIApp, *, token: str | None, allowed_hosts: set[str], any_ip: bool, quiet: bool):
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.any_ip = any_ip
        self.quiet = quiet

    def refusal(self, scope: Scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        name = host_name(host)
        if not (name in self.allowed_hosts or (self.any_ip and is_ip(name))):
            return (f"requests must address this server by its own name, not {host or 'no host'!r} "
                    "(convscope serve --allow-host NAME adds one)")
        if not scope["path"].startswith(API_PREFIXES):
            return None
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request refused (Sec-Fetch-Site: {site}): the explorer answers its own page only"
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"{scope.get('scheme', 'http')}://{host}".lower():
            return f"cross-site request refused (Origin: {origin}): the explorer answers its own page only"
        if self.token is not None:
            given = headers.get(TOKEN_HEADER)
            if given is None:
                given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[-1]
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                return ("missing or wrong token: open the URL `convscope serve` printed (it ends in ?token=...), "
                        "or send the token as the X-Convscope-Token header")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_seen = [0]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
                headers = list(message.get("headers", []))
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                headers += [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                if ctype.startswith(b"text/html"):
                    headers.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            await error(403, refused)(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)
        if not self.quiet:
            client = scope.get("client") or ("-", 0)
            sys.stderr.write(f"convscope: {client[0]} \"{scope['method']} {scope['path']}\" {status_seen[0]} "
                             f"{1000 * (time.perf_counter() - start):.0f} ms\n")


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The bytes of the file part of a ``multipart/form-data`` body (``curl -F file=@x.png``), parsed in
    memory (never spooled to disk)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError("multipart upload without a boundary")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytearray] = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header.setdefault("field", bytearray()).extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header.setdefault("value", bytearray()).extend(data[start:end])

    def on_header_end() -> None:
        parts[-1]["headers"][bytes(header.get("field", b"")).lower()] = bytes(header.get("value", b""))
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].extend(data[start:end])

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:
        raise ApiError(f"malformed multipart upload: {exc}") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"filename" in disposition or disposition.get(b"name") in (b"file", b"image"):
            return bytes(part["data"])
    raise ApiError("multipart upload without a file: send it as -F file=@picture.png")


def build_app(explorer: Explorer | None, jobs: JobQueue | None, *, token: str | None, allowed_hosts: set[str],
              any_ip: bool = False, quiet: bool = False, atlas: AtlasStore | None = None) -> ASGIApp:
    """The ASGI application over ``explorer`` and its ``jobs`` queue, behind :class:`Guard`; with ``atlas``
    also the atlas's page and API under ``/atlas/``. ``explorer`` and ``jobs`` may be ``None`` (the atlas
    alone)."""
    if explorer is None and atlas is None:
        raise ValueError("build_app needs an explorer, an atlas or both")
    info_cache: list[bytes] = []

    def client_of(request: Request) -> str:
        return (request.headers.get(CLIENT_HEADER) or "")[:64]

    def params_of(request: Request) -> dict[str, list[str]]:
        params = parse_qs(request.url.query, keep_blank_values=True)
        params.pop("token", None)
        params.pop("budget", None)
        return params

    async def page(request: Request) -> HttpResponse:
        name, ctype = STATIC[request.url.path]
        return HttpResponse(static_file(name), media_type=ctype)

    async def static(request: Request) -> HttpResponse:
        found = STATIC.get(request.url.path)
        if found is None:
            return error(404, f"no such page: {request.url.path}")
        return HttpResponse(static_file(found[0]), media_type=found[1])

    async def info(request: Request) -> HttpResponse:
        if not info_cache:  # built at start by the server; here only for an app used on its own
            response = await run_in_threadpool(explorer.handle, "GET", "/api/info", {})
            if response.status != 200:
                return json_response(response.status, response.payload)
            info_cache.append(json.dumps(response.payload, allow_nan=False).encode("utf-8"))
        return HttpResponse(info_cache[0], media_type="application/json; charset=utf-8")

    async def read_body(request: Request, limit: int) -> bytes | HttpResponse:
        raw = request.headers.get("content-length")
        if raw is not None:
            try:
                length = int(raw)
            except ValueError:
                return error(400, f"bad Content-Length {raw!r}")
            if length > limit:
                if length <= DRAIN_FACTOR * limit:  # read it, so the client is not cut off mid-send
                    async for _ in request.stream():
                        pass
                return error(413, f"upload of {length:,} bytes is over the limit of {limit:,} bytes")
        body = bytearray()
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), BODY_TIMEOUT)
            except StopAsyncIteration:
                break
            except TimeoutError:
                return error(408, f"the upload stalled for {BODY_TIMEOUT:g} s")
            body += chunk
            if len(body) > limit:
                return error(413, f"upload over the limit of {limit:,} bytes")
        return bytes(body)

    async def upload(request: Request) -> HttpResponse:
        ctype = request.headers.get("content-type", "")
        multipart = ctype.lower().startswith("multipart/form-data")
        body = await read_body(request, explorer.max_upload + (64 * 1024 if multipart else 0))  # room for framing
        if isinstance(body, HttpResponse):
            return body
        if multipart:
            try:
                body = multipart_file(body, ctype)
            except ApiError as exc:
                return error(exc.status, str(exc))
        response = await run_in_threadpool(explorer.handle, "POST", "/api/image", params_of(request), body, client_of(request))
        return json_response(response.status, response.payload)

    def submit(request: Request, kind: str, budget: float | None = None) -> Any:
        try:
            return jobs.submit(kind, params_of(request), client_of(request), budget)
        except QueueFull as exc:
            return error(503, str(exc))

    async def run_now(request: Request) -> HttpResponse:
        """``GET /api/explain`` / ``/api/visualize``: a job, waited for; hanging up cancels it."""
        job = submit(request, request.url.path.rsplit("/", 1)[1])
        if isinstance(job, HttpResponse):
            return job
        while not job.ended.is_set():
            if await request.is_disconnected():
                jobs.cancel(job, "the client went away")
                return error(499, "cancelled: the client went away")
            job.last_seen = time.monotonic()
            await asyncio.sleep(0.02)
        if job.status == "cancelled":
            return error(409, f"cancelled: {job.reason or 'cancelled'}")
        return json_response(job.status_code, job.result or {"error": "no result"})

    async def job_submit(request: Request) -> HttpResponse:
        kind = (request.query_params.get("kind") or "").strip()
        if kind not in JOB_KINDS:
            return error(400, f"kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
        raw = request.query_params.get("budget")
        try:
            budget = None if raw in (None, "") else float(raw)
        except ValueError:
            budget = -1.0
        if budget is not None and not 0.1 <= budget <= 86400:
            return error(400, f"option 'budget' must be a float in 0.1..86400 (seconds), got {raw!r}")
        job = submit(request, kind, budget)
        if isinstance(job, HttpResponse):
            return job
        return json_response(202, job.to_json(jobs.position(job)))

    async def job_list(request: Request) -> HttpResponse:
        mine = jobs.jobs(client_of(request))
        return json_response(200, {"jobs": [j.to_json(jobs.position(j)) for j in mine if j.active], **jobs.busy()})

    def find(request: Request) -> Any:
        job = jobs.get(request.path_params["job"])
        if job is None:
            return error(404, f"no job {request.path_params['job']!r} (finished jobs are kept for a while only)")
        return job

    async def job_status(request: Request) -> HttpResponse:
        job = find(request)
        if isinstance(job, HttpResponse):
            return job
        return json_response(200, job.to_json(jobs.position(job)))

    async def job_cancel(request: Request) -> HttpResponse:
        job = find(request)
        if isinstance(job, HttpResponse):
            return job
        jobs.cancel(job, "cancelled by the user")
        return json_response(200, job.to_json(jobs.position(job)))

    async def api(request: Request) -> HttpResponse:
        if request.method not in ("GET", "POST", "HEAD"):
            path = request.url.path
            known = path in explorer.paths()
            return error(405 if known else 404, f"{path} does not take {request.method}" if known else f"no such endpoint: {path}")
        if request.method == "POST":
            await read_body(request, explorer.max_upload)
        response: Response = await run_in_threadpool(explorer.handle, request.method, request.url.path,
                                                     params_of(request), b"", client_of(request))
        return json_response(response.status, response.payload)

    async def not_found(request: Request) -> HttpResponse:
        return error(404, f"no such page: {request.url.path}")

    async def to_atlas(request: Request) -> HttpResponse:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"/atlas/{query}", status_code=307)

    async def no_model(request: Request) -> HttpResponse:
        return error(404, f"no model is served here ({request.url.path}): this server shows an atlas only, "
                          "at /atlas/ (convscope serve --atlas ATLAS --model M serves both)")

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/index.html", page, methods=["GET"]),
        Route("/static/{name:path}", static, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/image", upload, methods=["POST"]),
        Route("/api/explain", run_now, methods=["GET"]),
        Route("/api/visualize", run_now, methods=["GET"]),
        Route("/api/jobs", job_submit, methods=["POST"]),
        Route("/api/jobs", job_list, methods=["GET"]),
        Route("/api/jobs/{job}", job_status, methods=["GET"]),
        Route("/api/jobs/{job}", job_cancel, methods=["DELETE"]),
        Route("/api/jobs/{job}/cancel", job_cancel, methods=["POST"]),
        Route("/api/{rest:path}", api, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    ]
    if explorer is None:
        routes = [Route("/", to_atlas, methods=["GET"]), Route("/index.html", to_atlas, methods=["GET"]),
                  Route("/api/{rest:path}", no_model, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])]
    if atlas is not None:
        routes += atlas_routes(atlas)
    routes.append(Route("/{rest:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))

    async def method_not_allowed(request: Request, exc: Exception) -> HttpResponse:
        status = getattr(exc, "status_code", 500)
        return error(status, f"{request.url.path} does not take {request.method}" if status == 405 else
                     (getattr(exc, "detail", None) or "error"))

    app = Starlette(routes=routes, exception_handlers={405: method_not_allowed, 404: method_not_allowed})
    app.state.info_cache = info_cache
    return Guard(app, token=token, allowed_hosts=allowed_hosts, any_ip=any_ip, quiet=quiet)


def warm_info(app: ASGIApp, explorer: Explorer) -> None:
    """Build ``/api/info`` once now (under the model lock), so it never waits for a running job later."""
    inner: Callable[..., Any] | Any = getattr(app, "app", app)
    response = explorer.handle("GET", "/api/info", {})
    if response.status == 200:
        inner.state.info_cache[:] = [json.dumps(response.payload, allow_nan=False).encode("utf-8")]
