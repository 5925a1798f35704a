"""The network a synthesis method optimises against: a :class:`~convscope.Model` plus its normalisation.

Every synthesis method works on images in pixel space ([0, 1], RGB) and feeds the network through
:meth:`Network.normalize` (the model's own mean/std). :func:`network` takes what
:func:`convscope.models.as_model` takes: a :class:`~convscope.Model`, or a plain ``nn.Module``, which
gets :data:`~convscope.models.PLAIN_MODULE_DEFAULTS` (ImageNet mean/std, 224 px) unless ``mean``/``std``
are given explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError
from ..images import ImageLike
from ..models import Model, as_model
from ..probe import module_device


class NotDifferentiableError(ConvscopeError, RuntimeError):
    """The model's output (or a requested activation) does not depend differentiably on its input."""


@dataclass
class Network:
    """A :class:`~convscope.Model` plus the facts synthesis needs: normalisation, input size and device.

    ``mean``/``std`` are the model's unless the caller gave others.
    """

    model: Model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int]

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def labels(self) -> list[str]:
        """The model's class names (for a plain module: counted by one dry run when first read)."""
        return self.model.labels

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
        return self.model.class_index(target)

    def preprocess(self, image: ImageLike | torch.Tensor) -> torch.Tensor:
        """An image (path, PIL, ``sample:NAME``) resized and cropped as the model expects, or a tensor
        (3, H, W) / (N, 3, H, W) already in the model's input space -> (N, 3, H, W) on the device."""
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image.unsqueeze(0)
            return x.detach().to(self.device, self.dtype)
        pixels = self.model.to_pixels(self.model.preprocess(image))
        return self.normalize(pixels).to(self.device, self.dtype)


def network(
    model: Any,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | tuple[int, int] | None = None,
) -> Network:
    """The :class:`Network` of a :class:`~convscope.Model` or an ``nn.Module`` (converted by
    :func:`~convscope.models.as_model`); ``mean``/``std``/``input_size`` override the model's."""
    if isinstance(model, Network):
        return model
    m = as_model(model)
    mu = tuple(float(v) for v in (mean if mean is not None else m.mean))
    sd = tuple(float(v) for v in (std if std is not None else m.std))
    if len(mu) != 3 or len(sd) != 3 or min(sd) <= 0:
        raise ConvscopeError("mean and std need three values each, std positive")
    size = input_size if input_size is not None else m.input_size
    if isinstance(size, int):
        size = (size, size)
    return Network(m, mu, sd, (int(size[0]), int(size[1])))  # type: ignore[arg-type]
