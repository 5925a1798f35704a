"""Fixtures for the inspection views: a tiny model with known layers, a random VGG-16, a state checker."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import convscope as cs
import statecheck


def tiny_module() -> nn.Sequential:
    """conv1 (3->8, 3x3) - ReLU - dw (depthwise 8, 3x3) - ReLU - conv2 (8->6, stride 2) - ReLU - pool - fc (6->4)."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            relu1=nn.ReLU(inplace=True),
            dw=nn.Conv2d(8, 8, 3, padding=1, groups=8),
            relu2=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(8, 6, 3, stride=2, padding=1),
            relu3=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 4),
        )
    )


@pytest.fixture
def tiny() -> cs.Model:
    return cs.load_model(tiny_module(), input_size=32, labels=["a", "b", "c", "d"])


@pytest.fixture(scope="session")
def vgg() -> cs.Model:
    torch.manual_seed(0)
    return cs.load_model("vgg16", weights=None)


@pytest.fixture
def untouched():
    """``with untouched(module): ...`` fails if the block changed weights, modes, flags or left hooks."""
    return statecheck.untouched
