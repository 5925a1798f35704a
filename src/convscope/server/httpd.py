"""The HTTP server of the web explorer: uvicorn serving :mod:`convscope.server.app`, in a thread or not.

:class:`ExplorerServer` binds its socket at once (``port=0``: any free port; :attr:`~ExplorerServer.url`
tells which, with the per-launch token), with a large listen backlog, and serves with uvicorn's h11
protocol plus a timeout for connections that never send a whole request head (idle keep-alive
connections are closed by uvicorn after ``timeout_keep_alive``). Model work runs in the job queue's one
worker thread (:mod:`convscope.server.jobs`), so no connection ever waits on a thread of its own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..atlas.store import AtlasStore
from .api import Explorer
from .app import build_app, warm_info
from .jobs import ABANDON_AFTER, MAX_QUEUED, JobQueue

#: Seconds a connection may take to send a complete request head (slow or silent clients are closed).
REQUEST_TIMEOUT = 10.0
#: Seconds an idle keep-alive connection is kept.
KEEP_ALIVE_TIMEOUT = 5
#: Pending connections the kernel queues before the server accepts them.
BACKLOG = 2048
#: Connections and requests served at once; beyond, uvicorn answers 503 at once.
MAX_CONNECTIONS = 900


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a full request head within
    :attr:`request_timeout` seconds of connecting (uvicorn itself would keep it open forever)."""

    request_timeout: float = REQUEST_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.request_timeout, self._head_timeout)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class ExplorerServer:
    """The explorer over one :class:`Explorer` (one model), and/or an atlas (``atlas``: an
    :class:`~convscope.atlas.store.AtlasStore`, served under ``/atlas/``), served by uvicorn.

    Serve with :meth:`serve_forever` in the calling thread (Ctrl-C stops it), or :meth:`start` in a
    background thread and :meth:`stop`. ``token``: the secret every API request must carry (``None``: a
    random one per launch; ``""``: none, for embedding behind another guard only). ``allow_hosts``: more
    host names the ``Host`` header may carry (the machine's own names are always allowed; on a wildcard
    address, so is any IP address).
    """

    def __init__(self, explorer: Explorer | None, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = False,
                 token: str | None = None, allow_hosts: Iterable[str] = (), request_timeout: float = REQUEST_TIMEOUT,
                 backlog: int = BACKLOG, max_queued: int = MAX_QUEUED, abandon_after: float = ABANDON_AFTER,
                 atlas: AtlasStore | None = None):
        if explorer is None and atlas is None:
            raise ValueError("a server needs a model's explorer, an atlas or both")
        self.explorer = explorer
        self.atlas = atlas
        self.quiet = quiet
        self.token = secrets.token_urlsafe(24) if token is None else (token or None)
        self.extra_hosts = {h.strip().lower() for h in allow_hosts if h.strip()}
        self.socket = _bind(host, port, backlog)
        self.server_address = self.socket.getsockname()[:2]
        self.jobs = None if explorer is None else JobQueue(self._run_job, max_queued=max_queued,
                                                           abandon_after=abandon_after, name=f"convscope-jobs-{self.port}")
        self.app = build_app(explorer, self.jobs, token=self.token, allowed_hosts=self.allowed_hosts(),
                             any_ip=self.wildcard, quiet=quiet, atlas=atlas)
        if explorer is not None:
            warm_info(self.app, explorer)
        protocol = type("ExplorerH11Protocol", (TimedH11Protocol,), {"request_timeout": float(request_timeout)})
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", log_config=None, access_log=False,
                                log_level="error" if quiet else "warning", timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                                backlog=backlog, limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=2,
                                server_header=False)
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._closed = False

    def _run_job(self, job: Any) -> tuple[int, dict[str, Any]]:
        assert self.explorer is not None
        response = self.explorer.handle("GET", f"/api/{job.kind}", job.params, client=job.client)
        return response.status, response.payload

    # ------------------------------------------------------------------ addresses
    @property
    def host(self) -> str:
        return str(self.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::", "")

    def allowed_hosts(self) -> set[str]:
        """Host names a request may address this server by (on a wildcard address also any IP address)."""
        names = {"localhost", "127.0.0.1", "::1", self.host.lower()} | self.extra_hosts
        if self.wildcard:
            for name in (socket.gethostname(), socket.getfqdn()):
                if name:
                    names.add(name.lower())
        return names

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.wildcard:
            host = "127.0.0.1"
        return f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """The address to open, with the token (``http://HOST:PORT/?token=...``; the atlas's page
        ``.../atlas/?token=...`` when no model is served)."""
        return self.base_url + ("atlas/" if self.explorer is None else "") + (f"?token={self.token}" if self.token else "")

    @property
    def atlas_url(self) -> str | None:
        """The atlas's page with the token (``http://HOST:PORT/atlas/?token=...``), or None without an atlas."""
        if self.atlas is None:
            return None
        return self.base_url + "atlas/" + (f"?token={self.token}" if self.token else "")

    # ------------------------------------------------------------------ serving
    def serve_forever(self) -> None:
        """Serve in the calling thread until Ctrl-C (uvicorn re-raises it as KeyboardInterrupt after
        closing the connections) or :meth:`shutdown`."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            if self.jobs is not None:
                self.jobs.close()

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, notebooks); :meth:`stop` ends it."""
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                        name=f"convscope-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.uvicorn.started:
            raise RuntimeError("the explorer's server did not start")
        return self._thread

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: cancel the jobs, close the connections and the socket, wait for the threads."""
        if self.jobs is not None:
            self.jobs.close(timeout)
        if self._thread is not None:
            self.uvicorn.should_exit = True
            self._thread.join(timeout)
            self._thread = None
        self.server_close()

    def server_close(self) -> None:
        if not self._closed:
            self._closed = True
            self.socket.close()
            if self.jobs is not None:
                self.jobs.close()

    def threads(self) -> list[threading.Thread]:
        """The threads of this server still alive: the serving thread and the job worker."""
        worker = None if self.jobs is None else self.jobs.thread
        found = [t for t in (self._thread, worker) if t is not None and t.is_alive()]
        return found


def make_server(model: Any, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = False,
                token: str | None = None, allow_hosts: Iterable[str] = (), request_timeout: float = REQUEST_TIMEOUT,
                max_queued: int = MAX_QUEUED, abandon_after: float = ABANDON_AFTER,
                atlas: str | os.PathLike | AtlasStore | None = None, **options: Any) -> ExplorerServer:
    """An :class:`ExplorerServer` for ``model`` (a :class:`~convscope.Model`), bound but not yet serving.

    ``atlas``: an atlas folder (or its :class:`~convscope.atlas.store.AtlasStore`) to serve under ``/atlas/``;
    with an atlas, ``model`` may be ``None`` (the atlas alone, no explorer). ``options`` go to :class:`Explorer`
    (``max_upload``, ``max_images``); the others to :class:`ExplorerServer`.
    """
    store = atlas if atlas is None or isinstance(atlas, AtlasStore) else AtlasStore(atlas)
    explorer = None if model is None else Explorer(model, **options)
    return ExplorerServer(explorer, host, port, quiet=quiet, token=token, allow_hosts=allow_hosts,
                          request_timeout=request_timeout, max_queued=max_queued, abandon_after=abandon_after,
                          atlas=store)
