"""The web explorer behind ``convscope serve``: one page over the library's capabilities.

A standard-library HTTP server (:class:`http.server.ThreadingHTTPServer`) serves a self-contained
page (``static/``: HTML, vanilla JavaScript and CSS, nothing from the network) and a JSON API: model
facts and layers, image upload, prediction, attribution with every registered method, feature maps,
channel responses, filters and feature visualisation. The endpoints are documented in
:mod:`convscope.server.api`; the HTTP layer is :mod:`convscope.server.httpd`.

```python
import convscope as cs
from convscope.server import make_server

server = make_server(cs.load_model(), port=0)   # 127.0.0.1, any free port
server.start(); print(server.url)                # background thread
...
server.stop()
```

The server binds to 127.0.0.1 unless told otherwise, has no authentication, loads the model once,
runs every model call under one lock and only ever decodes uploads as images (never unpickles them).
"""

from __future__ import annotations

from .api import MAX_IMAGES, MAX_SIZE, MAX_STEPS, MAX_UPLOAD_BYTES, ApiError, Explorer, Response
from .httpd import ExplorerServer, make_server

__all__ = [
    "MAX_IMAGES",
    "MAX_SIZE",
    "MAX_STEPS",
    "MAX_UPLOAD_BYTES",
    "ApiError",
    "Explorer",
    "ExplorerServer",
    "Response",
    "make_server",
]
