"""The atlas: a browsable, Microscope-like atlas of a model's units and layers, built by the dataset engine.

- :mod:`.store`: the atlas folder (SQLite index + picture files) and its read API for pages.
- :mod:`.build`: :func:`build_atlas`, the resumable, incremental build.
"""

from __future__ import annotations

from .build import ActivationSample, BuildError, build_atlas, grouped_diversity, icon_objective
from .store import AtlasError, AtlasStore

__all__ = ["ActivationSample", "AtlasError", "AtlasStore", "BuildError", "build_atlas", "grouped_diversity",
           "icon_objective"]
