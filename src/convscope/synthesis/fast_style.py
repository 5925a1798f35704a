"""Fast feed-forward style transfer (Johnson, Alahi & Fei-Fei, ECCV 2016).

An image-transformation network (:class:`TransformNet`: 9x9 conv, two stride-2 convs, residual blocks,
two nearest-upsampling convs, 9x9 conv; instance normalisation and ReLU; sigmoid output in [0, 1])
is trained for one style on a folder of content images with the perceptual loss of a fixed loss network:
``content_weight * mean (F(y) - F(x))^2`` at the content layer plus ``style_weight * sum_l mean
(G_l(y) - G_l(style))^2`` (Gram matrices as in :mod:`.style`). After training, :func:`stylize` costs
one forward pass of the small network. ``width`` and ``blocks`` shrink the network so that a short
training run is practical on a CPU (Johnson: width 32, 5 blocks, 256 px crops, batch 4, Adam 1e-3).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import ConvscopeError, ImageError
from ..images import IMAGE_SUFFIXES, ImageLike, list_images, load_image
from ..models import Model
from ..probe import Capture
from .bounds import SIZE
from .network import network
from .result import ShortRepr, interruptible, pil_to_pixels, pixels_to_pil, seeded
from .style import default_layers, gram, gram_loss, image_pixels


class _ConvLayer(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, norm: bool = True, relu: bool = True):
        layers: list[nn.Module] = [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride)]
        if norm:
            layers.append(nn.InstanceNorm2d(cout, affine=True))
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_ConvLayer(c, c, 3), _ConvLayer(c, c, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvLayer(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TransformNet(nn.Module):
    """Johnson et al.'s image-transformation network; pixels (N, 3, H, W) in [0, 1] -> same shape in [0, 1].

    Channel widths ``width``, 2 ``width``, 4 ``width``; ``blocks`` residual blocks at 1/4 resolution.
    H and W should be multiples of 4 (other sizes are resized back to the input size). ``skip`` (default)
    adds the input's logit before the output sigmoid, so the network starts as the identity and learns a
    change of the content image; without it (Johnson's network) a short CPU training run never learns to
    reproduce the content and outputs pure style texture.
    """

    def __init__(self, width: int = 32, blocks: int = 5, skip: bool = True):
        super().__init__()
        if width < 1 or blocks < 0:
            raise ConvscopeError("TransformNet needs width >= 1 and blocks >= 0")
        self.config = {"width": int(width), "blocks": int(blocks), "skip": bool(skip)}
        w = width
        self.down = nn.Sequential(_ConvLayer(3, w, 9), _ConvLayer(w, 2 * w, 3, 2), _ConvLayer(2 * w, 4 * w, 3, 2))
        self.res = nn.Sequential(*[_Residual(4 * w) for _ in range(blocks)])
        self.up = nn.Sequential(_Up(4 * w, 2 * w), _Up(2 * w, w), _ConvLayer(w, 3, 9, norm=False, relu=False))
        if skip:  # start at the identity: the network learns a change of the content image
            with torch.no_grad():
                self.up[-1][1].weight.mul_(0.1)
                self.up[-1][1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.up(self.res(self.down(x * 2 - 1)))
        if t.shape[2:] != x.shape[2:]:
            t = F.interpolate(t, size=x.shape[2:], mode="bilinear", align_corners=False)
        if self.config["skip"]:
            t = t + torch.logit(x.clamp(0.01, 0.99))
        return torch.sigmoid(t)


@dataclass(repr=False)
class FastStyleResult(ShortRepr):
    """A trained :class:`TransformNet` and its training curve (total, style and content loss per step)."""

    net: TransformNet
    history: list[float]
    style_history: list[float]
    content_history: list[float]
    steps: int
    seconds: float
    interrupted: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """What to save: ``{"config": ..., "state_dict": ...}`` (load with :func:`load_transform_net`)."""
        return {"config": dict(self.net.config), "state_dict": self.net.state_dict(), "steps": self.steps}


def load_transform_net(state: dict[str, Any], device: torch.device | str | None = None) -> TransformNet:
    """Rebuild a :class:`TransformNet` from :meth:`FastStyleResult.state` (e.g. ``torch.load(..., weights_only=True)``)."""
    try:
        net = TransformNet(**{"skip": False, **state["config"]})  # files from before the skip had none
        net.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ConvscopeError(f"not a convscope fast-style network ({exc})") from None
    return net.to(device or "cpu").eval()


def image_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files of a folder (recursively, sorted) or an explicit list; an empty result is an error."""
    if isinstance(data, (str, os.PathLike)):
        files = list_images(data)
    else:
        files = [Path(p) for p in data]
    if not files:
        raise ImageError(f"{data}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _crop(img: Image.Image, size: int, gen: torch.Generator) -> torch.Tensor:
    """Resize the shorter side to ``size``, take a random ``size`` x ``size`` crop -> (3, size, size) in [0, 1]."""
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))), Image.Resampling.BILINEAR)
    x0 = int(torch.randint(img.size[0] - size + 1, (1,), generator=gen))
    y0 = int(torch.randint(img.size[1] - size + 1, (1,), generator=gen))
    return pil_to_pixels(img.crop((x0, y0, x0 + size, y0 + size)))[0]


def train_fast_style(
    model: Model | Any,
    style: ImageLike | torch.Tensor,
    data: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    steps: int = 2000,
    batch_size: int = 4,
    size: int = 256,
    lr: float = 1e-3,
    content_weight: float = 1e5,
    style_weight: float = 4e7,
    width: int = 32,
    blocks: int = 5,
    style_layers: Sequence[str] | None = None,
    content_layers: Sequence[str] | None = None,
    net: TransformNet | None = None,
    checkpoint: Callable[[int, FastStyleResult], None] | None = None,
    checkpoint_every: int = 200,
    seed: int | None = 0,
    progress: bool | None = None,
) -> FastStyleResult:
    """Train a :class:`TransformNet` for ``style`` on the images in ``data`` (Johnson et al. 2016).

    ``model``: the loss network (a convscope Model or module; style layers from
    :func:`~convscope.synthesis.style.default_layers` unless given, content at the second style layer,
    like Johnson's relu2_2). Default weights: content 1e5, style 4e7. Johnson's 1e10 style weight is for
    VGG-16; on the built-in model it makes the style term about 2600 times the content term at the start
    and the network outputs pure texture; at 4e7 the two start comparable and the stylised image keeps
    the content (features at the content layer nearer the content image's than the style image's). Each step: a batch of random
    ``size`` crops, y = net(x), loss = content + style as in the module docstring, one Adam step.
    ``net``: continue training this network. ``checkpoint(step, result)`` is called every
    ``checkpoint_every`` steps and at the end (the front end decides where to write). Ctrl-C stops and
    returns the network trained so far.
    """
    loss_net = network(model)
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ConvscopeError("fast style training needs steps >= 1, batch_size >= 1 and lr > 0")
    SIZE.check("size", size, "train_fast_style")
    files = image_files(data)
    s_layers, c_layers = default_layers(loss_net.model)
    s_layers = list(style_layers) if style_layers is not None else s_layers
    # Johnson et al.'s content layer is relu2_2, a middle-shallow one: the second of the style layers (the
    # Gatys conv4_2-like default of style transfer is too deep; the output then keeps no content)
    c_layers = list(content_layers) if content_layers is not None else [s_layers[min(1, len(s_layers) - 1)]]
    gen = seeded(seed)
    if net is None:
        torch.manual_seed(int(seed) if seed is not None else 0)
        net = TransformNet(width, blocks)
    net = net.to(loss_net.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    result = FastStyleResult(net, [], [], [], 0, 0.0)
    images: dict[int, Image.Image] = {}
    with Capture(loss_net.module, list(dict.fromkeys(s_layers + c_layers)), grads=True, stop=True) as cap:
        with torch.no_grad():
            cap.forward(loss_net.normalize(image_pixels(style, size, loss_net)))
            target = {n: gram(cap.activations[n]).detach() for n in s_layers}
        with interruptible(steps, "style-train", progress) as run:
            for step in range(steps):
                picks = torch.randint(len(files), (batch_size,), generator=gen).tolist()
                batch = []
                for i in picks:
                    if i not in images:
                        images[i] = load_image(files[i])
                    batch.append(_crop(images[i], size, gen))
                x = torch.stack(batch).to(loss_net.device)
                y = net(x)
                with torch.no_grad():
                    cap.forward(loss_net.normalize(x))
                    content_target = {n: cap.activations[n].detach().clone() for n in c_layers}
                cap.forward(loss_net.normalize(y))
                acts = cap.activations
                c_loss = content_weight * sum(F.mse_loss(acts[n], content_target[n]) for n in c_layers)
                # mean squared Gram error per element, as mse_loss would give, in two matrix products per layer
                s_loss = style_weight * sum(gram_loss(acts[n], target[n]) / acts[n].shape[0] for n in s_layers)
                loss = c_loss + s_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                result.history.append(float(loss.detach()))
                result.style_history.append(float(s_loss.detach()))
                result.content_history.append(float(c_loss.detach()))
                result.steps = step + 1
                run.tick()
                if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                    result.seconds = run.seconds
                    checkpoint(step + 1, result)
    net.eval()
    result.interrupted = run.interrupted
    result.seconds = run.seconds
    if checkpoint is not None:
        checkpoint(result.steps, result)
    return result


@torch.no_grad()
def stylize(net: TransformNet, image: ImageLike | torch.Tensor, size: int | None = None) -> Image.Image:
    """Apply a trained :class:`TransformNet` to an image (one forward pass); ``size``: shorter side in px."""
    dev = next(net.parameters()).device
    if isinstance(image, torch.Tensor):
        x = (image if image.ndim == 4 else image.unsqueeze(0)).to(dev)
    else:
        img = load_image(image)
        if size:
            SIZE.check("size", size, "stylize")
            s = size / min(img.size)
            img = img.resize((max(4, round(img.size[0] * s)), max(4, round(img.size[1] * s))), Image.Resampling.BICUBIC)
        x = pil_to_pixels(img).to(dev)
    training = net.training
    net.eval()
    try:
        return pixels_to_pil(net(x))[0]
    finally:
        net.train(training)
