"""Perturbation family: occlusion (Zeiler & Fergus 2014) and RISE (Petsiuk et al. 2018).

Both are a mask generator plus a scorer: occluded/masked copies of each image are evaluated in
batches and the change in the target's softmax probability is spread back onto the pixels. Occlusion
uses incremental inference (see :mod:`convscope.attribution.incremental`) when the architecture is
understood, and plain batched copies otherwise; ``extras["engine"]`` says which.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError
from ..models.model import output_logits
from ..options import check_range
from ..probe import Capture, guard
from .contract import Context, MethodOutput
from .gradients import gaussian_blur
from .incremental import Plan, Region, build_plan, materialize
from .registry import SEED_MAX, Option, register_method

__all__ = ["fill_image", "important_region", "occlusion", "occlusion_positions", "rise", "rise_masks"]


# ============================================================================ occlusion


def occlusion_positions(size: int, window: int, stride: int) -> list[int]:
    """Start indices of the occluder along an axis of ``size`` pixels, Captum's convention:
    ``ceil((size - window) / stride) + 1`` positions ``0, stride, 2 stride, ...``; the last window is cut
    at the border when it overhangs."""
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def _coverage(size: int, starts: list[int], window: int, device: torch.device) -> torch.Tensor:
    """(size, len(starts)) 0/1 matrix: pixel i lies in the window starting at ``starts[j]``."""
    idx = torch.arange(size, device=device)[:, None]
    s = torch.tensor(starts, device=device)[None, :]
    return ((idx >= s) & (idx < s + window)).float()


def fill_image(x: torch.Tensor, fill: float | str, window: int) -> torch.Tensor:
    """What the occluder shows, (N, C, H, W) in model-input space: a constant ``fill``; ``"mean"``, each
    image's per-channel mean; ``"blur"``, the image under a Gaussian blur of sigma ``window / 2`` px
    (reflect padding), so the occluder removes detail but keeps colour."""
    if isinstance(fill, str):
        if fill == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        if fill == "blur":
            return gaussian_blur(x, max(window / 2.0, 0.5))
        raise ConvscopeError(f"occlusion fill must be a number, 'mean' or 'blur', got {fill!r}")
    if not math.isfinite(float(fill)):
        raise ConvscopeError(f"occlusion fill must be finite, got {fill!r}")
    return torch.full_like(x, float(fill))


def _check_occlusion(x: torch.Tensor, window: int, stride: int) -> None:
    h, w = x.shape[-2:]
    if window > min(h, w):
        raise ConvscopeError(f"occlusion window {window} px is larger than the input ({h}x{w} px)")
    if stride > window:
        raise ConvscopeError(
            f"occlusion stride {stride} is larger than the window {window}: some pixels would never be occluded"
        )


def _batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@register_method(
    "occlusion",
    family="perturbation",
    passes="1 forward per occluder position (incremental: only the changed region in early layers)",
    paper="Zeiler & Fergus 2014; Nakandala et al. 2019 (incremental inference)",
    preview={"window": 16, "stride": 8},
    options={
        "window": Option(int, 16, "side of the square occluder, pixels", minimum=1, maximum=4096),
        "stride": Option(int, 8, "step between occluder positions, pixels", minimum=1, maximum=4096),
        "fill": Option((float, str), 0.0, "occluder value in model-input space, or 'mean' / 'blur'",
                       minimum=-1000.0, maximum=1000.0),
        "approximate": Option(bool, False, "projective-field thresholding (Krypton): faster, approximate"),
        "tau": Option(float, 0.5, "approximate mode: cap of the changed region's side, fraction of each map (> 0)",
                      minimum=0.0, maximum=1.0),
        "tau_small": Option(float, None, "approximate mode: the same cap on maps of side <= 7 (the head), > 0; "
                            "default: not capped", minimum=0.0, maximum=1.0),
        "engine": Option(
            str,
            "auto",
            "incremental, batched, or auto (incremental when the model is understood)",
            ("auto", "incremental", "batched"),
        ),
        "batch_size": Option(int, None, "occluded copies per batch (default 32 incremental, 16 batched)",
                             minimum=1, maximum=4096),
        "channel_layer": Option(
            str, None, "with channel: a layer whose channel response is mapped (Zeiler-Fergus fig. 7)"
        ),
        "channel": Option(int, None, "with channel_layer: the channel whose activation is mapped per occluder position",
                          minimum=0, maximum=65535),
        "channel_reduce": Option(
            str, "max", "how the channel's map is reduced to one number", ("max", "mean")
        ),
        "drill": Option(float, 1.0, "approximate mode (adaptive drill-down): share of the remaining positions "
                        "refined after a 2x coarser pass (1: off)", minimum=0.0, maximum=1.0),
        "switch": Option(float, 0.9, "incremental: run in full once the changed region covers this fraction of a map",
                         minimum=0.0, maximum=1.0),
    },
)
def occlusion(
    ctx: Context,
    window: int,
    stride: int,
    fill: float | str,
    approximate: bool,
    tau: float,
    tau_small: float | None,
    engine: str,
    batch_size: int | None,
    channel_layer: str | None,
    channel: int | None,
    channel_reduce: str,
    drill: float,
    switch: float,
) -> MethodOutput:
    """Occlusion sensitivity (Zeiler & Fergus 2014): slide a ``window`` x ``window`` occluder with step
    ``stride`` over each image; raw (N, H, W) = drop of the target's softmax probability (clean minus
    occluded), averaged over the windows covering each pixel (equal to Captum's ``Occlusion`` with
    ``sliding_window_shapes=(3, w, w)``, ``strides=(3, s, s)``, ``baselines=fill`` on softmax outputs,
    one channel of its output). Extras: ``probability_map`` (N, ny, nx) target probability per occluder
    position, ``top_class_map`` (N, ny, nx) most probable class per position, ``channel_map`` (N, ny, nx)
    the chosen channel's activation (max or mean over its map) per position when ``channel_layer`` and
    ``channel`` are given, ``engine``, ``copies_evaluated``, ``copies_skipped`` (windows where the fill
    equals the image, provably unchanged) and, incremental, ``computed_fraction`` (convolution
    multiply-accumulates done over those of full passes)."""
    # activations stop working in place for the call (the engine caches intermediate maps); the guard
    # restores the flags afterwards
    with guard(ctx.module, eval=True, freeze=True, no_inplace=True), torch.no_grad():
        x = ctx.x
        _check_occlusion(x, window, stride)
        if tau == 0.0 or tau_small == 0.0:  # the declared range is 0..1; the cap itself must not be empty
            raise ConvscopeError(f"occlusion tau and tau_small must be above 0, got {tau} and {tau_small}")
        if (channel is None) != (channel_layer is None):
            raise ConvscopeError("occlusion needs both channel_layer and channel to map a channel's response")
        n, _, h, w = x.shape
        ys, xs = occlusion_positions(h, window, stride), occlusion_positions(w, window, stride)
        fills = fill_image(x, fill, window)

        with torch.no_grad():
            clean_logits = ctx.logits(x)
        passes = 1
        target = ctx.choose_target(clean_logits)
        clean_top = clean_logits.argmax(dim=1)
        clean_prob = clean_logits.softmax(dim=1).gather(1, target.view(-1, 1)).squeeze(1)

        if approximate and (channel is not None or engine == "batched"):
            raise ConvscopeError(
                "approximate occlusion runs on the incremental engine: drop channel / engine='batched'"
            )
        use_engine = "batched" if channel is not None else engine
        plans: list[Plan | None] = []
        if use_engine in ("auto", "incremental"):
            for i in range(n):
                plans.append(build_plan(ctx.module, x[i : i + 1]))
                passes += 2
            if any(p is None for p in plans):
                if engine == "incremental" or approximate:
                    raise ConvscopeError(
                        f"incremental occlusion does not understand {type(ctx.module).__name__}; use engine='batched' without approximate"
                    )
                use_engine = "batched"
            else:
                use_engine = "incremental"
        bs = batch_size or (32 if use_engine == "incremental" else 16)

        probs = torch.empty(n, len(ys), len(xs), device=x.device)
        tops = torch.empty(n, len(ys), len(xs), dtype=torch.long, device=x.device)
        chan = torch.empty(n, len(ys), len(xs), device=x.device) if channel is not None else None
        grid = [(py, px) for py in ys for px in xs]
        evaluated = skipped = 0
        macs_done = macs_full = 0.0
        progress = ctx.bar(total=n * len(grid), desc="occlusion", unit="copy")
        try:
            for i in range(n):
                py = torch.tensor([p[0] for p in grid], device=x.device)
                px = torch.tensor([p[1] for p in grid], device=x.device)
                region = _window_region(x[i], fills[i], py, px, window)
                same = _unchanged(region, x[i])
                skipped += int(same.sum())
                progress.update(int(same.sum()))
                flat_p = torch.full((len(grid),), float(clean_prob[i]), device=x.device)
                flat_t = torch.full((len(grid),), int(clean_top[i]), dtype=torch.long, device=x.device)
                flat_c = None
                if chan is not None:
                    flat_c = torch.full(
                        (len(grid),),
                        float(_channel_value(ctx, x[i : i + 1], channel_layer, channel, channel_reduce)[0]),
                        device=x.device,
                    )
                    passes += 1

                def evaluate(
                    todo: torch.Tensor,
                    i: int = i,
                    region: Region = region,
                    flat_p=flat_p,
                    flat_t=flat_t,
                    flat_c=flat_c,
                ) -> None:
                    nonlocal evaluated, macs_done, macs_full
                    for sl in _batches(len(todo), bs):
                        idx = todo[sl]
                        sub = Region(
                            region.values[idx],
                            region.y0[idx],
                            region.x0[idx],
                            region.size,
                            (region.centre[0][idx], region.centre[1][idx]),
                        )
                        if use_engine == "incremental":
                            logits, stats = plans[i].run(
                                sub,
                                switch=switch,
                                tau=tau if approximate else None,
                                tau_small=tau_small if approximate else None,
                            )
                            macs_done += stats.macs_done
                            macs_full += stats.macs_full
                        elif flat_c is not None:
                            with Capture(ctx.module, [channel_layer]) as cap:
                                logits = output_logits(cap.forward(materialize(sub, x[i])))
                                flat_c[idx] = _reduce_channel(
                                    cap.activations[channel_layer], channel, channel_reduce, channel_layer
                                )
                        else:
                            logits = ctx.logits(materialize(sub, x[i]))
                        p = logits.float().softmax(dim=1)
                        flat_p[idx] = p[:, int(target[i])]
                        flat_t[idx] = p.argmax(dim=1)
                        evaluated += len(idx)
                        progress.update(len(idx))

                if approximate and drill < 1.0:
                    interpolated = _drill_down(
                        evaluate, same, flat_p, flat_t, len(ys), len(xs), float(clean_prob[i]), drill
                    )
                    progress.update(interpolated)
                else:
                    evaluate((~same).nonzero().squeeze(1))
                probs[i] = flat_p.view(len(ys), len(xs))
                tops[i] = flat_t.view(len(ys), len(xs))
                if chan is not None:
                    chan[i] = flat_c.view(len(ys), len(xs))
        finally:
            progress.close()

        drop = clean_prob.view(n, 1, 1) - probs
        ry = _coverage(h, ys, window, x.device)
        rx = _coverage(w, xs, window, x.device)
        counts = ry.sum(1)[:, None] * rx.sum(1)[None, :]
        raw = torch.einsum("hy,nyx,wx->nhw", ry, drop.float(), rx) / counts
        extras: dict[str, Any] = {
            "probability_map": probs,
            "top_class_map": tops,
            "clean_probability": clean_prob,
            "engine": use_engine + (" (approximate)" if approximate else ""),
            "copies_evaluated": evaluated,
            "copies_skipped": skipped,
            "positions": (ys, xs),
        }
        if macs_full > 0:
            extras["computed_fraction"] = macs_done / macs_full
        if chan is not None:
            extras["channel_map"] = chan
        return MethodOutput(raw=raw.to(x.dtype), forward_passes=passes + evaluated, extras=extras)


def _coarse_axis(count: int) -> torch.Tensor:
    """Every other index of an axis of ``count`` positions, the last one always included."""
    idx = list(range(0, count, 2))
    if idx[-1] != count - 1:
        idx.append(count - 1)
    return torch.tensor(idx)


#: weight of the interpolated drop itself (next to the neighbours' spread) when choosing positions to refine
DRILL_WEIGHT = 0.5


def _neighbours(known: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each index 0..count-1, the positions in ``known`` of the evaluated indices around it."""
    hi = torch.searchsorted(known, torch.arange(count)).clamp(0, len(known) - 1)
    lo = torch.where(known[hi] > torch.arange(count), hi - 1, hi).clamp(min=0)
    return lo, hi


def _interp_axis(values: torch.Tensor, known: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """Linear interpolation along ``dim`` from the positions ``known`` (sorted) to 0..count-1."""
    pos = torch.arange(count, dtype=torch.float64)
    hi = (
        torch.searchsorted(known, torch.arange(count), right=False).clamp(1, len(known) - 1)
        if len(known) > 1
        else torch.zeros(count, dtype=torch.long)
    )
    lo = (hi - 1).clamp(min=0)
    span = (known[hi] - known[lo]).double().clamp(min=1)
    wt = ((pos - known[lo].double()) / span).clamp(0, 1).to(values.dtype).to(values.device)
    a, b = values.index_select(dim, lo.to(values.device)), values.index_select(dim, hi.to(values.device))
    shape = [1, 1]
    shape[dim] = count
    return a + (b - a) * wt.view(shape)


def _drill_down(
    evaluate,
    same: torch.Tensor,
    flat_p: torch.Tensor,
    flat_t: torch.Tensor,
    ny: int,
    nx: int,
    clean: float,
    drill: float,
) -> int:
    """Adaptive drill-down (Nakandala et al. 2019): evaluate every other occluder position on each axis,
    interpolate the probability in between, then evaluate the ``drill`` share of the remaining positions
    where the interpolated drop is largest; the rest keep the interpolated probability and the top class
    of the nearest evaluated position. Returns how many positions were interpolated."""
    cy, cx = _coarse_axis(ny), _coarse_axis(nx)
    coarse = torch.zeros(ny, nx, dtype=torch.bool)
    coarse[cy[:, None], cx[None, :]] = True
    coarse = coarse.flatten().to(same.device)
    evaluate((coarse & ~same).nonzero().squeeze(1))
    grid_p = flat_p.view(ny, nx)[cy.to(flat_p.device)][:, cx.to(flat_p.device)]
    interp = _interp_axis(_interp_axis(grid_p, cy, ny, 0), cx, nx, 1).flatten()
    rest = (~coarse & ~same).nonzero().squeeze(1)
    k = math.ceil(drill * len(rest))
    # refine where interpolation is least trustworthy: the spread of the 2 x 2 evaluated neighbours
    ly, hy = _neighbours(cy, ny)
    lx, hx = _neighbours(cx, nx)
    corners = torch.stack([grid_p[a][:, b] for a in (ly, hy) for b in (lx, hx)])
    spread = (corners.amax(0) - corners.amin(0)).flatten()
    score = spread[rest] + DRILL_WEIGHT * (clean - interp[rest]).abs()
    chosen = rest[torch.topk(score, k).indices] if k > 0 else rest[:0]
    evaluate(chosen)
    left = torch.ones(ny * nx, dtype=torch.bool, device=same.device)
    left[coarse | same] = False
    left[chosen] = False
    idx = left.nonzero().squeeze(1)
    flat_p[idx] = interp[idx]
    near_y = cy[torch.argmin((torch.arange(ny)[:, None] - cy[None, :]).abs(), dim=1)].to(flat_t.device)
    near_x = cx[torch.argmin((torch.arange(nx)[:, None] - cx[None, :]).abs(), dim=1)].to(flat_t.device)
    nearest = (near_y[:, None] * nx + near_x[None, :]).flatten()
    flat_t[idx] = flat_t[nearest[idx]]
    return len(idx)


def _window_region(
    img: torch.Tensor, fill: torch.Tensor, py: torch.Tensor, px: torch.Tensor, window: int
) -> Region:
    """The input part of each occluded copy: a ``window``-sized box (moved inside the image where the
    window overhangs the border) holding the fill inside the window and the image elsewhere."""
    c, h, w = img.shape
    y0 = py.clamp(max=h - window)
    x0 = px.clamp(max=w - window)
    ar = torch.arange(window, device=img.device)
    rows = y0[:, None] + ar  # (P, window)
    cols = x0[:, None] + ar
    inside = ((rows >= py[:, None]) & (rows < py[:, None] + window))[:, :, None] & (
        (cols >= px[:, None]) & (cols < px[:, None] + window)
    )[:, None, :]
    clean = img[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
    occl = fill[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
    centre = (
        (py + (py + window).clamp(max=h) - 1).double() / 2,
        (px + (px + window).clamp(max=w) - 1).double() / 2,
    )
    return Region(torch.where(inside[:, None], occl, clean), y0, x0, (h, w), centre)


def _unchanged(region: Region, img: torch.Tensor) -> torch.Tensor:
    """(P,) True where an occluded copy equals the image (the fill equals every pixel it covers)."""
    hh, ww = region.hw
    ar_h = torch.arange(hh, device=img.device)
    ar_w = torch.arange(ww, device=img.device)
    rows = region.y0[:, None] + ar_h
    cols = region.x0[:, None] + ar_w
    clean = img[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
    return (region.values == clean).flatten(1).all(dim=1)


def _reduce_channel(act: torch.Tensor, channel: int, reduce: str, layer: str) -> torch.Tensor:
    if act.ndim < 2 or not 0 <= channel < act.shape[1]:
        raise ConvscopeError(
            f"channel {channel} is out of range for layer {layer!r} of shape {tuple(act.shape[1:])}"
        )
    a = act[:, channel].flatten(1)
    return a.amax(dim=1) if reduce == "max" else a.mean(dim=1)


def _channel_value(ctx: Context, x: torch.Tensor, layer: str, channel: int, reduce: str) -> torch.Tensor:
    with torch.no_grad(), Capture(ctx.module, [layer], stop=True) as cap:
        cap.forward(x)
        return _reduce_channel(cap.activations[layer], channel, reduce, layer)


# ============================================================================ the seeds' occlusion mask


def important_region(
    attribution: Any, threshold: float = 0.5, fill: float | str = 0.0, x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only the important region of each image: pixels whose display map (in [0, 1]) is at least
    ``threshold`` stay, the others become ``fill`` (model-input space number, ``"mean"`` or ``"blur"``).

    ``attribution``: an :class:`~convscope.attribution.Attribution` (its ``map`` and stored ``input``)
    or a map tensor (N, H, W) together with ``x`` (N, C, H, W). Returns ``(masked input (N, C, H, W),
    keep mask (N, H, W) bool)``; feed the first back to the model to test whether the kept region
    alone still gives the prediction (``Attribution.mask`` draws the same as a picture)."""
    m = getattr(attribution, "map", attribution)
    x = getattr(attribution, "input", None) if x is None else x
    if not isinstance(m, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise ConvscopeError("important_region needs an Attribution with its input, or a map and x")
    check_range("threshold", threshold, float, 0.0, 1.0)
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.shape[-2:] != x.shape[-2:]:
        m = F.interpolate(m[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    keep = m.to(x.device) >= threshold
    return torch.where(keep[:, None], x, fill_image(x, fill, 11)), keep


# ============================================================================ RISE


def rise_masks(
    count: int, size: tuple[int, int], cells: int, p: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """RISE masks (Petsiuk et al. 2018), (count, 1, H, W) in [0, 1]: a ``cells`` x ``cells`` grid of
    Bernoulli(``p``) keep-values, upsampled bilinearly to ``(cells + 1) * ceil(H / cells)`` pixels and
    cropped at a random shift in [0, cell size) on each axis (so the mask is smooth and not aligned to
    the grid)."""
    h, w = size
    ch, cw = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(count, 1, cells, cells, generator=generator) < p).float()
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (count,), generator=generator)
    dx = torch.randint(0, cw, (count,), generator=generator)
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    out = up[torch.arange(count)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1).to(device)


@register_method(
    "rise",
    family="perturbation",
    passes="1 forward per mask",
    paper="Petsiuk, Das & Saenko 2018, RISE",
    options={
        "masks": Option(int, 4000, "number of random masks", minimum=1, maximum=100_000),
        "cells": Option(int, 7, "side of the random grid before upsampling (at most the input's side)",
                        minimum=1, maximum=224),
        "p": Option(float, 0.5, "probability that a grid cell is kept (0 < p < 1)", minimum=0.0, maximum=1.0),
        "seed": Option(int, 0, "seed of the mask generator", minimum=0, maximum=SEED_MAX),
        "fill": Option((float, str), 0.0, "value of masked-out pixels in model-input space, or 'mean' / 'blur'",
                       minimum=-1000.0, maximum=1000.0),
        "batch_size": Option(int, 32, "masked copies per forward pass", minimum=1, maximum=4096),
    },
    preview={"masks": 300},
)
def rise(
    ctx: Context, masks: int, cells: int, p: float, seed: int, fill: float | str, batch_size: int
) -> MethodOutput:
    """RISE (Petsiuk et al. 2018): raw (N, H, W) = sum_i P(target | x * M_i + fill * (1 - M_i)) M_i /
    (count * p), the expected target probability given that a pixel is kept, over random smooth masks
    M_i (:func:`rise_masks`; the same masks for every image of the batch, seeded by ``seed``)."""
    x = ctx.x
    n, _, h, w = x.shape
    if cells > min(h, w):
        raise ConvscopeError(f"rise grid of {cells} cells is finer than the {h}x{w} input")
    if not 0.0 < p < 1.0:
        raise ConvscopeError(f"rise keep probability p must lie in (0, 1), got {p}")
    fills = fill_image(x, fill, max(1, min(h, w) // cells))
    target = ctx.resolve_target()
    gen = torch.Generator().manual_seed(seed)
    sal = torch.zeros(n, h, w, device=x.device)
    passes = 0
    progress = ctx.bar(total=masks * n, desc="rise", unit="mask")
    try:
        with torch.no_grad():
            for sl in _batches(masks, batch_size):
                m = rise_masks(sl.stop - sl.start, (h, w), cells, p, gen, x.device).to(x.dtype)
                for i in range(n):
                    copies = x[i : i + 1] * m + fills[i : i + 1] * (1 - m)
                    prob = ctx.logits(copies).float().softmax(dim=1)[:, int(target[i])]
                    sal[i] += torch.einsum("b,bhw->hw", prob, m[:, 0].float())
                    passes += m.shape[0]
                    progress.update(m.shape[0])
    finally:
        progress.close()
    raw = sal / (masks * p)
    return MethodOutput(raw=raw.to(x.dtype), forward_passes=passes, extras={"masks": masks})
