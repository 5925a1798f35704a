"""Helpers for the web explorer tests: a tiny model, an HTTP client (urllib), PNG bytes in and out."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
from PIL import Image

import convscope as cs
from testkit import Tiny


def tiny_model() -> cs.Model:
    torch.manual_seed(0)
    return cs.load_model(Tiny().eval(), input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                         labels=[f"thing {i}" for i in range(10)], device="cpu")


@dataclass
class Answer:
    status: int
    data: Any
    headers: Any


class Client:
    """urllib against one server; JSON answers decoded, HTTP errors returned (not raised). ``url``: what
    the server printed; its ``?token=`` is sent as the X-Convscope-Token header. ``client``: the
    X-Convscope-Client header (whose uploads)."""

    def __init__(self, url: str, client: str = "", token: str | None = None):
        parts = urlsplit(url)
        self.url = f"{parts.scheme}://{parts.netloc}/"
        self.token = token if token is not None else (parse_qs(parts.query).get("token") or [""])[0]
        self.client = client

    def request(self, path: str, body: bytes | None = None, method: str | None = None, timeout: float = 60,
                headers: dict[str, str] | None = None, content_type: str = "application/octet-stream") -> Answer:
        req = urllib.request.Request(self.url + path.lstrip("/"), data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("X-Convscope-Token", self.token)
        if self.client:
            req.add_header("X-Convscope-Client", self.client)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status, headers = r.read(), r.status, r.headers
        except urllib.error.HTTPError as e:
            raw, status, headers = e.read(), e.code, e.headers
        ctype = headers.get("Content-Type", "")
        return Answer(status, json.loads(raw) if ctype.startswith("application/json") else raw, headers)

    def get(self, path: str) -> Answer:
        return self.request(path)

    def post(self, path: str, body: bytes) -> Answer:
        return self.request(path, body=body, method="POST")


def png_bytes(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    """A random RGB picture as PNG file bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode(uri: str) -> Image.Image:
    """A ``data:image/png;base64,...`` URI as a loaded PIL image (fails unless it is a real PNG)."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):])))
    assert img.format == "PNG"
    img.load()
    return img
