"""The web explorer behind ``convscope serve``: one page over the library's capabilities.

uvicorn serves a Starlette application (:mod:`convscope.server.app`): a self-contained page
(``static/``: HTML, vanilla JavaScript and CSS, nothing from the network) and a JSON API: model facts and
layers, image upload (raw bytes or multipart), prediction, attribution with every registered method,
feature maps, channel responses, filters and feature visualisation. Long calls are jobs with ids,
progress and cancel (:mod:`convscope.server.jobs`). The endpoints are documented in
:mod:`convscope.server.api` and :mod:`convscope.server.app`; the server is :mod:`convscope.server.httpd`.

```python
import convscope as cs
from convscope.server import make_server

server = make_server(cs.load_model(), port=0)   # 127.0.0.1, any free port
server.start(); print(server.url)                # background thread; the URL carries the token
...
server.stop()
```

The server binds to 127.0.0.1 unless told otherwise and requires a random per-launch token on every API
call; it refuses cross-site requests and requests addressed by a foreign host name, closes connections
that send nothing, loads the model once, runs every model call under one lock (long ones in one job
worker), checks an upload's decoded size from its header before decoding it, decodes a few at a time,
and only ever decodes uploads as images (never unpickles them).
"""

from __future__ import annotations

from .api import (
    MAX_DECODED_BYTES,
    MAX_IMAGES,
    MAX_SIZE,
    MAX_STEPS,
    MAX_UPLOAD_BYTES,
    ApiError,
    Explorer,
    Response,
)
from .app import build_app
from .httpd import ExplorerServer, make_server
from .jobs import Job, JobCancelled, JobQueue

__all__ = [
    "MAX_DECODED_BYTES",
    "MAX_IMAGES",
    "MAX_SIZE",
    "MAX_STEPS",
    "MAX_UPLOAD_BYTES",
    "ApiError",
    "Explorer",
    "ExplorerServer",
    "Job",
    "JobCancelled",
    "JobQueue",
    "Response",
    "build_app",
    "make_server",
]
