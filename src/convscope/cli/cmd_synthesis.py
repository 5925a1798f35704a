"""Synthesis commands: visualize, dream, invert, texture, style, style-train, stylize, adversarial, fool.

Each checks its output path, parses its arguments, calls :mod:`convscope.synthesis`, writes the picture
(``-o``) and prints a short summary; progress bars go to stderr when it is a terminal. Ctrl-C stops the
optimisation, the picture so far is still written, and the command exits with 130.
"""

from __future__ import annotations

import argparse
import math
import pickle
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError
from ..files import atomic_write, check_output_path
from ..images import IMAGE_SUFFIXES
from ..models import Model, load_model, pick_device
from ..options import INT_LIMIT, bounded
from ..render import grid, save_image
from ..synthesis import (
    adversarial,
    dream,
    fooling_image,
    invert_layers,
    multiscale,
    parse_objective,
    perturbation_study,
    render_channels,
    style_transfer,
    texture,
    visualize,
)
from ..synthesis.bounds import LR, SEED, SIZE, STEPS, WEIGHT
from ..synthesis.fast_style import TransformNet, load_transform_net, stylize, train_fast_style
from ..synthesis.result import pixels_to_pil
from ..synthesis.style import average_pooling
from ..synthesis.upconv import dgn_am, invert_upconv, load_upconv, upconv_perturbation
from .common import info, load_model_from_args

ORDER = 40

#: Suffixes of a trained style network written by ``style-train``.
NET_SUFFIXES = (".pt", ".pth")
#: Most channels one ``visualize --channels`` gallery renders.
MAX_CHANNELS = 1024


def _pixel_units(name: str, maximum: float) -> Callable[[str], float]:
    """argparse ``type=``: a positive number of pixel units up to ``maximum``: ``0.0157`` or ``4/255``."""

    def parse(text: str) -> float:
        try:
            value = float(Fraction(text.strip())) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0.016 or 4/255)") from None
        if not math.isfinite(value) or not 0 < value <= maximum:
            raise argparse.ArgumentTypeError(
                f"{name} must be a positive number of pixel units, at most {maximum:g} (e.g. 4/255), got {text!r}")
        return value

    parse.__name__ = "pixel units"
    return parse


def _channels(text: str) -> list[int]:
    """``0-15`` or ``3,7,9`` -> channel list (at most :data:`MAX_CHANNELS`)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = (int(v) for v in part.split("-"))
                if b - a >= MAX_CHANNELS:
                    raise argparse.ArgumentTypeError(f"at most {MAX_CHANNELS} channels in one gallery, got {text!r}")
                out.extend(range(a, b + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad channel list {text!r} (e.g. 0-15 or 3,7,9)") from None
    if not out:
        raise argparse.ArgumentTypeError("empty channel list")
    if len(out) > MAX_CHANNELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_CHANNELS} channels in one gallery, got {len(out)}")
    return out


#: ``visualize``'s default steps, and per round with ``--multiscale`` (the multiscale function's default).
VISUALIZE_STEPS, MULTISCALE_STEPS = 256, 25


def _common(p: argparse.ArgumentParser, out: str, steps: int | None, size: int | None, *,
            output: str = "output image", size_help: str = "image side in pixels", steps_text: str | None = None) -> None:
    p.add_argument("-o", "--output", default=out, help=f"{output} (default {out})")
    p.add_argument("--seed", type=SEED.argtype("--seed"), default=0, help="random seed (same seed, same picture)")
    p.add_argument("--steps", type=STEPS.argtype("--steps"), default=steps,
                   help=f"optimisation steps, {STEPS.range_text()} (default {steps_text or steps})")
    p.add_argument("--size", type=SIZE.argtype("--size"), default=size,
                   help=f"{size_help}, {SIZE.range_text()} (default {size or 'the model input size'})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _weight(name: str) -> Callable[[str], float]:
    return WEIGHT.argtype(name)


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _output(args: argparse.Namespace, suffixes: Iterable[str] = IMAGE_SUFFIXES, what: str = "image") -> str:
    """``-o`` checked before any work (suffix, not a directory, writable folder): one line, exit 2."""
    check_output_path(args.output, suffixes, what=what)
    return args.output


def _save(image: Any, path: str) -> None:
    save_image(image, path)
    info(f"wrote {path}")


def _loss_net_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loss-net", default=None, metavar="NAME",
                   help="loss network instead of --model: a torchvision or timm:NAME model with its pretrained weights "
                        "(Gatys et al. used vgg19; its weights must be in the torch cache), or NAME:random for random "
                        "weights (for testing)")
    p.add_argument("--avg-pool", action="store_true",
                   help="replace the loss network's max-pooling by average pooling, as Gatys et al. did with VGG-19 "
                        "(smoother gradients; a copy: the model itself is not changed)")


def _loss_net(args: argparse.Namespace) -> Model:
    """The model ``--loss-net`` names (pretrained, or ``NAME:random``), else the ``--model`` one; with ``--avg-pool``
    a copy whose max-pooling is average pooling."""
    if not getattr(args, "loss_net", None):
        model = load_model_from_args(args)
    else:
        random = args.loss_net.endswith(":random")
        name = args.loss_net[: -len(":random")] if random else args.loss_net
        model = load_model(name, weights=None if random else "DEFAULT", device=args.device)
    return average_pooling(model) if getattr(args, "avg_pool", False) else model


def _picture_command(args: argparse.Namespace, make: Callable[[Model], Any]) -> tuple[Model, Any]:
    """Check ``-o``, load the (loss) model, ``make(model)`` a synthesis result and write its image: (model, result)."""
    out = _output(args)
    model = _loss_net(args)
    result = make(model)
    _save(result.image, out)
    return model, result


def _done(interrupted: bool) -> int:
    """0, or after Ctrl-C (the picture so far already written) the interrupt again: exit 130."""
    if interrupted:
        raise KeyboardInterrupt
    return 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("visualize", parents=parents, help="feature visualisation: an image that maximises an objective",
                       description="Objectives: LAYER:CH, LAYER:CH@Y,X, LAYER, logit:CLASS; combine with + - and weights (0.5*bn2:3).")
    p.add_argument("objective", help="e.g. conv_head:286, blocks.5.0:3@3,3, blocks.4, logit:385, 'bn2:1 - 0.5*bn2:2'")
    _common(p, "visualize.png", None, None, steps_text=f"{VISUALIZE_STEPS}; with --multiscale {MULTISCALE_STEPS} per round")
    p.add_argument("--channels", type=_channels, default=None, metavar="LIST",
                   help=f"with OBJECTIVE a layer: render these channels (0-15, 3,7; at most {MAX_CHANNELS}) in one batch, as a grid")
    p.add_argument("--param", choices=["fourier", "pixel"], default="fourier",
                   help="image parameterisation: fourier (decorrelated spectrum, default) or pixel")
    p.add_argument("--lr", type=LR.argtype("--lr"), default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--batch", type=bounded(int, 1, 64, name="--batch"), default=1,
                   help="number of samples, 1..64 (with --diversity)")
    p.add_argument("--diversity", type=bounded(float, 0, 1e6, name="--diversity"), default=0.0,
                   help="weight of the diversity term across samples (default 0)")
    p.add_argument("--no-transforms", action="store_true", help="no robustness transforms (pad, jitter, scale, rotate)")
    p.add_argument("--no-decorrelate", action="store_true", help="optimise plain RGB instead of decorrelated colour")
    p.add_argument("--multiscale", action="store_true",
                   help="coarse-to-fine procedure in decorrelated colour with the transforms (56 px, x1.2, 10 rounds, "
                        "Adam 0.2; --steps per round, e.g. 25)")
    p.add_argument("--blur", type=bounded(int, 1, 56, name="--blur"), default=None,
                   help="with --multiscale: blur between rounds, a Gaussian as wide as a box of this size (1..56 px; e.g. 8)")
    p.add_argument("--generator", default=None, metavar="NET.pt",
                   help="DGN-AM (Nguyen et al. 2016): optimise the code of this decoder (from convscope upconv-train) "
                   "instead of the pixels; --steps and --lr apply (lr in units of the code range)")
    p.set_defaults(func=run_visualize)

    p = sub.add_parser("dream", parents=parents, help="DeepDream an image")
    p.add_argument("image", help="path or sample:NAME")
    _common(p, "dream.png", 10, 224, size_help="shorter side of the image in pixels")
    p.add_argument("--objective", default=None, help="layer or channel objective (default: a middle layer)")
    p.add_argument("--octaves", type=bounded(int, 1, 12, name="--octaves"), default=4,
                   help="number of scales, coarse to fine, 1..12 (default 4)")
    p.add_argument("--octave-scale", type=bounded(float, 1, 4, name="--octave-scale"), default=1.4,
                   help="size ratio between successive octaves, 1..4 (default 1.4)")
    p.add_argument("--step-size", type=_pixel_units("--step-size", 1.0), default=1.5 / 255,
                   help="mean pixel change per step (default 1.5/255)")
    p.add_argument("--jitter", type=bounded(int, 0, 512, name="--jitter"), default=32,
                   help="largest random shift in pixels before each step, 0..512 (default 32)")
    p.set_defaults(func=run_dream)

    p = sub.add_parser("invert", parents=parents, help="reconstruct an image from a layer's features (Mahendran & Vedaldi)")
    p.add_argument("image", help="path or sample:NAME")
    p.add_argument("--layer", action="append", default=None,
                   help="layer to invert (repeat for several, side by side); with --method upconv: the decoder's layer")
    _common(p, "invert.png", 200, None)
    p.add_argument("--method", choices=["optimize", "upconv"], default="optimize",
                   help="optimize: Mahendran & Vedaldi's optimisation (default); upconv: one pass of a decoder trained "
                   "by convscope upconv-train (Dosovitskiy & Brox 2016), given with --net")
    p.add_argument("--net", default=None, metavar="NET.pt", help="with --method upconv: the decoder file")
    p.add_argument("--tv", type=_weight("--tv"), default=0.5, help="total-variation weight (default 0.5)")
    p.add_argument("--alpha-weight", type=_weight("--alpha-weight"), default=1e-3, help="alpha-norm weight (default 0.001)")
    p.add_argument("--jitter", type=bounded(int, 0, 64, name="--jitter"), default=None,
                   help="largest random shift per step in pixels, 0..64 (default: image side / 32)")
    p.add_argument("--param", choices=["fourier", "pixel"], default="fourier",
                   help="image parameterisation: decorrelated Fourier spectrum (default) or pixels")
    p.add_argument("--perturb", action="store_true", help="also invert binarised and 50%%-dropped features, report errors")
    p.set_defaults(func=run_invert)

    p = sub.add_parser("texture", parents=parents, help="texture synthesis with Gram matrices (Gatys et al.)")
    p.add_argument("image", help="texture example: path or sample:NAME")
    _common(p, "texture.png", 200, 128)
    p.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs", help="L-BFGS (Gatys; default) or Adam")
    p.add_argument("--tv", type=_weight("--tv"), default=1e7, help="total-variation weight (default 1e7; 0: Gatys's plain loss)")
    p.add_argument("--color-weight", type=_weight("--color-weight"), default=1e7,
                   help="weight of matching the colour mean and covariance of the example (default 1e7)")
    _loss_net_option(p)
    p.set_defaults(func=run_texture)

    p = sub.add_parser("style", parents=parents, help="neural style transfer (Gatys et al.)")
    p.add_argument("content", help="content image: path or sample:NAME")
    p.add_argument("styles", nargs="+", help="style image(s): path or sample:NAME")
    _common(p, "style.png", 300, 128)
    p.add_argument("--style-weights", type=_weight("--style-weights"), nargs="+", default=None,
                   help="one weight per style image (blends their Gram matrices)")
    p.add_argument("--style-weight", type=_weight("--style-weight"), default=1e6, help="weight of the style loss (default 1e6)")
    p.add_argument("--content-weight", type=_weight("--content-weight"), default=1.0,
                   help="weight of the content loss (default 1)")
    p.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs", help="L-BFGS (Gatys; default) or Adam")
    p.add_argument("--preserve-color", action="store_true", help="keep the content image's colours")
    p.add_argument("--tv", type=_weight("--tv"), default=1e7, help="total-variation weight (default 1e7; 0: Gatys's plain loss)")
    p.add_argument("--color-weight", type=_weight("--color-weight"), default=1e7,
                   help="weight of matching the style images' colour mean and covariance (default 1e7; 0: off)")
    _loss_net_option(p)
    p.set_defaults(func=run_style)

    p = sub.add_parser("style-train", parents=parents,
                       help="train a fast feed-forward style network (Johnson et al.) on a folder of content images")
    p.add_argument("style", help="style image: path or sample:NAME")
    p.add_argument("data", help="folder of content images")
    _common(p, "style-net.pt", 2000, 256, output="trained style network file, .pt or .pth (read by stylize --net)",
            size_help="side of the random training crops in pixels")
    p.add_argument("--batch-size", type=bounded(int, 1, 256, name="--batch-size"), default=4,
                   help="content crops per step, 1..256 (default 4)")
    p.add_argument("--width", type=bounded(int, 1, 256, name="--width"), default=32,
                   help="channels of the first layer, 1..256 (Johnson: 32; 8 trains fast on a CPU)")
    p.add_argument("--blocks", type=bounded(int, 0, 32, name="--blocks"), default=5, help="residual blocks, 0..32 (Johnson: 5)")
    p.add_argument("--lr", type=LR.argtype("--lr"), default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument("--style-weight", type=_weight("--style-weight"), default=4e7,
                   help="weight of the style loss (default 4e7, balanced for the built-in model; Johnson used 1e10 with VGG-16)")
    p.add_argument("--content-weight", type=_weight("--content-weight"), default=1e5,
                   help="weight of the content loss (default 1e5)")
    p.add_argument("--checkpoint-every", type=bounded(int, 1, INT_LIMIT, name="--checkpoint-every"), default=200,
                   help="write -o every N steps (default 200)")
    p.add_argument("--resume", action="store_true", help="continue from the network in -o")
    _loss_net_option(p)
    p.set_defaults(func=run_style_train)

    p = sub.add_parser("stylize", parents=parents, help="apply a network trained with style-train (one forward pass)")
    p.add_argument("image", help="path or sample:NAME")
    p.add_argument("--net", required=True, help="network file written by style-train")
    p.add_argument("-o", "--output", default="stylized.png", help="output image (default stylized.png)")
    p.add_argument("--size", type=SIZE.argtype("--size"), default=None,
                   help=f"shorter side in pixels, {SIZE.range_text()} (default: as is)")
    p.set_defaults(func=run_stylize)

    p = sub.add_parser("adversarial", parents=parents, help="adversarial image (FGSM / PGD) towards a target class")
    p.add_argument("image", help="path or sample:NAME")
    p.add_argument("--target", default=None, help="class index or name (default: untargeted)")
    _common(p, "adversarial.png", 10, None)
    p.add_argument("--eps", type=_pixel_units("the budget --eps", 1000.0), default=4 / 255,
                   help="budget in pixel units (default 4/255)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf",
                   help="linf: no pixel changes by more than eps (default); l2: the change has Euclidean norm <= eps")
    p.add_argument("--method", choices=["pgd", "fgsm"], default="pgd",
                   help="pgd: --steps projected gradient steps (default); fgsm: one step of size eps")
    p.set_defaults(func=run_adversarial)

    p = sub.add_parser("fool", parents=parents, help="fooling image: noise the model calls CLASS with high confidence")
    p.add_argument("target", help="class index or name")
    _common(p, "fool.png", 200, None)
    p.add_argument("--confidence", type=bounded(float, 0.01, 0.9999, name="--confidence"), default=0.99,
                   help="stop once the model gives the class this probability, 0.01..0.9999 (default 0.99)")
    p.set_defaults(func=run_fool)


def run_visualize(args: argparse.Namespace) -> int:
    out = _output(args)
    model = load_model_from_args(args)
    if args.steps is None:
        args.steps = MULTISCALE_STEPS if args.multiscale else VISUALIZE_STEPS
    kw = dict(steps=args.steps, size=args.size, seed=args.seed, progress=_progress(args))
    transforms = "none" if args.no_transforms else "auto"
    if args.generator:
        g = dgn_am(model, args.objective, load_upconv(args.generator, model.device), steps=args.steps, lr=args.lr,
                   seed=args.seed, progress=_progress(args))
        _save(g.image, out)
        print(f"objective {args.objective} through the generator: best {g.objective:.4g} ({len(g.history)} steps, {g.seconds:.1f} s)")
        return _done(g.interrupted)
    if args.multiscale:
        r = multiscale(model, args.objective, steps=args.steps, blur=args.blur, transforms=transforms,
                       decorrelate=not args.no_decorrelate, seed=args.seed, progress=_progress(args))
    elif args.channels is not None:
        obj = args.objective
        if ":" in obj or not obj.strip():
            raise ConvscopeError("with --channels, OBJECTIVE must be a layer name (e.g. blocks.5.0)")
        parse_objective(obj, model)  # validates the layer name
        r = render_channels(model, obj, args.channels, param=args.param, lr=args.lr, transforms=transforms,
                            decorrelate=not args.no_decorrelate, **kw)
    else:
        r = visualize(model, args.objective, batch=args.batch, diversity=args.diversity, param=args.param, lr=args.lr,
                      transforms=transforms, decorrelate=not args.no_decorrelate, **kw)
    images = r.images
    if len(images) == 1:
        _save(images[0], out)
    else:
        labels = [f"{args.objective}:{c}" for c in args.channels] if args.channels else [f"sample {i}" for i in range(len(images))]
        _save(grid(images, labels=labels), out)
    values = ", ".join(f"{v:.4g}" for v in r.objectives.tolist())
    print(f"objective {r.objective_name}: {values}  ({r.steps} steps, {r.seconds:.1f} s)")
    return _done(r.interrupted)


def _invert_upconv(args: argparse.Namespace, out: str) -> int:
    """``invert --method upconv``: decode the image's features with a trained decoder (and its perturbations)."""
    if not args.net:
        raise ConvscopeError("--method upconv needs the decoder: --net NET.pt (train one with convscope upconv-train)")
    model = load_model_from_args(args)
    net = load_upconv(args.net, model.device)
    if args.layer and args.layer != [net.layer]:
        raise ConvscopeError(f"{args.net} decodes layer {net.layer!r}, not {', '.join(args.layer)}")
    if args.perturb:
        r = upconv_perturbation(model, args.image, net, seed=args.seed)
        for label, mse in r.extras["mse"].items():
            print(f"{net.layer:16s} {label:12s} pixel MSE {mse:.4f}")
        _save(r.picture(), out)
    else:
        r = invert_upconv(model, args.image, net)
        print(f"{net.layer:16s} decoded in one pass, pixel MSE {r.extras['mse']:.4f}")
        original = pixels_to_pil(r.extras["original"])[0]
        _save(grid([original, r.image], labels=["original", f"{net.layer} (upconv)"]), out)
    return 0


def run_dream(args: argparse.Namespace) -> int:
    _, d = _picture_command(args, lambda model: dream(
        model, args.image, args.objective, octaves=args.octaves, octave_scale=args.octave_scale, steps=args.steps,
        step_size=args.step_size, jitter=args.jitter, size=args.size, seed=args.seed, progress=_progress(args)))
    first, last = (d.history[0], d.history[-1]) if d.history else (float("nan"), float("nan"))
    print(f"dream {d.objective_name}: objective {first:.4g} -> {last:.4g} over {len(d.history)} steps ({d.seconds:.1f} s)")
    return _done(d.interrupted)


def run_invert(args: argparse.Namespace) -> int:
    out = _output(args)
    if args.method == "upconv":
        return _invert_upconv(args, out)
    if not args.layer:
        raise ConvscopeError("give the layer to invert with --layer L (or --method upconv --net NET.pt)")
    model = load_model_from_args(args)
    kw = dict(steps=args.steps, size=args.size, tv_weight=args.tv, alpha_weight=args.alpha_weight, jitter=args.jitter,
              param=args.param, seed=args.seed, progress=_progress(args))
    original = model.transform_image(args.image)
    if args.size:
        original = original.resize((args.size, args.size))
    images, labels = [original], ["original"]
    interrupted = False
    if args.perturb:
        for name in args.layer:
            study = perturbation_study(model, args.image, name, **kw)
            for key, inv in study.inversions.items():
                e_t, e_o, e_p = study.errors[key]
                images.append(inv.image)
                labels.append(f"{name} {key}")
                print(f"{name:16s} {key:10s} error to target {e_t:.3f}  to original features {e_o:.3f}  pixel RMSE {e_p:.3f}")
            if study.interrupted:
                interrupted = True
                break
    else:
        invs = invert_layers(model, args.image, args.layer, **kw)
        images += [i.image for i in invs]
        labels += [i.layer for i in invs]
        for i in invs:
            print(f"{i.layer:16s} feature error {i.error:.3f}  pixel RMSE {i.pixel_error:.3f}  ({i.seconds:.1f} s)")
        interrupted = any(i.interrupted for i in invs)
    _save(grid(images, labels=labels, columns=min(len(images), 4 if args.perturb else 8)), out)
    return _done(interrupted)


def run_texture(args: argparse.Namespace) -> int:
    _, r = _picture_command(args, lambda model: texture(
        model, args.image, steps=args.steps, size=args.size, optimizer=args.optimizer, tv_weight=args.tv,
        color_weight=args.color_weight, seed=args.seed, progress=_progress(args)))
    first = r.style_history[0] if r.style_history else float("nan")
    print(f"style loss {first:.4g} -> {r.style_loss:.4g} in {r.evaluations} evaluations ({r.seconds:.1f} s)")
    return _done(r.interrupted)


def run_style(args: argparse.Namespace) -> int:
    _, r = _picture_command(args, lambda model: style_transfer(
        model, args.content, args.styles, style_weights=args.style_weights, style_weight=args.style_weight,
        content_weight=args.content_weight, steps=args.steps, size=args.size, optimizer=args.optimizer,
        preserve_color=args.preserve_color, tv_weight=args.tv, color_weight=args.color_weight, seed=args.seed,
        progress=_progress(args)))
    first, last = (r.history[0], r.history[-1]) if r.history else (float("nan"), float("nan"))
    print(f"loss {first:.4g} -> {last:.4g} (style {r.style_loss:.4g}, content {r.content_loss:.4g}) "
          f"in {r.evaluations} evaluations ({r.seconds:.1f} s)")
    return _done(r.interrupted)


def _load_net(path: str, device: torch.device | str | None = None) -> TransformNet:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvscopeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConvscopeError(f"{path}: is a directory, not a style network file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:  # not a torch file, or pickled objects
        raise ConvscopeError(f"{path}: not a style network file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ConvscopeError(f"{path}: not a style network file (holds a {type(state).__name__})")
    return load_transform_net(state, device)


def run_style_train(args: argparse.Namespace) -> int:
    out = _output(args, NET_SUFFIXES, what="style network")
    model = _loss_net(args)
    net = _load_net(out, model.device) if args.resume else None

    def checkpoint(step: int, result) -> None:
        atomic_write(out, lambda tmp: torch.save(result.state(), tmp))
        info(f"step {step}: loss {result.history[-1]:.4g}, wrote {out}" if result.history else f"step {step}: wrote {out}")

    r = train_fast_style(model, args.style, args.data, steps=args.steps, batch_size=args.batch_size, size=args.size,
                         lr=args.lr, content_weight=args.content_weight, style_weight=args.style_weight, width=args.width,
                         blocks=args.blocks, net=net, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
                         seed=args.seed, progress=_progress(args))
    if r.history:
        print(f"trained {r.steps} steps in {r.seconds:.1f} s: loss {r.history[0]:.4g} -> {r.history[-1]:.4g}"
              + (" (interrupted)" if r.interrupted else ""))
    return _done(r.interrupted)


def run_stylize(args: argparse.Namespace) -> int:
    out = _output(args)
    net = _load_net(args.net, pick_device(args.device))
    _save(stylize(net, args.image, size=args.size), out)
    return 0


def _attack(model: Model, args: argparse.Namespace) -> Any:
    x = model.preprocess(args.image)
    if args.size:
        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False, antialias=True)
    target = model.class_index(args.target) if args.target is not None else None
    return adversarial(model, x, target=target, eps=args.eps, norm=args.norm, method=args.method, steps=args.steps,
                       seed=args.seed, progress=_progress(args))


def run_adversarial(args: argparse.Namespace) -> int:
    _, a = _picture_command(args, lambda model: _attack(model, args))
    b, f = a.before[0], a.after[0]
    print(f"before: {b.labels[0]} ({b.probabilities[0]:.1%})")
    print(f"after:  {f.labels[0]} ({f.probabilities[0]:.1%})" + (f"  target p={float(a.target_probability[0]):.1%}" if a.target is not None else ""))
    print(f"perturbation: L-inf {float(a.perturbation['linf'][0]) * 255:.2f}/255, L2 {float(a.perturbation['l2'][0]):.3f} "
          f"(pixel units); {'success' if bool(a.success[0]) else 'failed'} after {a.steps} steps")
    return _done(a.interrupted)


def run_fool(args: argparse.Namespace) -> int:
    model, r = _picture_command(args, lambda model: fooling_image(
        model, args.target, confidence=args.confidence, steps=args.steps, size=args.size, seed=args.seed,
        progress=_progress(args)))
    p = r.extras["probability"]
    print(f"{model.label(r.extras['target'])}: p={p:.2%} after {r.steps} steps")
    return _done(r.interrupted)
