"""Fixtures for the atlas page tests: a synthetic atlas (no model, no build) and a server showing it."""

from __future__ import annotations

import atlaskit
import pytest

from convscope.atlas.store import AtlasStore
from convscope.server import make_server


@pytest.fixture(scope="session")
def synthetic_atlas(tmp_path_factory) -> AtlasStore:
    """An atlas folder filled by :func:`atlaskit.fill_synthetic_atlas` (2 layers, pictures, hits, cells, flows)."""
    return atlaskit.fill_synthetic_atlas(tmp_path_factory.mktemp("atlas") / "atlas")


@pytest.fixture(scope="module")
def atlas_server(synthetic_atlas):
    """The atlas alone (no model) on a free port of 127.0.0.1."""
    s = make_server(None, port=0, quiet=True, atlas=synthetic_atlas)
    s.start()
    yield s
    s.stop()
