"""Inverting a layer with a trained up-convolutional network, and activation maximisation through it (DGN-AM).

- **UpconvNet** (Dosovitskiy & Brox, "Inverting Visual Representations with Convolutional Networks", CVPR
  2016): a decoder trained on images to map a layer's features phi(x) back to the image x. Loss: the pixel
  mean squared error ||D(phi(x)) - x||^2 (pixels in [0, 1]), plus optionally a feature loss
  ||phi(D(phi(x))) - phi(x)||^2 / ||phi(x)||^2 (``feature_weight``). Unlike inversion by optimisation
  (:mod:`.inversion`), one forward pass of the decoder inverts any image; what it reconstructs shows what the
  layer keeps (the paper's finding: colour and layout survive deep into the network, detail fades).
- **Feature perturbation** in its original form: perturb the features (binarise: keep only which entries are
  positive, at the mean positive value; drop out half of them, rescaled), decode, compare with the plain decoding.
- **DGN-AM** (Nguyen, Dosovitskiy, Yosinski, Brox, Clune, "Synthesizing the preferred inputs for neurons in
  neural networks via deep generator networks", NeurIPS 2016): activation maximisation in the generator's
  code space: optimise a code z so that the classifier's objective on G(z) is largest, with z clipped to the
  range the codes take on real images (per channel) and G's output in [0, 1] by construction (sigmoid); the
  best iterate is returned. Any decoder trained here is a generator; so is any module mapping a code tensor
  to an image in [0, 1].

Training holds the training images' pixels and features in memory (images x channels x h x w floats) and
saves its state atomically (every ``save_every`` steps, at the end and on Ctrl-C) to the output file, from
which the same call resumes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import ConvscopeError
from ..files import atomic_write
from ..images import IMAGE_SUFFIXES, list_images, load_image
from ..models import Model, as_model, model_fingerprint, same_model
from ..options import INT_LIMIT, Option
from ..probe import Capture, guard
from ..render import grid
from .network import network
from .objectives import Objective, as_objective
from .render import capture_for, objective_values
from .result import ShortRepr, SynthesisResult, interruptible, pil_to_pixels, seeded

FORMAT = "convscope-upconv/1"
STEPS = Option(int, 2000, "optimisation steps of the decoder", minimum=1, maximum=10_000_000)
TRAIN_SIZE = Option(int, None, "side of the training images in pixels (default: the model's input size)", minimum=16, maximum=1024)
FEATURE_WEIGHT = Option(float, 0.0, "weight of the feature loss next to the pixel loss", minimum=0.0, maximum=1e6)
WIDTH = Option(int, 64, "channels of the decoder's first layers", minimum=4, maximum=1024)
UPCONV_BATCH = Option(int, 16, "images per training step", minimum=1, maximum=4096)
UPCONV_LR = Option(float, 1e-3, "Adam learning rate", minimum=1e-8, maximum=1.0)
SAVE_EVERY = Option(int, 200, "save the training state every N steps", minimum=1, maximum=INT_LIMIT)
DGN_STEPS = Option(int, 200, "steps of the code optimisation", minimum=1, maximum=1_000_000)
DGN_LR = Option(float, 0.05, "Adam learning rate of the code, in units of the codes' range", minimum=1e-8, maximum=100.0)


class UpconvError(ConvscopeError, ValueError):
    """A decoder file or option that cannot be used: another layer or model, a broken file, too few images."""


# ============================================================================ the decoder


class UpconvDecoder(nn.Module):
    """Features (N, C, h, w) or (N, C) -> pixels (N, 3, H, W) in [0, 1].

    Two 3x3 convolutions, then per factor of two a 4x4 stride-2 transposed convolution and a 3x3 convolution
    (leaky ReLU 0.2 after each, as Dosovitskiy & Brox), the width halving at each step down to 16 channels,
    and a 3x3 convolution to RGB with a sigmoid. Vector features first go through a linear layer to 4 x 4 maps.
    A size that is not the feature size times a power of two is reached by a final bilinear resize.
    """

    def __init__(self, in_channels: int, in_size: tuple[int, int] | None, out_size: tuple[int, int], width: int = 64):
        super().__init__()
        self.config = {"in_channels": int(in_channels), "in_size": list(in_size) if in_size else None,
                       "out_size": list(out_size), "width": int(width)}
        act = nn.LeakyReLU(0.2)
        if in_size is None:
            self.stem = nn.Sequential(nn.Linear(in_channels, width * 16), act, nn.Unflatten(1, (width, 4, 4)))
            h = 4
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), act,
                                      nn.Conv2d(width, width, 3, padding=1), act)
            h = min(in_size)
        ups = max(0, round(math.log2(max(1, min(out_size) / h))))
        layers: list[nn.Module] = []
        c = width
        for _ in range(ups):
            nxt = max(16, c // 2)
            layers += [nn.ConvTranspose2d(c, nxt, 4, stride=2, padding=1), act, nn.Conv2d(nxt, nxt, 3, padding=1), act]
            c = nxt
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 3, 3, padding=1)
        self.out_size = tuple(out_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.head(self.body(self.stem(z)))
        if tuple(y.shape[-2:]) != self.out_size:
            y = F.interpolate(y, size=self.out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(y)


@dataclass(eq=False, repr=False)
class UpconvNet(ShortRepr):
    """A trained decoder of ``layer`` with what it needs: the model's fingerprint, the training image size,
    the code range per channel (``code_min``/``code_max``, used by DGN-AM) and the training history."""

    decoder: UpconvDecoder = field(repr=False)
    layer: str
    size: tuple[int, int]
    code_min: torch.Tensor
    code_max: torch.Tensor
    fingerprint: dict[str, Any] = field(repr=False)
    step: int = 0
    history: list[float] = field(default_factory=list)
    held_out: list[float] = field(default_factory=list)
    feature_weight: float = 0.0
    #: Ctrl-C ended the training (what was done is saved); not stored in the file.
    interrupted: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Features of ``layer`` -> pixels (N, 3, H, W) in [0, 1] (no gradient kept unless enabled)."""
        return self.decoder(features.to(self.device, torch.float32))

    def state(self) -> dict[str, Any]:
        """Everything as plain tensors, numbers and strings (loads with ``torch.load(weights_only=True)``)."""
        return {"format": FORMAT, "config": self.decoder.config, "weights": self.decoder.state_dict(), "layer": self.layer,
                "size": list(self.size), "code_min": self.code_min.cpu(), "code_max": self.code_max.cpu(),
                "fingerprint": self.fingerprint, "step": self.step, "history": list(self.history),
                "held_out": list(self.held_out), "feature_weight": self.feature_weight}

    def save(self, path: str | os.PathLike, optimizer: dict[str, Any] | None = None) -> Path:
        """Write atomically (temporary file, then rename)."""
        state = self.state()
        if optimizer is not None:
            state["optimizer"] = optimizer
        return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_upconv(path: str | os.PathLike, device: str | torch.device | None = None) -> UpconvNet:
    """Read a decoder written by :func:`train_upconv` (safe: ``weights_only`` loading, no pickled code)."""
    net, _ = _load(Path(path), device)
    return net


def _load(path: Path, device: Any) -> tuple[UpconvNet, dict[str, Any] | None]:
    if not path.is_file():
        raise UpconvError(f"{path}: no such decoder file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding pickled objects
        raise UpconvError(f"{path}: not a convscope decoder file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UpconvError(f"{path}: not a convscope decoder file (written by convscope upconv-train)")
    cfg = state["config"]
    dec = UpconvDecoder(cfg["in_channels"], tuple(cfg["in_size"]) if cfg["in_size"] else None, tuple(cfg["out_size"]), cfg["width"])
    dec.load_state_dict(state["weights"])
    dec.eval().requires_grad_(False)
    if device is not None:
        dec.to(device)
    net = UpconvNet(dec, state["layer"], tuple(state["size"]), state["code_min"], state["code_max"], state["fingerprint"],
                    int(state["step"]), list(state["history"]), list(state["held_out"]), float(state["feature_weight"]))
    return net, state.get("optimizer")


# ============================================================================ training


def _images(images: Any) -> list[Any]:
    if isinstance(images, (str, os.PathLike)) and not str(images).startswith("sample:"):
        p = Path(images)
        if p.is_dir():
            files = list_images(p)
            if not files:
                raise UpconvError(f"{p}: no image files found ({', '.join(IMAGE_SUFFIXES)})")
            return files
        return [p]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise UpconvError(f"cannot train on a {type(images).__name__}; pass a folder or a list of images")


def _pixels(model: Model, items: Sequence[Any], size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """The images as pixels (N, 3, H, W) in [0, 1], transformed like the model's input (shorter side resized,
    centre crop) then resized to ``size``; unreadable files are skipped and listed."""
    out, skipped = [], []
    for item in items:
        try:
            pic = model.transform_image(load_image(item))
        except ConvscopeError as exc:
            skipped.append(str(exc))
            continue
        if pic.size != (size[1], size[0]):
            pic = pic.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        out.append(pil_to_pixels(pic))
    if not out:
        raise UpconvError("none of the training images could be read" + (f" (first: {skipped[0]})" if skipped else ""))
    return torch.cat(out), skipped


def layer_features(model: Model, layer: str, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``layer``'s activations for pixel images (N, 3, H, W) in [0, 1], on the CPU, float32 (no gradient)."""
    chunks = []
    with torch.no_grad(), Capture(model.module, [layer], stop=True) as cap:
        for lo in range(0, len(pixels), batch_size):
            cap.forward(model.from_pixels(pixels[lo:lo + batch_size].to(model.device)))
            chunks.append(cap.activations[layer].float().cpu())
    feats = torch.cat(chunks)
    if feats.ndim not in (2, 4):
        raise UpconvError(f"layer {layer!r} gives features of shape {tuple(feats.shape[1:])}; choose a layer with "
                          "(C, H, W) maps or a (C,) vector")
    return feats


def train_upconv(
    model: Any,
    images: Any,
    layer: str,
    *,
    output: str | os.PathLike | None = None,
    steps: int = 2000,
    size: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    feature_weight: float = 0.0,
    width: int = 64,
    held_out: float = 0.1,
    save_every: int = 200,
    seed: int = 0,
    resume: bool = True,
    progress: bool | None = True,
) -> UpconvNet:
    """Train an up-convolutional decoder of ``layer`` (Dosovitskiy & Brox 2016) on ``images`` (a folder or a list).

    ``steps`` Adam steps (``lr``) of ``batch_size`` images at ``size`` px (default: the model's input size);
    loss = pixel MSE + ``feature_weight`` x normalised feature MSE. ``held_out``: the share of images kept out of
    training; their pixel MSE is recorded at every save (``net.held_out``). ``output``: the decoder file, saved
    atomically every ``save_every`` steps, at the end and on Ctrl-C; with ``resume`` an existing file of the same
    model, layer and size is continued (its step count and optimiser state). Returns the :class:`UpconvNet`.
    """
    model = as_model(model)
    for name, opt, value in (("steps", STEPS, steps), ("batch_size", UPCONV_BATCH, batch_size), ("lr", UPCONV_LR, lr),
                             ("feature_weight", FEATURE_WEIGHT, feature_weight), ("width", WIDTH, width),
                             ("save_every", SAVE_EVERY, save_every), ("size", TRAIN_SIZE, size)):
        opt.check(name, value, "train_upconv")
    if not 0 <= held_out < 0.9:
        raise UpconvError(f"held_out must be in [0, 0.9), got {held_out}")
    side = (size, size) if size else model.input_size
    pixels, _ = _pixels(model, _images(images), side)
    n_val = int(round(held_out * len(pixels))) if len(pixels) > 2 else 0
    train_px, val_px = pixels[n_val:], pixels[:n_val]
    with guard(model.module, eval=True, freeze=True):
        feats = layer_features(model, layer, pixels)
        train_f, val_f = feats[n_val:], feats[:n_val]
        dims = tuple(range(2, feats.ndim)) + (0,)
        code_min, code_max = feats.amin(dim=dims), feats.amax(dim=dims)
        fingerprint = model_fingerprint(model.module)
        spatial = tuple(feats.shape[-2:]) if feats.ndim == 4 else None
        torch.manual_seed(seed)
        decoder = UpconvDecoder(feats.shape[1], spatial, side, width).to(model.device)
        net = UpconvNet(decoder, layer, side, code_min, code_max, fingerprint, feature_weight=feature_weight)
        opt = torch.optim.Adam(decoder.parameters(), lr=lr)
        if output is not None and resume and Path(output).exists():
            old, opt_state = _load(Path(output), model.device)
            _check_same_run(old, net, Path(output))
            decoder.load_state_dict(old.decoder.state_dict())
            net.step, net.history, net.held_out = old.step, old.history, old.held_out
            if opt_state:
                opt.load_state_dict(opt_state)
        gen = seeded(seed + net.step)
        decoder.train()
        feature_capture = Capture(model.module, [layer], stop=True) if feature_weight else None

        def save() -> None:
            decoder.eval()
            if len(val_px):
                with torch.no_grad():
                    rec = net.decode(val_f)
                    net.held_out.append(float(F.mse_loss(rec.cpu(), val_px)))
            if output is not None:
                net.save(output, opt.state_dict())
            decoder.train()

        todo = max(0, steps - net.step)
        try:
            if feature_capture is not None:
                feature_capture.__enter__()
            with interruptible(todo, f"upconv-train {layer}", progress) as run:
                for _ in range(todo):
                    idx = torch.randint(len(train_px), (min(batch_size, len(train_px)),), generator=gen)
                    target = train_px[idx].to(model.device)
                    f = train_f[idx].to(model.device)
                    rec = decoder(f)
                    loss = F.mse_loss(rec, target)
                    if feature_capture is not None:
                        feature_capture.forward(model.from_pixels(rec))
                        phi = feature_capture.activations[layer].float()
                        loss = loss + feature_weight * F.mse_loss(phi, f) / f.pow(2).mean().clamp_min(1e-12)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    net.step += 1
                    net.history.append(float(loss.detach()))
                    run.tick()
                    if net.step % save_every == 0:
                        save()
        finally:
            if feature_capture is not None:
                feature_capture.__exit__(None, None, None)
            decoder.eval().requires_grad_(False)
            save()
        net.interrupted = run.interrupted
    return net


def _check_same_run(old: UpconvNet, new: UpconvNet, path: Path) -> None:
    if old.layer != new.layer or tuple(old.size) != tuple(new.size) or old.decoder.config != new.decoder.config:
        raise UpconvError(f"{path}: holds a decoder of layer {old.layer!r} at {old.size[0]} px ({old.decoder.config}); "
                          f"this run trains {new.layer!r} at {new.size[0]} px: pass another output or resume=False")
    if not same_model(old.fingerprint, new.fingerprint):
        raise UpconvError(f"{path}: was trained on another model's features; pass another output or resume=False")


# ============================================================================ inversion and perturbation


@dataclass(repr=False)
class UpconvInversion(SynthesisResult):
    """Decoded images: ``pixels`` (N, 3, H, W) in [0, 1]; ``extras["labels"]`` names each (e.g. perturbations)."""

    layer: str = ""

    def picture(self) -> Image.Image:
        labels = self.extras.get("labels")
        images = self.images
        if len(images) == 1:
            return images[0]
        return grid(images, labels=labels) if labels else grid(images)


def _check_net(model: Model, net: UpconvNet) -> None:
    if not same_model(net.fingerprint, model_fingerprint(model.module)):
        raise UpconvError(f"the decoder was trained on another model's {net.layer!r} features")


def _image_features(model: Model, image: Any, net: UpconvNet) -> tuple[torch.Tensor, torch.Tensor]:
    pic = model.transform_image(load_image(image))
    if pic.size != (net.size[1], net.size[0]):
        pic = pic.resize((net.size[1], net.size[0]), Image.Resampling.BICUBIC)
    px = pil_to_pixels(pic)
    with guard(model.module, eval=True, freeze=True):
        return px, layer_features(model, net.layer, px)


def invert_upconv(model: Any, image: Any, net: UpconvNet | str | os.PathLike) -> UpconvInversion:
    """Reconstruct ``image`` from its ``net.layer`` features with a trained decoder (one forward pass each)."""
    model = as_model(model)
    net = net if isinstance(net, UpconvNet) else load_upconv(net, model.device)
    _check_net(model, net)
    start = time.perf_counter()
    px, f = _image_features(model, image, net)
    with torch.no_grad():
        rec = net.decode(f).cpu()
    return UpconvInversion(model.from_pixels(rec.to(model.device)), rec, seconds=time.perf_counter() - start, layer=net.layer,
                           extras={"mse": float(F.mse_loss(rec, px)), "original": px})


def upconv_perturbation(model: Any, image: Any, net: UpconvNet | str | os.PathLike, *, dropout: float = 0.5,
                        seed: int = 0) -> UpconvInversion:
    """The feature-perturbation study in its original form (Dosovitskiy & Brox): decode the image's features as
    they are, binarised (which entries are positive, each set to the mean positive value) and with a share
    ``dropout`` of the entries zeroed (the rest scaled by 1 / (1 - dropout)). Returns the three decodings
    (labels in ``extras["labels"]``) and their pixel MSE to the image in ``extras["mse"]``."""
    model = as_model(model)
    net = net if isinstance(net, UpconvNet) else load_upconv(net, model.device)
    _check_net(model, net)
    if not 0 <= dropout < 1:
        raise UpconvError(f"dropout must be in [0, 1), got {dropout}")
    px, f = _image_features(model, image, net)
    positive = f > 0
    binary = positive.float() * (f[positive].mean() if positive.any() else 0.0)
    keep = torch.rand(f.shape, generator=seeded(seed)) >= dropout
    dropped = f * keep / (1 - dropout)
    with torch.no_grad():
        rec = net.decode(torch.cat([f, binary, dropped])).cpu()
    mse = [float(F.mse_loss(r[None], px)) for r in rec]
    labels = ["original image", "features", "binarised", f"dropout {dropout:.0%}"]
    return UpconvInversion(model.from_pixels(rec.to(model.device)), torch.cat([px, rec]), layer=net.layer,
                           extras={"labels": labels, "mse": dict(zip(labels[1:], mse))})


# ============================================================================ DGN-AM


@dataclass(repr=False)
class GeneratedImage(SynthesisResult):
    """DGN-AM's result: the best image found (``pixels``), its ``objective`` value and the ``code`` behind it."""

    objective: float = 0.0
    code: torch.Tensor | None = field(default=None, repr=False)


def dgn_am(
    model: Any,
    objective: Objective | str,
    generator: UpconvNet | nn.Module | str | os.PathLike,
    *,
    steps: int = 200,
    lr: float = 0.05,
    code_min: torch.Tensor | None = None,
    code_max: torch.Tensor | None = None,
    code_shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool | None = True,
) -> GeneratedImage:
    """DGN-AM (Nguyen et al., NeurIPS 2016): maximise ``objective`` over images G(z) of a generator.

    ``generator``: a decoder from :func:`train_upconv` (or its file), or any module mapping codes to images in
    [0, 1] (then give ``code_shape`` (C, ...) and the code range). The code starts at the middle of its range
    plus a little noise (``seed``), takes ``steps`` Adam steps of ``lr`` x (range width), and is clipped to
    [``code_min``, ``code_max``] per channel after each step (default: the range the decoder saw on real
    images). The best iterate is returned. Cost: one forward and backward of G and the classifier per step.
    """
    model = as_model(model)
    DGN_STEPS.check("steps", steps, "dgn_am")
    DGN_LR.check("lr", lr, "dgn_am")
    if isinstance(generator, (str, os.PathLike)):
        generator = load_upconv(generator, model.device)
    if isinstance(generator, UpconvNet):
        _check_net(model, generator)
        decode: nn.Module = generator.decoder
        lo = generator.code_min if code_min is None else code_min
        hi = generator.code_max if code_max is None else code_max
        cfg = generator.decoder.config
        shape = (cfg["in_channels"], *cfg["in_size"]) if cfg["in_size"] else (cfg["in_channels"],)
    else:
        if code_shape is None or code_min is None or code_max is None:
            raise UpconvError("a generator module needs code_shape, code_min and code_max")
        decode, lo, hi, shape = generator, code_min, code_max, tuple(code_shape)
    dev = model.device
    lo, hi = _per_channel(lo, shape, dev), _per_channel(hi, shape, dev)
    scale = (hi - lo).clamp_min(1e-6)
    gen = seeded(seed)
    z = (lo + hi) / 2 + 0.1 * scale * torch.randn((1, *shape), generator=gen).to(dev)
    u = ((z - lo) / scale).detach().requires_grad_(True)         # optimise in units of the range
    net = network(model)
    obj = as_objective(objective, model)
    opt = torch.optim.Adam([u], lr=lr)
    best, best_value, history = None, -math.inf, []
    start = time.perf_counter()
    with guard(model.module, eval=True, freeze=True), guard(decode, eval=True, freeze=True), capture_for(net, obj) as cap, \
            interruptible(steps, f"dgn-am {obj.name}", progress) as run:
        for _ in range(steps):
            with torch.enable_grad():
                pixels = decode(lo + u * scale)
                value = objective_values(cap, obj, net.normalize(pixels))[0]
            current = float(value.detach())
            history.append(current)
            if current > best_value:
                best_value, best = current, (pixels.detach().cpu(), (lo + u * scale).detach().cpu())
            opt.zero_grad()
            (-value).backward()
            opt.step()
            with torch.no_grad():
                u.clamp_(0, 1)
            run.tick()
    if best is None:
        raise UpconvError("DGN-AM was interrupted before its first step")
    pixels, code = best
    return GeneratedImage(net.normalize(pixels.to(dev)), pixels, history=history, seconds=time.perf_counter() - start,
                          interrupted=run.interrupted, objective=best_value, code=code)


def _per_channel(value: Any, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A bound given per channel (C,) or as one number, shaped to broadcast over a code (1, C, ...)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.reshape((1, -1) + (1,) * (len(shape) - 1)) if t.numel() > 1 else t


__all__ = [
    "GeneratedImage",
    "UpconvDecoder",
    "UpconvError",
    "UpconvInversion",
    "UpconvNet",
    "dgn_am",
    "invert_upconv",
    "layer_features",
    "load_upconv",
    "train_upconv",
    "upconv_perturbation",
]
