"""The contract between the dispatcher and a method: what a method gets (:class:`Context`) and what it
returns (:class:`MethodOutput`). Methods import this module, never the dispatcher (:mod:`.api`).

Targets are explicit. ``Context.target`` is the (N,) tensor of classes the caller asked for, or ``None``
when the caller wants each image's top prediction. A method that runs its own forward pass on ``x``
calls :meth:`Context.choose_target` with those logits (no extra pass); one that does not calls
:meth:`Context.resolve_target`, which runs one counted forward pass. Reading ``target`` never runs
the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.model import Model, output_logits
from ..probe import forward_fast
from ..progress import tqdm


@dataclass
class MethodOutput:
    """What a method function returns: the raw tensor, pass counts and method-specific extras."""

    raw: torch.Tensor
    forward_passes: int
    backward_passes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Context:
    """What a method function gets: the model, the validated input batch (N, C, H, W) on the model's
    device, the targets (``None``: the top prediction, see the module docstring), the layer of layer
    methods, and whether long loops may draw a progress bar."""

    model: Model
    x: torch.Tensor
    target: torch.Tensor | None = None
    layer: str | None = None
    progress: bool = True
    #: forward passes spent by :meth:`resolve_target` (added to the method's count by the dispatcher)
    extra_forward_passes: int = 0

    def __post_init__(self) -> None:
        if self.target is not None:
            self.target = self.target.to(self.x.device)

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def device(self) -> torch.device:
        return self.x.device

    def choose_target(self, logits: torch.Tensor) -> torch.Tensor:
        """The targets; when none were given, the top class of ``logits`` (the method's own pass on ``x``)."""
        if self.target is None:
            self.target = logits.detach().argmax(dim=1)
        return self.target

    def resolve_target(self) -> torch.Tensor:
        """The targets; when none were given, one forward pass on ``x`` finds the top classes (counted)."""
        if self.target is None:
            with torch.no_grad():
                logits = self.logits(self.x)
            self.extra_forward_passes += 1
            self.target = logits.argmax(dim=1)
        return self.target

    def logits(self, x: torch.Tensor, call: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        """Class scores of a batch (with the autograd graph when grad is enabled); ``call``: run the
        network through it (e.g. ``Capture.forward``) instead of calling the module."""
        return output_logits(forward_fast(self.module, x, call))

    def target_scores(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The score of each row's target class, shape (N,)."""
        return logits.gather(1, target.view(-1, 1).to(logits.device)).squeeze(1)

    def bar(self, iterable: Any = None, **kwargs: Any) -> Any:
        """A progress bar over ``iterable`` (tqdm keywords), off when ``progress`` is False; with
        ``progress`` on, shown only on a terminal (and, for loops over ``iterable``, only when it has
        more than four steps)."""
        if not self.progress:
            kwargs["disable"] = True
        elif "disable" not in kwargs:
            kwargs["disable"] = None if iterable is None or len(iterable) > 4 else True
        return tqdm(iterable, leave=False, **kwargs)

