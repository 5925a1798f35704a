"""The one check that convscope left a user's model exactly as it was (used by every test folder).

``snapshot`` records weights and buffers (as bytes), train/eval flags, in-place flags, ``requires_grad``,
gradients (the same tensor object with the same values) and the number of hooks of every kind;
``assert_untouched`` compares and also requires that no forward/backward hook is left anywhere.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

#: Hooks convscope may register while it works: none may survive a call.
CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
#: Every hook dictionary whose size must not change.
ALL_HOOKS = CALL_HOOKS + ("_state_dict_hooks", "_load_state_dict_pre_hooks")


def snapshot(module: nn.Module) -> dict:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return {
        "state": buf.getvalue(),
        "training": [m.training for m in module.modules()],
        "inplace": [getattr(m, "inplace", None) for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in module.parameters()],
        "hooks": [(type(m).__name__, name, len(getattr(m, name, {}))) for m in module.modules() for name in ALL_HOOKS],
    }


def assert_untouched(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["state"] == before["state"], "weights or buffers changed"
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["inplace"] == before["inplace"], "in-place flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    for (grad, _), (old, values) in zip(after["grads"], before["grads"]):
        assert grad is old, ".grad replaced"
        assert values is None or torch.equal(grad, values), ".grad values changed"
    assert after["hooks"] == before["hooks"], "hooks added or removed"
    left = [(kind, name) for kind, name, n in after["hooks"] if name in CALL_HOOKS and n]
    assert not left, f"hooks left behind: {left[:3]}"


@contextlib.contextmanager
def untouched(module: nn.Module):
    """``with untouched(module): ...`` fails if the block changed the module (checked also after an error)."""
    before = snapshot(module)
    try:
        yield
    finally:
        assert_untouched(module, before)
