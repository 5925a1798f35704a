"""Fixtures shared by the whole suite: the built-in model is loaded once per session."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import convscope as cs


@pytest.fixture(scope="session")
def builtin() -> cs.Model:
    torch.manual_seed(0)
    return cs.load_model()


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    return cs.sample_image("chelsea")
