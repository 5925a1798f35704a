"""Channel responses: the mean activation of every channel of a layer, per image (the "filter 286 spikes" plot)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import ViewOptionError
from ..models import Model
from ..render import figure_to_image
from ..render.picture import Pictured
from .features import layer_output, model_input


@dataclass(eq=False)
class ChannelResponse(Pictured):
    """Mean activation of every channel of ``layer``, for each image of a batch.

    ``means``: (N, C) with ``means[n, c] = activation[n, c].mean()`` over the h x w positions (the
    layer's units, in the layer's own units). ``values``: (C,) the batch average (the image's own means
    when N = 1). ``shape``: the layer's output shape (N, C, h, w). ``zero``: how many channels are
    exactly zero everywhere for each image, shape (N,) (silent units, e.g. after a ReLU).
    """

    layer: str
    means: torch.Tensor
    shape: tuple[int, ...]
    zero: torch.Tensor
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def values(self) -> torch.Tensor:
        """(C,) channel means averaged over the batch (the image's own means when N = 1)."""
        return self.means.mean(dim=0)

    def _pick(self, index: int | None) -> torch.Tensor:
        if index is None:
            return self.values
        n = self.means.shape[0]
        if not -n <= index < n:
            raise ViewOptionError(f"image index {index} out of range for a batch of {n}")
        return self.means[index]

    def top(self, k: int = 5, index: int | None = None) -> list[tuple[int, float]]:
        """The ``k`` channels with the largest mean, as ``(channel, mean)`` pairs, largest first.

        ``index``: one image of the batch; ``None``: the batch average.
        """
        if k < 1:
            raise ViewOptionError(f"top needs k >= 1, got {k}")
        v = self._pick(index).float()
        values, idx = v.topk(min(k, v.numel()))
        return [(int(i), float(s)) for i, s in zip(idx.tolist(), values.tolist())]

    def figure(self, top: int = 5, index: int | None = None, *, title: str | None = None) -> Any:
        """A matplotlib ``Figure`` (no pyplot; shows itself in Jupyter): every channel's mean, the ``top``
        channels annotated."""
        # heavy (matplotlib): loaded only when a figure is drawn
        from ..render.figures import channel_response_figure

        n = self.means.shape[0]
        who = "" if n == 1 else (f" (image {index})" if index is not None else f" (average of {n} images)")
        return channel_response_figure(
            self._pick(index),
            top=top,
            title=title or f"Mean activation per channel of {self.layer}{who}",
        )

    def to_image(self, top: int = 5, index: int | None = None, *, dpi: int = 100) -> Image.Image:
        """:meth:`figure` rendered to a PIL image."""
        return figure_to_image(self.figure(top, index), dpi=dpi)

    def __str__(self) -> str:
        top = ", ".join(f"{c} ({v:.3g})" for c, v in self.top(5))
        return f"{self.layer}: {self.means.shape[1]} channels; top 5: {top}"


def channel_means(model: Model | torch.nn.Module, x: Any, layer: str) -> ChannelResponse:
    """Mean activation of every channel of ``layer`` for each image: (N, C), from one forward pass.

    ``model``: a :class:`~convscope.Model` or a plain module (:func:`~convscope.models.as_model`).
    ``x``: an image, a list of images, or a preprocessed tensor (N, C, H, W). The forward pass stops right after ``layer``; the model is left as it was.
    """
    model, t = model_input(model, x)
    act = layer_output(model, t, layer).float()
    return ChannelResponse(
        layer=layer,
        means=act.mean(dim=(2, 3)),
        shape=tuple(act.shape),
        zero=(act.flatten(2) == 0).all(dim=2).sum(dim=1),
    )
