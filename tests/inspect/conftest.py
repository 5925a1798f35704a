"""Fixtures for the inspection views: a tiny model with known layers, a random VGG-16, a state checker."""

from __future__ import annotations

import io
from collections import OrderedDict
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import convscope as cs

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


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


def _snapshot(module: nn.Module) -> dict:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return {
        "state": buf.getvalue(),
        "training": [m.training for m in module.modules()],
        "inplace": [getattr(m, "inplace", None) for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [id(p.grad) if p.grad is not None else None for p in module.parameters()],
        "hooks": [len(getattr(m, name)) for m in module.modules() for name in HOOK_DICTS],
    }


@pytest.fixture
def untouched():
    """``with untouched(module): ...`` fails if the block changed weights, modes, flags or left hooks."""

    @contextmanager
    def check(module: nn.Module):
        before = _snapshot(module)
        yield
        after = _snapshot(module)
        for key in before:
            assert after[key] == before[key], f"model {key} changed"
        assert all(n == 0 for n in after["hooks"]), "hooks left behind"

    return check
