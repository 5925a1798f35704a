"""Single units projected back to pixel space: the DeconvNet view of Zeiler & Fergus (ECCV 2014, fig. 2).

For one unit (channel ``c``, position ``(y, x)`` of a layer's map) and one input image, the projection is
the backward signal from that unit alone to the input: the layer's gradient is set to a one-hot at
``(c, y, x)`` and sent down to the pixels. Three backward rules for ReLU / ReLU6 (modules and functional
calls alike, applied through :class:`convscope.probe.Capture`):

- ``"deconvnet"`` (Zeiler & Fergus): the ReLU is applied to the backward signal, whatever the forward
  activation was (:data:`convscope.probe.DECONV_RULES`); max pooling unpools to the
  recorded maxima (the "switches"), convolutions apply their transposed filters;
- ``"guided"`` (Springenberg et al. 2015, guided backpropagation): the signal passes where both the
  forward input and the backward signal are positive;
- ``"gradient"``: the plain gradient of the unit with respect to the input.

Many units are projected together: each unit gets its own copy of its image in the batch and its own
one-hot, so one forward pass (stopped right after the layer) and one backward pass serve a whole
batch of units (:func:`unit_gradients`). A unit sees only its receptive field, so the projection is
zero outside that box; in deep layers of modern networks the theoretical box covers most of the image while
the projection's mass sits in a small centre (the effective receptive field, Luo et al. 2016), so pictures
are cropped to :func:`effective_box`, and :func:`projection_picture` stretches each picture's contrast on its
own (its 99.5th percentile of |x| saturates).

On a network without max-pooling DeconvNet has no switches: its projections do not depend on the image
(:func:`convscope.probe.no_switches_note`), so the default method is ``"guided"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConvscopeError
from ..models import as_model
from ..options import Option
from ..probe import (
    BackwardRule,
    Capture,
    NoSwitchesWarning,
    backward_rules,
    forward_fast,
    no_switches_note,
    resolve_layer,
)
from ..progress import tqdm

#: Backward rules a projection can use (see the module docstring).
METHODS = ("deconvnet", "guided", "gradient")
#: How a projection is drawn: ``"signed"`` (0.5 + x / (2 max|x|), grey = 0, in colour) or ``"abs"``
#: (max over colour channels of |x| / max|x|, grey levels, black = 0).
SCALES = ("signed", "abs")
#: Default projection method: the one that depends on the image whatever the architecture.
DEFAULT_METHOD = "guided"
#: Share of a projection's |x| the effective box holds (per hit; the median box over the hits is used).
EFFECTIVE_MASS = 0.9
#: Quantile of |x| that saturates a projection picture (its own contrast stretch).
STRETCH_QUANTILE = 0.995
#: Units per forward + backward pass.
BATCH_SIZE = Option(int, 16, "units per forward + backward pass", minimum=1, maximum=4096)


class ProjectionError(ConvscopeError, ValueError):
    """A projection that cannot be made: an unknown method, a unit outside the layer, a layer without maps."""


def projection_rules(method: str) -> dict[Any, BackwardRule] | None:
    """The backward rules of ``method`` for :class:`~convscope.probe.Capture` (``None`` for the plain gradient):
    the probe's one rule set (:func:`convscope.probe.backward_rules`), shared with the attribution methods."""
    if method not in METHODS:
        raise ProjectionError(f"unknown projection method {method!r}; choose {', '.join(METHODS)}")
    return backward_rules(method)


def method_note(module: torch.nn.Module, method: str) -> str | None:
    """The caveat of projecting with ``method`` through ``module`` (DeconvNet without max-pooling: the same
    projection for every image), issued as a :class:`NoSwitchesWarning` too; ``None`` when there is none."""
    note = no_switches_note(module) if method == "deconvnet" else None
    if note is not None:
        warnings.warn(note, NoSwitchesWarning, stacklevel=3)
    return note


@dataclass
class UnitGradients:
    """What :func:`unit_gradients` returns.

    ``grads`` (M, C, H, W): the projection of row ``m``'s unit into row ``m``'s input (gradient with
    respect to the model's input tensor, i.e. the preprocessed image). ``values`` (M,): each unit's
    activation. ``forward_passes`` / ``backward_passes``: passes run (one each per batch). ``done``: rows
    computed (fewer than M after Ctrl-C; the rest of ``grads`` is zero). ``interrupted``: stopped by Ctrl-C.
    """

    grads: torch.Tensor
    values: torch.Tensor
    method: str
    layer: str
    forward_passes: int
    backward_passes: int
    done: int
    interrupted: bool = False


def unit_gradients(
    model: Any,
    x: torch.Tensor,
    layer: str,
    channels: Sequence[int] | torch.Tensor,
    ys: Sequence[int] | torch.Tensor,
    xs: Sequence[int] | torch.Tensor,
    *,
    method: str = "deconvnet",
    batch_size: int = 16,
    progress: bool | None = None,
) -> UnitGradients:
    """Project unit ``(channels[m], ys[m], xs[m])`` of ``layer`` into input ``x[m]``, for every row ``m``.

    ``x`` (M, C, H, W): one input per unit (repeat an image for several units of it). Each batch of
    ``batch_size`` rows costs one forward pass, stopped right after ``layer``, and one backward pass
    whose incoming gradient is a one-hot per row (Zeiler & Fergus: "all other activations in the layer
    set to zero"). ``method``: one of :data:`METHODS`. Parameters get no gradients; the model is
    restored on exit. Ctrl-C stops between batches and returns the rows done (``interrupted=True``).
    ``model``: a :class:`~convscope.Model` or a plain module.
    """
    rules = projection_rules(method)
    BATCH_SIZE.check("batch_size", batch_size)
    module = as_model(model).module
    resolve_layer(module, layer)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ProjectionError("x must be a float tensor (M, C, H, W): one input per unit")
    m = x.shape[0]
    ch, yy, xx = (torch.as_tensor(v, dtype=torch.long).reshape(-1).cpu() for v in (channels, ys, xs))
    if not (len(ch) == len(yy) == len(xx) == m):
        raise ProjectionError(f"{m} inputs but {len(ch)} channels, {len(yy)} ys and {len(xx)} xs; give one unit per input")
    grads = torch.zeros_like(x)
    values = torch.full((m,), float("nan"), device=x.device)
    starts = range(0, m, batch_size)
    passes = 0
    interrupted = False
    done = 0
    bar = tqdm(starts, desc=f"{method} {layer}", disable=None if (progress is None and len(starts) > 2) else not progress, leave=False)
    try:
        with Capture(module, [layer], grads=True, stop=True, rules=rules) as cap, torch.enable_grad():
            for s in bar:
                xb = x[s : s + batch_size].detach().requires_grad_(True)
                forward_fast(module, xb, cap.forward)
                passes += 1
                act = cap.activations.get(layer)
                if act is None:
                    raise ProjectionError(f"layer {layer!r} is never called in the model's forward pass")
                if act.ndim != 4:
                    raise ProjectionError(f"layer {layer!r} outputs shape {tuple(act.shape)}, not feature maps (N, C, H, W)")
                n = xb.shape[0]
                cb, yb, xb_ = (t[s : s + n].to(act.device) for t in (ch, yy, xx))
                _check_units(act.shape, cb, yb, xb_, layer)
                onehot = torch.zeros_like(act)
                rows = torch.arange(n, device=act.device)
                onehot[rows, cb, yb, xb_] = 1
                (g,) = torch.autograd.grad(act, xb, grad_outputs=onehot)
                grads[s : s + n] = g.to(grads.dtype)
                values[s : s + n] = act.detach()[rows, cb, yb, xb_].to(values.dtype)
                done = s + n
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return UnitGradients(grads, values, method, layer, passes, passes, done, interrupted)


def _check_units(shape: torch.Size, c: torch.Tensor, y: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    _, nc, h, w = shape
    for name, v, limit in (("channel", c, nc), ("y", y, h), ("x", x, w)):
        bad = (v < 0) | (v >= limit)
        if bool(bad.any()):
            raise ProjectionError(f"{name} {int(v[bad][0])} out of range for layer {layer!r} with maps {nc}x{h}x{w}")


def crop_box(t: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """``t[..., top:bottom, left:right]`` of a (C, H, W) tensor, zeros where the box leaves the picture."""
    top, left, bottom, right = box
    h, w = t.shape[-2:]
    out = t.new_zeros((*t.shape[:-2], bottom - top, right - left))
    ct, cl, cb, cr = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    if cb > ct and cr > cl:
        out[..., ct - top : cb - top, cl - left : cr - left] = t[..., ct:cb, cl:cr]
    return out


def effective_box(crops: torch.Tensor, mass: float = EFFECTIVE_MASS) -> tuple[int, int, int, int]:
    """The centred square inside the receptive-field boxes of ``crops`` (M, C, bh, bw) that holds ``mass``
    of each projection's |x| (summed over colours), as (top, left, bottom, right) within the box: the median
    half-size over the non-zero projections, so every hit of a run is cropped alike (and its patch with it).
    The unit sits at the box's centre. All-zero crops: the whole box."""
    m, _, bh, bw = crops.shape
    whole = (0, 0, bh, bw)
    if m == 0 or bh == 0 or bw == 0:
        return whole
    energy = crops.detach().abs().sum(1).flatten(1).double()  # (M, bh * bw)
    total = energy.sum(1)
    keep = total > 0
    if not bool(keep.any()):
        return whole
    cy, cx = (bh - 1) / 2, (bw - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(bh), torch.arange(bw), indexing="ij")
    ring = torch.maximum((yy - cy).abs(), (xx - cx).abs()).flatten()  # Chebyshev distance from the unit
    order = ring.argsort()
    cum = energy[keep][:, order].cumsum(1) / total[keep].view(-1, 1)
    first = (cum >= mass).float().argmax(1)  # first pixel (by distance) where the mass is reached
    radius = float(ring[order][first].median())
    half = math.ceil(radius + 0.5)
    top, left = max(0, math.floor(cy + 0.5) - half), max(0, math.floor(cx + 0.5) - half)
    return top, left, min(bh, top + 2 * half + (bh % 2 == 1)), min(bw, left + 2 * half + (bw % 2 == 1))


def projection_picture(p: torch.Tensor, scale: str = "signed", std: Sequence[float] | None = None,
                       quantile: float = STRETCH_QUANTILE) -> Image.Image:
    """A projection (C, h, w) as a picture, with its own contrast stretch.

    ``std``: the model's per-channel normalisation; the gradient with respect to the preprocessed input
    is divided by it, giving the gradient with respect to pixel values. With ``s`` the ``quantile`` of the
    picture's non-zero |x| (values beyond saturate; 1.0: the maximum), ``scale="signed"``: Zeiler & Fergus's
    display, 0.5 + x / (2 s) per colour channel (grey = 0, colours keep their sign); ``"abs"``: max over
    colour channels of |x| / s (black = 0). An all-zero projection is flat grey (signed) or black (abs).
    """
    if scale not in SCALES:
        raise ProjectionError(f"unknown projection scale {scale!r}; choose {' or '.join(SCALES)}")
    p = p.detach().float().cpu()
    if std is not None and p.shape[0] == len(std):
        p = p / torch.tensor(std, dtype=p.dtype).view(-1, 1, 1)
    nonzero = p.abs().flatten()
    nonzero = nonzero[nonzero > 0]
    peak = float(torch.quantile(nonzero[:: max(1, nonzero.numel() // 1_000_000)], quantile)) if nonzero.numel() else 0.0
    peak = peak if peak > 0 and np.isfinite(peak) else 1.0
    if scale == "signed":
        a = (0.5 + p / (2 * peak)).clamp(0, 1)
        if a.shape[0] == 1:
            a = a.expand(3, -1, -1)
        arr = a[:3].permute(1, 2, 0).numpy()
    else:
        arr = (p.abs().amax(0) / peak).clamp(0, 1).numpy()
    return Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).convert("RGB")


@dataclass(eq=False)
class Projections:
    """Projections of top-activation units (from :meth:`TopK.projected`), cropped to their receptive fields.

    Row ``m`` is hit ``ranks[m]`` (1 = strongest) of channel ``channels[m]``: input ``images[m]``, unit
    ``units[m]`` = (y, x), input box ``boxes[m]`` (top, left, bottom, right; not clipped, so every crop has the
    receptive field's size and the part outside the picture is zero). ``crops`` (M, C, bh, bw): the
    projection inside that box, as the gradient with respect to the model's input tensor. ``values``
    (M,): the unit's activation, recomputed. ``std``: the model's normalisation (for display in pixel units).
    ``effective``: the part of the box pictures show (:func:`effective_box`, within the box). ``note``: a
    caveat about the method on this model (DeconvNet without max-pooling), else ``None``.
    """

    layer: str
    method: str
    channels: list[int]
    ranks: list[int]
    images: list[int]
    units: list[tuple[int, int]]
    boxes: list[tuple[int, int, int, int]]
    crops: torch.Tensor
    values: torch.Tensor
    forward_passes: int
    backward_passes: int
    seconds: float
    interrupted: bool = False
    std: tuple[float, ...] | None = None
    effective: tuple[int, int, int, int] | None = None
    note: str | None = None
    _pictures: dict[tuple[int, str], Image.Image] = field(default_factory=dict, repr=False)

    def rows(self, channel: int) -> list[int]:
        """Rows of ``channel``, strongest hit first."""
        return [m for m, c in enumerate(self.channels) if c == channel]

    def picture(self, row: int, scale: str = "signed") -> Image.Image:
        """Row ``row``'s projection as a picture, cropped to :attr:`effective` (see :func:`projection_picture`)."""
        key = (row, scale)
        if key not in self._pictures:
            crop = self.crops[row]
            if self.effective is not None:
                t, left, b, r = self.effective
                crop = crop[:, t:b, left:r]
            self._pictures[key] = projection_picture(crop, scale, self.std)
        return self._pictures[key]

    def pictures(self, channel: int, scale: str = "signed") -> list[Image.Image]:
        """The projections of ``channel``'s hits as pictures, strongest first."""
        return [self.picture(m, scale) for m in self.rows(channel)]

    def __str__(self) -> str:
        return (f"{self.method} projections of {len(self.channels)} units at {self.layer} "
                f"({self.forward_passes} forward + {self.backward_passes} backward passes, {self.seconds:.2f} s)")


def project_hits(
    model: Any,
    layer: str,
    hits: Sequence[tuple[int, int, Any]],
    load: Callable[[list[int]], torch.Tensor],
    box: Callable[[int, int], tuple[int, int, int, int]],
    *,
    method: str = DEFAULT_METHOD,
    batch_size: int = 16,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Project ``hits`` = ``(channel, image, hit)`` (``hit.y``, ``hit.x``) and crop each to ``box(y, x)``.

    ``load(images)`` returns the preprocessed inputs of those image positions (N, C, H, W); it is called
    once per batch with the distinct images of the batch, so memory stays bounded by ``batch_size``.
    Returns the crops (M, C, bh, bw), the unit values (M,), the number of batches and whether Ctrl-C
    stopped the work (rows not done are zero / NaN).
    """
    crops: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    batches = 0
    interrupted = False
    starts = range(0, len(hits), batch_size)
    bar = tqdm(starts, desc=f"{method} {layer}", unit="batch",
               disable=None if (progress is None and len(starts) > 2) else not progress, leave=False)
    shape = None
    try:
        for s in bar:
            part = hits[s : s + batch_size]
            wanted = sorted({h[1] for h in part})
            x = load(wanted)
            where = {i: j for j, i in enumerate(wanted)}
            xb = x[torch.as_tensor([where[h[1]] for h in part], device=x.device)]
            r = unit_gradients(model, xb, layer, [h[0] for h in part], [h[2].y for h in part], [h[2].x for h in part],
                               method=method, batch_size=len(part), progress=False)
            if r.interrupted:
                raise KeyboardInterrupt
            batches += 1
            for m, h in enumerate(part):
                crops.append(crop_box(r.grads[m], box(h[2].y, h[2].x)).cpu())
            values.append(r.values.cpu())
            shape = crops[-1].shape
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if shape is None:
        y0 = box(hits[0][2].y, hits[0][2].x) if hits else (0, 0, 0, 0)
        shape = (3, y0[2] - y0[0], y0[3] - y0[1])
    missing = len(hits) - len(crops)
    crops += [torch.zeros(shape)] * missing
    out_values = torch.cat(values + [torch.full((missing,), float("nan"))]) if (values or missing) else torch.zeros(0)
    return (torch.stack(crops) if crops else torch.zeros((0, *shape))), out_values, batches, interrupted
