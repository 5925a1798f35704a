"""Snapshot of everything convscope promises not to change in a user's model, and its comparison."""

from __future__ import annotations

import io

import torch
from torch import nn

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def snapshot(module: nn.Module) -> dict:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return {
        "state": buf.getvalue(),
        "training": [m.training for m in module.modules()],
        "inplace": [getattr(m, "inplace", None) for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [p.grad for p in module.parameters()],
        "hooks": [(name, len(getattr(m, name, {}))) for m in module.modules() for name in HOOK_DICTS],
    }


def assert_untouched(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["state"] == before["state"], "weights or buffers changed"
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["inplace"] == before["inplace"], "in-place flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    assert all(a is b for a, b in zip(after["grads"], before["grads"])), ".grad changed"
    assert after["hooks"] == before["hooks"], "hooks left behind"
