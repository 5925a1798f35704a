"""Bounds of the settings the synthesis methods share, declared once for the API and the command line.

The library checks keyword values with :meth:`~convscope.options.Option.check`; the CLI uses
:meth:`~convscope.options.Option.argtype`, so a value out of range gets the same message naming the
option and its range wherever it comes from.
"""

from __future__ import annotations

from ..options import INT_LIMIT, Option

#: Side of a synthesised image in pixels (16 px: the smallest the transforms and octaves handle).
SIZE = Option(int, None, "image side in pixels", minimum=16, maximum=4096)
#: Optimisation steps (the CLI asks for at least one; the API also takes 0 where a method allows it).
STEPS = Option(int, None, "optimisation steps", minimum=1, maximum=1_000_000)
#: Seed of every random draw of a method.
SEED = Option(int, 0, "random seed (same seed, same picture)", minimum=0, maximum=INT_LIMIT)
#: Learning rates and step sizes of the optimisers.
LR = Option(float, None, "learning rate", minimum=1e-12, maximum=1e3)
#: Images optimised together.
BATCH = Option(int, 1, "images optimised together", minimum=1, maximum=1024)
#: Loss weights (style, content, total variation, ...).
WEIGHT = Option(float, None, "loss weight", minimum=0.0, maximum=1e20)


def check_size(size: int | tuple[int, int] | None, owner: str) -> tuple[int, int] | None:
    """``size`` (an int or (H, W)) as (H, W), each side checked against :data:`SIZE`; ``None`` passes."""
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
    return SIZE.check("size", int(h), owner), SIZE.check("size", int(w), owner)
