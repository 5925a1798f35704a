"""The HTTP layer of the web explorer: Python's ``http.server`` in threads, the page, and the JSON API.

``GET /`` is the page (``static/index.html``), ``GET /static/NAME`` its script and style sheet, and
``/api/...`` the endpoints of :mod:`convscope.server.api`. Every error is JSON ``{"error": "..."}``,
also those ``http.server`` raises itself (malformed requests, unsupported methods). Nothing outside
the package folder ``static/`` is ever served, and no request reaches the file system otherwise.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import __version__
from .api import Explorer, Response

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

#: An oversized upload is read and thrown away up to this many times the limit (so the client gets
#: its 413 instead of a broken connection); beyond that the connection is simply closed.
DRAIN_FACTOR = 4


def static_file(name: str) -> bytes:
    """The bytes of a file shipped in ``convscope/server/static``."""
    return resources.files(__package__).joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    """One request: static file, or JSON API call answered by the server's :class:`Explorer`."""

    server: ExplorerServer
    server_version = f"convscope/{__version__}"
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads to wait for

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, response: Response) -> None:
        body = json.dumps(response.payload, allow_nan=False).encode("utf-8")
        self._send(response.status, body, "application/json; charset=utf-8")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """``http.server``'s own errors (bad request line, unsupported method ...) as JSON too."""
        try:
            self.close_connection = True
            text = message or self.responses.get(code, ("error",))[0]
            self._json(Response(code, {"error": str(text).splitlines()[0] if text else "error"}))
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            sys.stderr.write(f"convscope: {self.address_string()} {format % args}\n")

    # ------------------------------------------------------------------ methods
    def _host_refused(self) -> bool:
        """Answer 403 when the ``Host`` header names another host than the one served (a DNS-rebinding
        page in the user's browser would send its own name); any host is fine on a wildcard address."""
        allowed = self.server.allowed_hosts()
        if allowed is None:
            return False
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]") in allowed:
            return False
        self.close_connection = True
        self._json(Response(403, {"error": f"requests must address this server by its own name, not {host or 'no host'!r}"}))
        return True

    def _static(self, path: str) -> bool:
        """Send the page file at ``path`` (a HEAD gets its headers only); False when ``path`` is none."""
        if path not in STATIC:
            return False
        name, content_type = STATIC[path]
        self._send(200, static_file(name), content_type)
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._host_refused():
            return
        url = urlsplit(self.path)
        if self._static(url.path):
            return
        if url.path.startswith("/api/"):
            self._json(self.server.explorer.handle("GET", url.path, parse_qs(url.query, keep_blank_values=True)))
        else:
            self._json(Response(404, {"error": f"no such page: {url.path}"}))

    def do_HEAD(self) -> None:  # noqa: N802
        if self._host_refused():
            return
        url = urlsplit(self.path)
        if not self._static(url.path):
            self._json(Response(404 if url.path not in self.server.explorer.paths() else 405,
                                {"error": f"HEAD is only for the page, not {url.path}"}))

    def do_POST(self) -> None:  # noqa: N802
        if self._host_refused():
            return
        url = urlsplit(self.path)
        explorer = self.server.explorer
        params = parse_qs(url.query, keep_blank_values=True)
        body = self._read_body(explorer.max_upload)  # read even for a wrong path: unread data resets the connection
        if body is not None:
            self._json(explorer.handle("POST", url.path, params, body))

    def _read_body(self, limit: int) -> bytes | None:
        """The request body, or None after answering 411/413 for a missing length or an oversized body."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._json(Response(411, {"error": "send the upload with a Content-Length (chunked bodies are not accepted)"}))
            return None
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else 0
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._json(Response(400, {"error": f"bad Content-Length {raw!r}"}))
            return None
        if length > limit:
            self.close_connection = True
            if length <= DRAIN_FACTOR * limit:  # read it, so the client is not cut off mid-send
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
            self._json(Response(413, {"error": f"upload of {length:,} bytes is over the limit of {limit:,} bytes"}))
            return None
        return self.rfile.read(length) if length else b""


class ExplorerServer(ThreadingHTTPServer):
    """A threaded HTTP server answering with one :class:`Explorer` (one model).

    ``port=0`` picks a free port (:attr:`url` tells which). Serve with :meth:`serve_forever` in the
    calling thread (Ctrl-C stops it; then call :meth:`server_close`), or :meth:`start` in a background
    thread and :meth:`stop`.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = False):
        self.explorer = explorer
        self.quiet = quiet
        self._thread: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def host(self) -> str:
        return str(self.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def allowed_hosts(self) -> set[str] | None:
        """Host names a request may address this server by (``None``: any, on a wildcard address)."""
        if self.host in ("0.0.0.0", "::", ""):
            return None
        return {"localhost", "127.0.0.1", "::1", self.host.lower()}

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def process_request(self, request: Any, client_address: Any) -> None:
        """One named daemon thread per request, tracked so :meth:`stop` can wait for it."""
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name=f"convscope-request-{self.port}", daemon=True)
        with self._workers_lock:
            self._workers.add(t)
        t.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

    def threads(self) -> list[threading.Thread]:
        """The threads of this server still alive: the serving thread and requests in flight."""
        with self._workers_lock:
            found = [t for t in self._workers if t.is_alive()]
        if self._thread is not None and self._thread.is_alive():
            found.append(self._thread)
        return found

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, notebooks); :meth:`stop` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"convscope-server-{self.port}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving, close the socket, and wait for the serving thread and for requests in flight
        (at most ``timeout`` seconds for those: a long visualisation is not cut off, nor waited for forever)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        with self._workers_lock:
            workers = list(self._workers)
        deadline = time.monotonic() + timeout
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))


def make_server(model: Any, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = False, **options: Any) -> ExplorerServer:
    """An :class:`ExplorerServer` for ``model`` (a :class:`~convscope.Model`), bound but not yet serving.

    ``options`` go to :class:`Explorer` (``max_upload``, ``max_images``).
    """
    return ExplorerServer(Explorer(model, **options), host, port, quiet=quiet)
