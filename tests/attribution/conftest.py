"""Fixtures of the attribution tests: models built once per session (the built-in one comes from the
top-level conftest), small random-weight torchvision models and a tiny network with every activation
kind the backward rules must handle (in-place ReLU, ReLU6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs


@pytest.fixture(scope="session")
def chelsea_x(builtin: cs.Model, chelsea) -> torch.Tensor:
    return builtin.preprocess(chelsea)


@pytest.fixture(scope="session")
def resnet_random() -> torch.nn.Module:
    torch.manual_seed(0)
    return cs.load_model("resnet18", weights=None).module


@pytest.fixture(scope="session")
def vgg_random() -> torch.nn.Module:
    torch.manual_seed(0)
    return cs.load_model("vgg11", weights=None).module


@pytest.fixture(scope="session")
def small_x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=g)


class TinyNet(nn.Module):
    """conv-BN-ReLU(inplace) -> conv-ReLU6(inplace) -> conv -> GAP -> linear: 10 classes, any input size."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.ReLU6(inplace=True),
            nn.Conv2d(12, 16, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture()
def tiny() -> TinyNet:
    torch.manual_seed(3)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics
        net.features[1].running_mean.uniform_(-0.2, 0.2)
        net.features[1].running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="session")
def tiny_x() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 32, 32, generator=g)
