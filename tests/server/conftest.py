"""Fixtures for the web explorer tests: servers in background threads on free ports, and an HTTP client."""

from __future__ import annotations

import pytest
import serverkit

import convscope as cs
from convscope.server import make_server


@pytest.fixture(scope="module")
def tiny() -> cs.Model:
    return serverkit.tiny_model()


@pytest.fixture(scope="module")
def server(tiny):
    s = make_server(tiny, port=0, quiet=True)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> serverkit.Client:
    return serverkit.Client(server.url)


@pytest.fixture(scope="session")
def builtin_server(builtin):
    s = make_server(builtin, port=0, quiet=True)
    s.start()
    yield s
    s.stop()
