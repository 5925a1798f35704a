"""``convscope serve``: the web explorer on http://127.0.0.1:8000/ (see :mod:`convscope.server`).

Loads the model once, prints ``convscope: serving http://HOST:PORT/?token=TOKEN`` on stderr and serves
until Ctrl-C. ``--port 0`` takes any free port. The token is random per launch and every API request
must carry it (the page takes it from its URL, as Jupyter does). Binding to another address than the
loopback one exposes the model to the network (a warning says so); the Host check stays on, with the
machine's own names, any IP address and ``--allow-host NAME`` accepted.

``--atlas ATLAS`` serves an atlas folder (``convscope atlas build``) under ``/atlas/``: model page, layer
pages, unit pages, activation atlases and the layer view of an image, all read from the atlas's index.
Alone it serves the atlas only (no model is loaded; ``/`` redirects to ``/atlas/``); with ``--model M``
too, the explorer of M stays at ``/`` beside it.
"""

from __future__ import annotations

import argparse
import ipaddress

from ..atlas.store import AtlasStore
from ..errors import ConvscopeError
from ..options import bounded
from ..server import make_server
from .common import info, load_model_from_args

ORDER = 60


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        parents=parents,
        help="web explorer: predictions, explanations, feature maps and visualisations in the browser",
        description="Serve the web explorer for the chosen model on http://HOST:PORT/ until Ctrl-C.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=bounded(int, 0, 65535, name="--port"), default=8000,
                   help="TCP port, 0..65535 (default 8000; 0: any free port)")
    p.add_argument("--max-upload-mb", type=bounded(float, 0.001, 4096, name="--max-upload-mb"), default=20.0, metavar="MB",
                   help="largest image upload accepted, in megabytes, 0.001..4096 (default 20)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests addressed to this host name (repeatable; e.g. a name behind a proxy)")
    p.add_argument("--atlas", default=None, metavar="ATLAS",
                   help="also serve this atlas folder (convscope atlas build) under /atlas/; alone, without "
                        "--model, it serves the atlas only")
    p.add_argument("--quiet", action="store_true", help="do not log every request on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    atlas = AtlasStore(args.atlas) if args.atlas else None  # an unusable folder is refused before anything loads
    model = None
    if atlas is None or args.model is not None:
        model = load_model_from_args(args)
        model.layers()  # the layer table once now, so the first page load is quick
    try:
        server = make_server(model, args.host, args.port, quiet=args.quiet, allow_hosts=args.allow_host,
                             max_upload=int(args.max_upload_mb * 1024 * 1024), atlas=atlas)
    except OSError as exc:
        raise ConvscopeError(f"cannot serve on {args.host}:{args.port} ({exc.strerror or exc})") from None
    if not _is_loopback(server.host):
        info(f"convscope: warning: listening on {server.host}, reachable from other machines; anyone with the "
             "token in the URL can use the model")
    info(f"convscope: serving {server.url}")
    if model is not None and server.atlas_url:
        info(f"convscope: atlas at {server.atlas_url}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        info("convscope: stopped")
    finally:
        server.stop(timeout=5)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
