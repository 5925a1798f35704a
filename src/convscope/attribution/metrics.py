"""How good is an attribution map? Deletion/insertion (Petsiuk et al. 2018), the pointing game (Zhang
et al. 2016) and the cascading-randomisation sanity check (Adebayo et al. 2018).

All functions take a :class:`~convscope.Model` or a plain ``nn.Module`` (with preprocessed tensors;
converted once by :func:`convscope.models.as_model`), leave the user's model untouched (they run under :class:`~convscope.probe.guard`; the sanity check works
on a deep copy) and return dataclasses of tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError, InputShapeError
from ..models.model import Model, output_logits
from ..options import check_range
from ..probe import guard, resolve_layer
from ..progress import tqdm
from .api import attribute, model_for_input, resolve_targets
from .perturbation import fill_image
from .result import Attribution, minmax

__all__ = [
    "Curve",
    "PointingResult",
    "SanityResult",
    "cascading_randomization",
    "deletion",
    "insertion",
    "pointing_game",
]


# ============================================================================ deletion / insertion


@dataclass
class Curve:
    """A deletion or insertion curve (Petsiuk et al. 2018).

    ``fractions`` (S + 1,): share of pixels removed (deletion) or inserted (insertion), 0 to 1.
    ``scores`` (N, S + 1): the target's softmax probability at each step. ``auc`` (N,): area under the
    curve by the trapezoid rule over ``fractions`` (deletion: lower is better; insertion: higher is
    better). ``forward_passes``: copies evaluated."""

    kind: str
    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor
    target: torch.Tensor
    forward_passes: int = 0


_CURVE_ARGS = """``saliency``: (N, H, W) at input size or an :class:`Attribution` (its ``map`` and ``target`` are
    used). ``target``: class per image (default: the attribution's target, else the top prediction).
    ``steps``: 1..4096; ``batch_size``: copies per forward pass, 1..4096; ``progress``: a bar on a terminal."""


def deletion(model: Any, x: Any, saliency: torch.Tensor | Attribution, target: Any = None, *, steps: int = 50,
             baseline: float | str | torch.Tensor = 0.0, batch_size: int = 32, progress: bool = True) -> Curve:
    return _curve("deletion", model, x, saliency, target, steps, baseline, batch_size, progress)


def insertion(model: Any, x: Any, saliency: torch.Tensor | Attribution, target: Any = None, *, steps: int = 50,
              baseline: float | str | torch.Tensor = "blur", batch_size: int = 32, progress: bool = True) -> Curve:
    return _curve("insertion", model, x, saliency, target, steps, baseline, batch_size, progress)


deletion.__doc__ = f"""Deletion curve: remove pixels from most to least salient (set them to ``baseline``, model-input
    space; ``"blur"``: a blurred copy, ``"mean"``: the channel means) in ``steps`` equal steps and record
    the target's probability. {_CURVE_ARGS}"""
insertion.__doc__ = f"""Insertion curve: start from ``baseline`` (default a blurred copy, as in the RISE paper) and
    insert the image's pixels from most to least salient in ``steps`` equal steps, recording the
    target's probability. {_CURVE_ARGS}"""


def _targets(model: Model, x: torch.Tensor, target: Any, saliency: Any) -> torch.Tensor | None:
    if target is None and isinstance(saliency, Attribution):
        target = saliency.target
    if target is None:
        return None
    return resolve_targets(target, x.shape[0], model.labels).to(x.device)


def _baseline(x: torch.Tensor, baseline: float | str | torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(x.device, x.dtype).expand_as(x)
        except RuntimeError as e:
            raise InputShapeError(
                f"baseline of shape {tuple(baseline.shape)} does not fit the input {tuple(x.shape)}"
            ) from e
    return fill_image(x, baseline, 11)  # "blur": Gaussian of sigma 5.5 px


def _curve(kind, model, x, saliency, target, steps, baseline, batch_size, progress) -> Curve:
    check_range("steps", steps, int, 1, 4096)
    check_range("batch_size", batch_size, int, 1, 4096)
    model = model_for_input(model, x)
    module = model.module
    xt = model.as_input(x).detach()
    sal = saliency.map if isinstance(saliency, Attribution) else saliency
    if not isinstance(sal, torch.Tensor):
        raise InputShapeError("saliency must be a tensor (N, H, W) or an Attribution")
    sal = sal.detach().to(xt.device).float()
    if sal.ndim == 2:
        sal = sal.unsqueeze(0)
    n, _, h, w = xt.shape
    if sal.shape != (n, h, w):
        raise InputShapeError(
            f"saliency of shape {tuple(sal.shape)} does not match the input: expected {(n, h, w)}"
        )
    if not torch.isfinite(sal).all():
        raise InputShapeError("saliency contains NaN or infinite values")
    base = _baseline(xt, baseline)
    hw = h * w
    # rank[i, p]: position of pixel p in image i's order (0 = most salient; ties keep raster order)
    order = torch.sort(sal.reshape(n, hw), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=xt.device).expand(n, hw).contiguous())
    counts = torch.round(torch.arange(steps + 1, device=xt.device, dtype=torch.float64) * hw / steps).long()
    scores = torch.empty(n, steps + 1, device=xt.device)
    passes = 0
    with guard(module, eval=True, freeze=True, no_inplace=False), torch.no_grad():
        tgt = _targets(model, xt, target, saliency)
        if tgt is None:
            tgt = output_logits(module(xt)).argmax(dim=1)
            passes += n
        bar = tqdm(total=n * (steps + 1), desc=kind, unit="copy", disable=None if progress else True, leave=False)
        try:
            for i in range(n):
                for start in range(0, steps + 1, batch_size):
                    k = counts[start : start + batch_size]
                    changed = (rank[i][None, :] < k[:, None]).view(-1, 1, h, w)  # (B, 1, H, W)
                    if kind == "deletion":
                        copies = torch.where(changed, base[i : i + 1], xt[i : i + 1])
                    else:
                        copies = torch.where(changed, xt[i : i + 1], base[i : i + 1])
                    prob = output_logits(module(copies)).float().softmax(dim=1)[:, int(tgt[i])]
                    scores[i, start : start + len(k)] = prob
                    passes += len(k)
                    bar.update(len(k))
        finally:
            bar.close()
    fractions = counts.double().div(hw).float()
    auc = torch.trapezoid(scores, fractions, dim=1)
    return Curve(kind, fractions.cpu(), scores.cpu(), auc.cpu(), tgt.cpu(), passes)


# ============================================================================ pointing game


@dataclass
class PointingResult:
    """Pointing game (Zhang et al. 2016). ``points`` (N, 2): (y, x) of each map's maximum; ``hits`` (N,):
    whether it lies within ``tolerance`` pixels (Euclidean) of the image's box; ``accuracy``: hit rate."""

    points: torch.Tensor
    hits: torch.Tensor
    accuracy: float
    tolerance: float


def pointing_game(
    saliency: torch.Tensor | Attribution, boxes: Any, tolerance: float = 15.0
) -> PointingResult:
    """Score maps (N, H, W) by whether their maximum falls in an object box.

    ``boxes``: (N, 4) or one (4,) box as (x0, y0, x1, y1) pixels, x1/y1 exclusive (PIL crop
    convention), in the map's coordinates. A hit: the maximum (first in raster order on ties) lies
    inside the box or within ``tolerance`` pixels of it (Zhang et al. use 15 px)."""
    sal = saliency.map if isinstance(saliency, Attribution) else saliency
    if not isinstance(sal, torch.Tensor) or sal.ndim not in (2, 3):
        raise InputShapeError("saliency must be a tensor (N, H, W) or an Attribution")
    sal = sal.detach().float().cpu()
    if sal.ndim == 2:
        sal = sal.unsqueeze(0)
    if not torch.isfinite(sal).all():
        raise InputShapeError("saliency contains NaN or infinite values")
    check_range("tolerance", tolerance, float, 0.0, None)
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n, _, w = sal.shape
    if b.shape[0] == 1 and n > 1:
        b = b.expand(n, 4)
    if b.shape[0] != n:
        raise InputShapeError(f"got {b.shape[0]} boxes for {n} maps")
    if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
        raise ConvscopeError("each box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    flat = sal.reshape(n, -1).argmax(dim=1)
    py, px = flat // w, flat % w
    dx = torch.clamp(torch.maximum(b[:, 0] - px, px - (b[:, 2] - 1)), min=0)
    dy = torch.clamp(torch.maximum(b[:, 1] - py, py - (b[:, 3] - 1)), min=0)
    hits = (dx**2 + dy**2) <= tolerance**2
    return PointingResult(torch.stack([py, px], dim=1), hits, float(hits.float().mean()), tolerance)


# ============================================================================ sanity check


@dataclass
class SanityResult:
    """Cascading parameter randomisation (Adebayo et al. 2018).

    ``layers``: the randomised layers, top (output) first; row ``k`` of ``spearman`` / ``ssim``
    ((L + 1, N)) compares the map after randomising ``layers[:k]`` with the original map (row 0 = no
    layer randomised, 1.0). ``maps`` (L + 1, N, H, W): the display maps. A method that explains the
    model should lose similarity as layers are randomised."""

    method: str
    layers: list[str]
    spearman: torch.Tensor
    ssim: torch.Tensor | None
    maps: torch.Tensor = field(repr=False)
    forward_passes: int = 0
    backward_passes: int = 0


def _parametrized_layers(module: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules owning parameters directly, in the order the forward pass runs them."""
    names = {m: n for n, m in module.named_modules() if n and any(True for _ in m.parameters(recurse=False))}
    seen: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, a, o: seen.append(names[mod]) if names[mod] not in seen else None)
        for m in names
    ]
    try:
        with torch.no_grad():
            module(x[:1])
    finally:
        for h in handles:
            h.remove()
    return seen


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of rows (ties get average ranks)."""
    from scipy.stats import spearmanr  # heavy: loaded only for the sanity check

    out = []
    for u, v in zip(
        a.reshape(a.shape[0], -1).cpu().numpy(), b.reshape(b.shape[0], -1).cpu().numpy(), strict=True
    ):
        r = spearmanr(u, v).statistic if u.std() > 0 and v.std() > 0 else (1.0 if (u == v).all() else 0.0)
        out.append(float(r))
    return torch.tensor(out)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from skimage.metrics import structural_similarity  # heavy: loaded only for the sanity check

    vals = [
        structural_similarity(u, v, data_range=1.0)
        for u, v in zip(a.cpu().numpy(), b.cpu().numpy(), strict=True)
    ]
    return torch.tensor(vals, dtype=torch.float32)


def cascading_randomization(
    model: Any,
    x: Any,
    method: str = "gradcam",
    target: Any = None,
    *,
    layer: str | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    ssim: bool = True,
    progress: bool = True,
    **options: Any,
) -> SanityResult:
    """Sanity check of an attribution method (Adebayo et al. 2018, cascading randomisation).

    On a deep copy of the model (the user's module is never changed), the parameters of ``layers``
    (default: every layer owning parameters, from the output down) are re-drawn one layer more per
    step, N(0, std of the original tensor), seeded by ``seed``; after each step ``method`` is recomputed
    for the same target and compared with the original map by Spearman rank correlation and, with
    ``ssim``, SSIM of the [0, 1] display maps. ``layer``/``options`` go to :func:`convscope.attribute`. ``progress``: a bar over
    the layers on a terminal."""
    model = model_for_input(model, x)
    module = model.module
    xt = model.as_input(x).detach()
    twin = copy.deepcopy(module)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    base = attribute(model, xt, method=method, target=target, layer=layer, progress=progress, **options)
    tgt, layer = base.target, base.layer
    if layers is None:
        order = list(reversed(_parametrized_layers(twin, xt)))
    else:
        order = list(layers)
        for name in order:
            resolve_layer(twin, name)
    gen = torch.Generator().manual_seed(seed)
    maps = [base.map.float().cpu()]
    fwd, bwd = base.forward_passes, base.backward_passes
    for name in tqdm(order, desc="randomise", unit="layer", disable=None if progress else True, leave=False):
        sub = resolve_layer(twin, name)
        with torch.no_grad():
            for p in sub.parameters(recurse=False):
                std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
                p.copy_(torch.randn(p.shape, generator=gen).mul_(std).to(p.device, p.dtype))
        a = attribute(twin, xt, method=method, target=tgt, layer=layer, progress=progress, **options)
        fwd, bwd = fwd + a.forward_passes, bwd + a.backward_passes
        m = a.map.float().cpu()
        maps.append(torch.nan_to_num(m))
    stacked = torch.stack(maps)
    ref = minmax(stacked[0])
    spear = torch.stack([_spearman(ref, m) for m in stacked])
    sim = torch.stack([_ssim(ref, minmax(m)) for m in stacked]) if ssim else None
    return SanityResult(method, order, spear, sim, stacked, fwd, bwd)
