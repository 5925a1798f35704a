"""Fixtures for the synthesis tests: the built-in model once per session, a tiny random CNN, a state checker."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs
import statecheck


@pytest.fixture(scope="session")
def model():
    return cs.load_model()


class Tiny(nn.Module):
    """A small CNN with named layers: conv1 (8 ch) -> relu1 -> conv2 (16 ch, /2) -> relu2 -> pool -> fc (10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


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
