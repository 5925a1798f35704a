"""The network a synthesis method optimises against: module, input normalisation, class names, device.

Every synthesis method works on images in pixel space ([0, 1], RGB) and feeds the network through
:meth:`Network.normalize` (the model's own mean/std). :func:`network` accepts a convscope
:class:`~convscope.Model` or a plain ``nn.Module`` (with explicit ``mean``/``std``; default: identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError
from ..probe import module_device, module_of


class NotDifferentiableError(ConvscopeError, RuntimeError):
    """The model's output (or a requested activation) does not depend differentiably on its input."""


@dataclass
class Network:
    """A module plus the facts synthesis needs: normalisation, labels, input size and device."""

    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: list[str] | None
    input_size: tuple[int, int]
    model: Any = None

    @property
    def device(self) -> torch.device:
        return module_device(self.module)

    @property
    def dtype(self) -> torch.dtype:
        for t in self.module.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (N, 3, H, W) -> the model's input space: (p - mean) / std."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input space -> pixel values (not clipped): x * std + mean."""
        mean, std = self._stats(x)
        return x * std + mean

    def pixel_scale(self, ref: torch.Tensor) -> torch.Tensor:
        """``std`` as a (1, 3, 1, 1) tensor: one input-space unit is ``std`` pixel units."""
        return self._stats(ref)[1]

    def class_index(self, target: int | str) -> int:
        """A class index from an int or a label; out of range gives a :class:`~convscope.TargetError`."""
        from ..models.model import resolve_class

        if self.labels is None:
            if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
                raise ConvscopeError(f"class {target!r}: this model has no class names, use an index")
            return int(target)  # checked against the output width when the logits are seen
        return resolve_class(target, self.labels)


def network(
    model: Any,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | tuple[int, int] | None = None,
) -> Network:
    """Wrap a :class:`~convscope.Model` or an ``nn.Module`` (then ``mean``/``std`` default to 0/1)."""
    if isinstance(model, Network):
        return model
    module = module_of(model)
    is_model = not isinstance(model, nn.Module)
    m = tuple(mean) if mean is not None else (tuple(model.mean) if is_model else (0.0, 0.0, 0.0))
    s = tuple(std) if std is not None else (tuple(model.std) if is_model else (1.0, 1.0, 1.0))
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ConvscopeError("mean and std need three values each, std positive")
    labels = list(model.labels) if is_model else None
    if input_size is None:
        input_size = tuple(model.input_size) if is_model else (224, 224)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    return Network(module, m, s, labels, (int(input_size[0]), int(input_size[1])), model if is_model else None)
