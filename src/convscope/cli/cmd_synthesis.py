"""Synthesis commands: visualize, dream, invert, texture, style, adversarial, fool.

Each parses its arguments, calls :mod:`convscope.synthesis`, writes the picture (``-o``) and prints a
short summary; progress bars go to stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
from fractions import Fraction

from ..errors import ConvscopeError
from .common import info, load_model_from_args

ORDER = 40


def _budget(text: str) -> float:
    """A pixel-unit number: ``0.0157``, ``4/255``."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0.016 or 4/255)") from None


def _channels(text: str) -> list[int]:
    """``0-15`` or ``3,7,9`` -> channel list."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad channel list {text!r} (e.g. 0-15 or 3,7,9)") from None
    if not out:
        raise argparse.ArgumentTypeError("empty channel list")
    return out


def _common(p: argparse.ArgumentParser, out: str, steps: int, size: int | None) -> None:
    p.add_argument("-o", "--output", default=out, help=f"output image (default {out})")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same picture)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimisation steps (default {steps})")
    p.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size or 'the model input size'})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _save(image, path: str) -> None:
    from ..render import save_image

    save_image(image, path)
    info(f"wrote {path}")


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("visualize", parents=parents, help="feature visualisation: an image that maximises an objective",
                       description="Objectives: LAYER:CH, LAYER:CH@Y,X, LAYER, logit:CLASS; combine with + - and weights (0.5*bn2:3).")
    p.add_argument("objective", help="e.g. conv_head:286, blocks.5.0:3@3,3, blocks.4, logit:385, 'bn2:1 - 0.5*bn2:2'")
    _common(p, "visualize.png", 256, None)
    p.add_argument("--channels", type=_channels, default=None, metavar="LIST",
                   help="with OBJECTIVE a layer: render these channels (0-15, 3,7) in one batch, as a grid")
    p.add_argument("--param", choices=["fourier", "pixel"], default="fourier", help="image parameterisation")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--batch", type=int, default=1, help="number of samples (with --diversity)")
    p.add_argument("--diversity", type=float, default=0.0, help="weight of the diversity term across samples")
    p.add_argument("--no-transforms", action="store_true", help="no robustness transforms (pad, jitter, scale, rotate)")
    p.add_argument("--no-decorrelate", action="store_true", help="optimise plain RGB instead of decorrelated colour")
    p.add_argument("--multiscale", action="store_true", help="coarse-to-fine pixel procedure (56 px, x1.2, 12 rounds; --steps per round)")
    p.add_argument("--blur", type=int, default=None, help="with --multiscale: box blur of this size between rounds")
    p.set_defaults(func=run_visualize)

    p = sub.add_parser("dream", parents=parents, help="DeepDream an image")
    p.add_argument("image", help="path or sample:NAME")
    _common(p, "dream.png", 10, 224)
    p.add_argument("--objective", default=None, help="layer or channel objective (default: a middle layer)")
    p.add_argument("--octaves", type=int, default=4)
    p.add_argument("--octave-scale", type=float, default=1.4)
    p.add_argument("--step-size", type=_budget, default=1.5 / 255, help="mean pixel change per step (default 1.5/255)")
    p.add_argument("--jitter", type=int, default=32)
    p.set_defaults(func=run_dream)

    p = sub.add_parser("invert", parents=parents, help="reconstruct an image from a layer's features (Mahendran & Vedaldi)")
    p.add_argument("image", help="path or sample:NAME")
    p.add_argument("--layer", action="append", required=True, help="layer to invert (repeat for several, side by side)")
    _common(p, "invert.png", 200, None)
    p.add_argument("--tv", type=float, default=0.5, help="total-variation weight")
    p.add_argument("--alpha-weight", type=float, default=1e-3, help="alpha-norm weight")
    p.add_argument("--perturb", action="store_true", help="also invert binarised and 50%%-dropped features, report errors")
    p.set_defaults(func=run_invert)

    p = sub.add_parser("texture", parents=parents, help="texture synthesis with Gram matrices (Gatys et al.)")
    p.add_argument("image", help="texture example: path or sample:NAME")
    _common(p, "texture.png", 200, 128)
    p.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs")
    p.set_defaults(func=run_texture)

    p = sub.add_parser("style", parents=parents, help="neural style transfer (Gatys et al.)")
    p.add_argument("content", help="content image")
    p.add_argument("styles", nargs="+", help="style image(s)")
    _common(p, "style.png", 300, 128)
    p.add_argument("--style-weights", type=float, nargs="+", default=None, help="one weight per style image")
    p.add_argument("--style-weight", type=float, default=1e6)
    p.add_argument("--content-weight", type=float, default=1.0)
    p.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs")
    p.add_argument("--preserve-color", action="store_true", help="keep the content image's colours")
    p.set_defaults(func=run_style)

    p = sub.add_parser("style-train", parents=parents,
                       help="train a fast feed-forward style network (Johnson et al.) on a folder of content images")
    p.add_argument("style", help="style image")
    p.add_argument("data", help="folder of content images")
    _common(p, "style-net.pt", 2000, 256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--width", type=int, default=32, help="channels of the first layer (Johnson: 32; 8 trains fast on a CPU)")
    p.add_argument("--blocks", type=int, default=5, help="residual blocks (Johnson: 5)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--style-weight", type=float, default=1e10)
    p.add_argument("--content-weight", type=float, default=1e5)
    p.add_argument("--checkpoint-every", type=int, default=200, help="write -o every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the network in -o")
    p.set_defaults(func=run_style_train)

    p = sub.add_parser("stylize", parents=parents, help="apply a network trained with style-train (one forward pass)")
    p.add_argument("image", help="path or sample:NAME")
    p.add_argument("--net", required=True, help="network file written by style-train")
    p.add_argument("-o", "--output", default="stylized.png")
    p.add_argument("--size", type=int, default=None, help="shorter side in pixels (default: as is)")
    p.set_defaults(func=run_stylize)

    p = sub.add_parser("adversarial", parents=parents, help="adversarial image (FGSM / PGD) towards a target class")
    p.add_argument("image", help="path or sample:NAME")
    p.add_argument("--target", default=None, help="class index or name (default: untargeted)")
    _common(p, "adversarial.png", 10, None)
    p.add_argument("--eps", type=_budget, default=4 / 255, help="budget in pixel units (default 4/255)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--method", choices=["pgd", "fgsm"], default="pgd")
    p.set_defaults(func=run_adversarial)

    p = sub.add_parser("fool", parents=parents, help="fooling image: noise the model calls CLASS with high confidence")
    p.add_argument("target", help="class index or name")
    _common(p, "fool.png", 200, None)
    p.add_argument("--confidence", type=float, default=0.99)
    p.set_defaults(func=run_fool)


def run_visualize(args: argparse.Namespace) -> int:
    from .. import synthesis as syn
    from ..render import grid

    model = load_model_from_args(args)
    kw = dict(steps=args.steps, size=args.size, seed=args.seed, progress=_progress(args))
    if args.multiscale:
        r = syn.multiscale(model, args.objective, steps=args.steps, blur=args.blur, seed=args.seed, progress=_progress(args))
    elif args.channels is not None:
        obj = args.objective
        if ":" in obj or not obj.strip():
            raise ConvscopeError("with --channels, OBJECTIVE must be a layer name (e.g. blocks.5.0)")
        syn.parse_objective(obj, model)  # validates the layer name
        r = syn.render_channels(model, obj, args.channels, param=args.param, lr=args.lr,
                                transforms="none" if args.no_transforms else "standard",
                                decorrelate=not args.no_decorrelate, **kw)
    else:
        r = syn.visualize(model, args.objective, batch=args.batch, diversity=args.diversity, param=args.param, lr=args.lr,
                          transforms="none" if args.no_transforms else "standard", decorrelate=not args.no_decorrelate, **kw)
    images = r.images
    if len(images) == 1:
        _save(images[0], args.output)
    else:
        labels = [f"{args.objective}:{c}" for c in args.channels] if args.channels else [f"sample {i}" for i in range(len(images))]
        _save(grid(images, labels=labels), args.output)
    values = ", ".join(f"{v:.4g}" for v in r.objectives.tolist())
    print(f"objective {r.objective_name}: {values}  ({r.steps} steps, {r.seconds:.1f} s)")
    return 0


def run_dream(args: argparse.Namespace) -> int:
    from ..synthesis import dream

    model = load_model_from_args(args)
    d = dream(model, args.image, args.objective, octaves=args.octaves, octave_scale=args.octave_scale, steps=args.steps,
              step_size=args.step_size, jitter=args.jitter, size=args.size, seed=args.seed, progress=_progress(args))
    _save(d.image, args.output)
    first, last = (d.history[0], d.history[-1]) if d.history else (float("nan"), float("nan"))
    print(f"dream {d.objective_name}: objective {first:.4g} -> {last:.4g} over {len(d.history)} steps ({d.seconds:.1f} s)")
    return 0


def run_invert(args: argparse.Namespace) -> int:
    from ..render import grid
    from ..synthesis import invert_layers, perturbation_study

    model = load_model_from_args(args)
    kw = dict(steps=args.steps, size=args.size, tv_weight=args.tv, alpha_weight=args.alpha_weight, seed=args.seed,
              progress=_progress(args))
    original = model.transform_image(args.image)
    if args.size:
        original = original.resize((args.size, args.size))
    if args.perturb:
        images, labels = [original], ["original"]
        for name in args.layer:
            study = perturbation_study(model, args.image, name, **kw)
            for key, inv in study.inversions.items():
                e_t, e_o, e_p = study.errors[key]
                images.append(inv.image)
                labels.append(f"{name} {key}")
                print(f"{name:16s} {key:10s} error to target {e_t:.3f}  to original features {e_o:.3f}  pixel RMSE {e_p:.3f}")
    else:
        invs = invert_layers(model, args.image, args.layer, **kw)
        images = [original] + [i.image for i in invs]
        labels = ["original"] + [i.layer for i in invs]
        for i in invs:
            print(f"{i.layer:16s} feature error {i.error:.3f}  pixel RMSE {i.pixel_error:.3f}  ({i.seconds:.1f} s)")
    _save(grid(images, labels=labels, columns=min(len(images), 4 if args.perturb else 8)), args.output)
    return 0


def run_texture(args: argparse.Namespace) -> int:
    from ..synthesis import texture

    model = load_model_from_args(args)
    r = texture(model, args.image, steps=args.steps, size=args.size, optimizer=args.optimizer, seed=args.seed,
                progress=_progress(args))
    _save(r.image, args.output)
    print(f"style loss {r.style_history[0]:.4g} -> {r.style_loss:.4g} in {r.evaluations} evaluations ({r.seconds:.1f} s)")
    return 0


def run_style(args: argparse.Namespace) -> int:
    from ..synthesis import style_transfer

    model = load_model_from_args(args)
    r = style_transfer(model, args.content, args.styles, style_weights=args.style_weights, style_weight=args.style_weight,
                       content_weight=args.content_weight, steps=args.steps, size=args.size, optimizer=args.optimizer,
                       preserve_color=args.preserve_color, seed=args.seed, progress=_progress(args))
    _save(r.image, args.output)
    print(f"loss {r.history[0]:.4g} -> {r.history[-1]:.4g} (style {r.style_loss:.4g}, content {r.content_loss:.4g}) "
          f"in {r.evaluations} evaluations ({r.seconds:.1f} s)")
    return 0


def _load_net(path: str, device=None):
    import torch

    from ..synthesis.fast_style import load_transform_net

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvscopeError(f"{path}: no such file") from None
    except Exception as exc:  # not a torch file, or pickled objects that weights_only refuses
        raise ConvscopeError(f"{path}: not a style network file ({type(exc).__name__})") from None
    return load_transform_net(state, device)


def _save_net(state: dict, path: str) -> None:
    import os
    import tempfile

    import torch

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_style_train(args: argparse.Namespace) -> int:
    from ..synthesis.fast_style import train_fast_style

    model = load_model_from_args(args)
    net = _load_net(args.output, model.device) if args.resume else None

    def checkpoint(step: int, result) -> None:
        _save_net(result.state(), args.output)
        info(f"step {step}: loss {result.history[-1]:.4g}, wrote {args.output}")

    r = train_fast_style(model, args.style, args.data, steps=args.steps, batch_size=args.batch_size, size=args.size,
                         lr=args.lr, content_weight=args.content_weight, style_weight=args.style_weight, width=args.width,
                         blocks=args.blocks, net=net, checkpoint=checkpoint, checkpoint_every=max(1, args.checkpoint_every),
                         seed=args.seed, progress=_progress(args))
    print(f"trained {r.steps} steps in {r.seconds:.1f} s: loss {r.history[0]:.4g} -> {r.history[-1]:.4g}"
          + (" (interrupted)" if r.interrupted else ""))
    return 0


def run_stylize(args: argparse.Namespace) -> int:
    from ..models.loaders import pick_device
    from ..synthesis.fast_style import stylize

    net = _load_net(args.net, pick_device(args.device))
    _save(stylize(net, args.image, size=args.size), args.output)
    return 0


def run_adversarial(args: argparse.Namespace) -> int:
    from ..synthesis import adversarial

    model = load_model_from_args(args)
    x = model.preprocess(args.image)
    if args.size:
        import torch.nn.functional as F

        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False, antialias=True)
    target = model.class_index(args.target) if args.target is not None else None
    a = adversarial(model, x, target=target, eps=args.eps, norm=args.norm, method=args.method, steps=args.steps,
                    seed=args.seed, progress=_progress(args))
    _save(a.image, args.output)
    b, f = a.before[0], a.after[0]
    print(f"before: {b.labels[0]} ({b.probabilities[0]:.1%})")
    print(f"after:  {f.labels[0]} ({f.probabilities[0]:.1%})" + (f"  target p={float(a.target_probability[0]):.1%}" if a.target is not None else ""))
    print(f"perturbation: L-inf {float(a.perturbation['linf'][0]) * 255:.2f}/255, L2 {float(a.perturbation['l2'][0]):.3f} "
          f"(pixel units); {'success' if bool(a.success[0]) else 'failed'} after {a.steps} steps")
    return 0


def run_fool(args: argparse.Namespace) -> int:
    from ..synthesis import fooling_image

    model = load_model_from_args(args)
    r = fooling_image(model, args.target, confidence=args.confidence, steps=args.steps, size=args.size, seed=args.seed,
                      progress=_progress(args))
    _save(r.image, args.output)
    p = r.extras["probability"]
    print(f"{model.label(r.extras['target'])}: p={p:.2%} after {r.steps} steps")
    return 0
