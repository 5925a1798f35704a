"""Fixtures for the synthesis tests: the built-in model once per session, a tiny random CNN, a state checker."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs
import statecheck
from testkit import Tiny


@pytest.fixture(scope="session")
def model():
    return cs.load_model()


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


class Detached(nn.Module):
    """A model that cuts the autograd graph at its input (not differentiable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.detach()).mean((2, 3))


@pytest.fixture(scope="session")
def detached():
    return Detached().eval()


@pytest.fixture
def untouched():
    """``with untouched(module): ...`` checks the module is unchanged afterwards (also after an error)."""
    return statecheck.untouched
