"""Texture synthesis and neural style transfer with Gram matrices (Gatys, Ecker & Bethge 2015, 2016).

For features F (C, HW) at a layer, the Gram matrix is G = F F^T / (C H W) (the PyTorch tutorial's
normalisation). The style loss is sum_l mean (G_l(x) - G_l^target)^2 over the style layers; with
several style images the target is the weighted mean of their Gram matrices. The content loss is
mean (F(x) - F(content))^2 at the content layer(s). Style transfer minimises
``content_weight * content + style_weight * style``; texture synthesis is the style term alone, from
noise. Optimisers: L-BFGS (Gatys) or Adam. The image is optimised through a sigmoid (always a valid
image, no clamping that would break L-BFGS's curvature model) or, with ``param="clamp"``, as raw pixels
projected onto [0, 1] before every evaluation (the PyTorch tutorial's way). ``preserve_color`` keeps the content image's
colours (luminance-only transfer, Gatys et al. 2016): the result's Y channel with the content's I, Q.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError
from ..images import ImageLike, load_image
from ..models import Model, as_model
from ..probe import Capture
from .bounds import check_size
from .network import Network, NotDifferentiableError, network
from .regularizers import total_variation
from .result import SynthesisResult, interruptible, pil_to_pixels, seeded


def average_pooling(model: Model | Any) -> Model:
    """A copy of ``model`` whose max-pooling layers are average pooling with the same window, stride, padding and
    rounding (Gatys et al. 2015: "replacing the max-pooling operation by average pooling improves the gradient
    flow and one obtains slightly more appealing results"). The user's model is not changed; a model without
    max-pooling is returned as a copy unchanged."""
    import copy

    from torch import nn

    model = as_model(model)
    module = copy.deepcopy(model.module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                if child.dilation not in (1, (1, 1)):
                    raise ConvscopeError("average pooling cannot replace a dilated max-pooling")
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode, count_include_pad=False))
    import dataclasses

    return dataclasses.replace(model, module=module, name=f"{model.name} (average pooling)", _layer_cache=None)


def _rows(f: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Features (N, C, H, W) as a matrix without copying: (N, HW, C) for channels-last storage
    (``True``), else (N, C, HW) (``False``)."""
    n, c = f.shape[:2]
    if c > 1 and f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous():
        return f.permute(0, 2, 3, 1).reshape(n, -1, c), True
    return f.reshape(n, c, -1), False


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrices (N, C, C) of features (N, C, H, W), divided by C*H*W (any memory format)."""
    flat, last = _rows(f)
    g = torch.bmm(flat.transpose(1, 2), flat) if last else torch.bmm(flat, flat.transpose(1, 2))
    return g / flat[0].numel()


class _GramLoss(torch.autograd.Function):
    """sum over the batch of ||G(f) - T||^2 / C^2, with G from :func:`gram`, in two matrix products.

    Autograd through ``gram`` then ``mse_loss`` spends three (the forward product and one per factor in
    the backward); here the backward is dL/dF = 4 (G - T) F / (C^2 * C H W) for symmetric G - T.
    """

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        flat, last = _rows(f)
        g = gram(f)
        diff = g - target
        diff = (diff + diff.transpose(1, 2)) / 2  # exact for symmetric targets; keeps the backward exact
        c = f.shape[1]
        ctx.save_for_backward(flat, diff)
        ctx.meta = (last, tuple(f.shape), c, flat[0].numel())
        return diff.pow(2).sum() / c**2

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        flat, diff = ctx.saved_tensors
        last, shape, c, numel = ctx.meta
        scale = grad_out * 4.0 / (c**2 * numel)
        if last:  # (N, HW, C) @ (N, C, C) -> channels-last (N, C, H, W)
            n, _, h, w = shape
            grad = torch.bmm(flat, diff).mul_(scale).reshape(n, h, w, c).permute(0, 3, 1, 2)
        else:
            grad = torch.bmm(diff, flat).mul_(scale).reshape(shape)
        return grad, None


def gram_loss(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Style loss of one layer: ``sum ||gram(f) - target||^2 / C^2`` (target (1 or N, C, C), symmetric)."""
    return _GramLoss.apply(f, target.expand(f.shape[0], -1, -1) if target.shape[0] != f.shape[0] else target)


def default_layers(model: Any) -> tuple[list[str], list[str]]:
    """(style layers, content layers): Gatys's conv1_1..conv5_1 / conv4_2 for torchvision VGG; else the
    first layer at each of the first five resolutions (style) and the fourth of them (content)."""
    model = as_model(model)
    feats = getattr(model.module, "features", None)
    if isinstance(feats, torch.nn.Sequential):
        convs = [f"features.{i}" for i, m in enumerate(feats) if isinstance(m, torch.nn.Conv2d)]
        if len(convs) == 16:  # VGG-19
            return [convs[i] for i in (0, 2, 4, 8, 12)], [convs[9]]
        if len(convs) == 13:  # VGG-16
            return [convs[i] for i in (0, 2, 4, 7, 10)], [convs[8]]
    rows = model.layers()
    spatial = [r for r in rows if r.is_spatial and r.output_shape is not None]
    # containers that span several resolutions (e.g. a whole ``blocks`` Sequential) say nothing about one scale
    spans = {r.name for r in spatial
             if len({o.output_shape[2:] for o in spatial if o.name.startswith(r.name + ".")}) > 2}
    seen: dict[tuple[int, ...], str] = {}
    for r in spatial:
        if r.depth <= 2 and r.name not in spans and r.output_shape[2:] not in seen:
            seen[r.output_shape[2:]] = r.name
    picks = list(seen.values())[:5]
    if not picks:
        raise ConvscopeError("the model has no spatial layers for style losses")
    return picks, [picks[min(3, len(picks) - 1)]]


@dataclass(repr=False)
class StyleResult(SynthesisResult):
    """A stylised image or synthesised texture; ``history``: total loss per function evaluation.

    ``extras["times"]``: seconds since the call started at each evaluation (targets included).
    """

    style_loss: float
    content_loss: float
    style_history: list[float]
    evaluations: int
    style_layers: list[str]
    content_layers: list[str]


def image_pixels(image: ImageLike | torch.Tensor, size: int | tuple[int, int] | None, net: Network) -> torch.Tensor:
    """Pixels (1, 3, H, W) in [0, 1] on the network's device from an image (path, PIL, ``sample:NAME``)
    or a tensor already in pixel units, resized to ``size`` (a side or (H, W)) when given."""
    if isinstance(image, torch.Tensor):
        p = image if image.ndim == 4 else image.unsqueeze(0)
        p = p.detach().to(net.device, net.dtype)
    else:
        p = pil_to_pixels(load_image(image)).to(net.device, net.dtype)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else size
        if tuple(p.shape[2:]) != tuple(hw):
            p = F.interpolate(p, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return p.clamp(0, 1)


@torch.no_grad()
def _project(raw: torch.Tensor, param: str) -> None:
    """With ``param="clamp"``, project the optimised pixels onto [0, 1] in place (sigmoid needs nothing)."""
    if param == "clamp":
        raw.clamp_(0, 1)


def _color_stats(pixels: torch.Tensor) -> torch.Tensor:
    """Mean (3) and covariance (3x3) of the pixel colours of (1, 3, H, W), as one vector of 12."""
    flat = pixels.reshape(3, -1)
    mu = flat.mean(1)
    centred = flat - mu[:, None]
    return torch.cat([mu, (centred @ centred.T / flat.shape[1]).flatten()])


def _preserve_color(result: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Luminance of ``result`` with the chrominance (YIQ) of ``content``."""
    m = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                     device=result.device, dtype=result.dtype)
    y = torch.einsum("ck,nkhw->nchw", m, result)
    c = torch.einsum("ck,nkhw->nchw", m, F.interpolate(content, size=result.shape[2:], mode="bilinear", align_corners=False))
    yiq = torch.cat([y[:, :1], c[:, 1:]], 1)
    return torch.einsum("ck,nkhw->nchw", torch.linalg.inv(m), yiq).clamp(0, 1)


def style_transfer(
    model: Model | Any,
    content: ImageLike | torch.Tensor | None,
    styles: ImageLike | torch.Tensor | Sequence[ImageLike | torch.Tensor],
    *,
    style_weights: Sequence[float] | None = None,
    content_weight: float = 1.0,
    style_weight: float = 1e6,
    steps: int = 300,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    size: int | tuple[int, int] | None = 128,
    init: str = "content",
    param: str = "sigmoid",
    style_layers: Sequence[str] | None = None,
    content_layers: Sequence[str] | None = None,
    preserve_color: bool = False,
    tv_weight: float = 0.0,
    color_weight: float = 0.0,
    line_search: bool = False,
    channels_last: bool = True,
    seed: int | None = 0,
    progress: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StyleResult:
    """Neural style transfer (Gatys et al. 2015); with ``content=None``, texture synthesis.

    ``styles``: one image or several, blended by ``style_weights`` (normalised to sum 1) through their
    Gram matrices. ``steps``: function evaluations (L-BFGS counts each closure call, as the PyTorch
    tutorial does; Adam one per step). ``lr``: L-BFGS step (default 1) or Adam rate (default 0.02).
    ``init``: ``"content"`` or ``"noise"``. ``size``: side (or (H, W)) of the content and of the
    output; style images are resized to it. ``channels_last``: run the network on channels-last (NHWC)
    activations, the faster layout for CPU convolutions (same losses). ``style_loss``
    and ``content_loss`` are the final weighted terms. Two image priors, off by default (Gatys et al.
    used none; with a modern network as loss network they remove grain and colour casts):
    ``tv_weight * mean (dx^2 + dy^2)`` (total variation, as in Mahendran & Vedaldi and Johnson et al.)
    and ``color_weight * (||mu(x) - mu(s)||^2 + ||C(x) - C(s)||^2)``, matching the mean and 3x3
    covariance of the pixel colours to the style images' (blended like the Gram matrices).
    """
    net = network(model, mean=mean, std=std)
    check_size(size, "style_transfer")
    if steps < 1:
        raise ConvscopeError(f"steps must be >= 1, got {steps}")
    if optimizer not in ("lbfgs", "adam"):
        raise ConvscopeError(f"unknown optimizer {optimizer!r}; choose lbfgs or adam")
    if param not in ("sigmoid", "clamp"):
        raise ConvscopeError(f"unknown param {param!r}; choose sigmoid or clamp")
    if content_weight < 0 or style_weight < 0 or tv_weight < 0 or color_weight < 0:
        raise ConvscopeError("loss weights must be non-negative")
    style_list = list(styles) if isinstance(styles, (list, tuple)) else [styles]
    if not style_list:
        raise ConvscopeError("at least one style image is needed")
    w = torch.tensor(list(style_weights) if style_weights is not None else [1.0] * len(style_list), dtype=torch.float64)
    if len(w) != len(style_list) or (w < 0).any() or w.sum() <= 0:
        raise ConvscopeError("style weights: one non-negative weight per style image, not all zero")
    w = (w / w.sum()).tolist()
    s_layers, c_layers = default_layers(net.model)
    s_layers = list(style_layers) if style_layers is not None else s_layers
    c_layers = list(content_layers) if content_layers is not None else c_layers
    if content is None:
        c_layers, content_weight = [], 0.0
    layers = list(dict.fromkeys(s_layers + c_layers))
    gen = seeded(seed)
    # targets in the layout the optimised image will have: losses then compare like with like (no copies)
    layout = (lambda t: t.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda t: t)
    t0 = time.perf_counter()
    with Capture(net.module, layers, grads=True, stop=True) as cap:
        # targets: computed once
        with torch.no_grad():
            cp = image_pixels(content, size, net) if content is not None else None
            hw = tuple(cp.shape[2:]) if cp is not None else ((size, size) if isinstance(size, int) else tuple(size or net.input_size))
            target_grams = {name: 0 for name in s_layers}
            color_target = torch.zeros(12, device=net.device, dtype=net.dtype)
            for weight, s in zip(w, style_list):
                sp = image_pixels(s, hw, net)
                color_target = color_target + weight * _color_stats(sp)
                cap.forward(layout(net.normalize(sp)))
                for name in s_layers:
                    target_grams[name] = target_grams[name] + weight * gram(cap.activations[name]).detach()
            target_content = {}
            if cp is not None:
                cap.forward(layout(net.normalize(cp)))
                target_content = {name: cap.activations[name].detach().clone() for name in c_layers}
        if init == "content" and cp is not None:
            start = cp.clone()
        elif init in ("noise", "content"):
            start = torch.rand((1, 3, *hw), generator=gen).to(net.device, net.dtype)
        else:
            raise ConvscopeError(f"unknown init {init!r}; choose content or noise")
        raw = torch.logit(start.clamp(1e-3, 1 - 1e-3)) if param == "sigmoid" else start.clone()
        if channels_last:
            # stored (N, H, W, 3) and seen as a channels-last (N, 3, H, W) view: every convolution then runs
            # in the NHWC layout (faster on CPU), while the optimiser still sees one contiguous tensor
            raw = raw.permute(0, 2, 3, 1).contiguous()
        raw.requires_grad_(True)
        nchw = (lambda t: t.permute(0, 3, 1, 2)) if channels_last else (lambda t: t)
        image = (lambda: torch.sigmoid(nchw(raw))) if param == "sigmoid" else (lambda: nchw(raw))
        history: list[float] = []
        style_hist: list[float] = []
        times: list[float] = []
        last = {"style": 0.0, "content": 0.0}

        def closure() -> torch.Tensor:
            _project(raw, param)  # every evaluation sees a valid image
            opt.zero_grad(set_to_none=True)
            cap.forward(net.normalize(image()))
            acts = cap.activations
            s_loss = sum(gram_loss(acts[n], target_grams[n]) for n in s_layers)
            c_loss = sum(F.mse_loss(acts[n], target_content[n]) for n in c_layers) if c_layers else torch.zeros((), device=raw.device)
            loss = style_weight * s_loss + content_weight * c_loss
            if tv_weight or color_weight:
                pixels = image()
                if tv_weight:
                    loss = loss + tv_weight * total_variation(pixels).sum()
                if color_weight:
                    loss = loss + color_weight * (_color_stats(pixels) - color_target).pow(2).sum()
            if not loss.requires_grad:
                raise NotDifferentiableError("the style loss does not depend differentiably on the image")
            loss.backward()
            history.append(float(loss.detach()))
            times.append(time.perf_counter() - t0)
            style_hist.append(float(style_weight * s_loss.detach()))
            last["style"], last["content"] = style_hist[-1], float(content_weight * c_loss.detach())
            run.tick()
            return loss

        with interruptible(steps, "texture" if content is None else "style", progress) as run:
            if optimizer == "lbfgs":
                opt: torch.optim.Optimizer = torch.optim.LBFGS([raw], lr=lr or 1.0, max_iter=steps, max_eval=steps,
                                                                tolerance_grad=0, tolerance_change=0, history_size=100,
                                                                line_search_fn="strong_wolfe" if line_search else None)
                while len(history) < steps:
                    before = len(history)
                    opt.step(closure)
                    _project(raw, param)
                    if len(history) == before:
                        break
            else:
                opt = torch.optim.Adam([raw], lr=lr or 0.02)
                for _ in range(steps):
                    opt.step(closure)
                    _project(raw, param)
    pixels = image().detach().clamp(0, 1)
    if preserve_color and cp is not None:
        pixels = _preserve_color(pixels, cp)
    return StyleResult(input=net.normalize(pixels), pixels=pixels, history=history, style_loss=last["style"],
                       content_loss=last["content"], style_history=style_hist, evaluations=len(history),
                       seconds=time.perf_counter() - t0, style_layers=s_layers, content_layers=c_layers,
                       interrupted=run.interrupted, extras={"times": times})


def texture(model: Model | Any, style: ImageLike | torch.Tensor | Sequence[ImageLike | torch.Tensor], **options: Any) -> StyleResult:
    """Texture synthesis (Gatys et al. 2015): match the style image's Gram matrices from noise.

    Same options as :func:`style_transfer` (``init`` is always noise), except that the image priors are
    on by default: ``tv_weight=1e7`` and ``color_weight=1e7`` (with ``style_weight`` 1e6). Without them
    the built-in model gives the texture's structure under heavy rainbow noise and loses a grey
    texture's colour; with them (and a few hundred L-BFGS evaluations) it is clean and in its colours.
    """
    options["init"] = "noise"
    options.setdefault("tv_weight", 1e7)
    options.setdefault("color_weight", 1e7)
    return style_transfer(model, None, style, **options)
