"""``convscope explain``: why the network predicts what it does, with any attribution method.

``explain IMAGE --method M [--layer L] [--target T] [-o out.png]`` writes the map over the image;
``--method all`` a labelled grid of every registered method (the many-pass ones with fewer passes,
listed on stderr); ``--mask`` the image with only its important region kept; ``--list`` the methods
with their family, cost and options. Method options: ``--option key=value`` (repeatable), typed from
the method registry.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import ConvscopeError
from .common import info, load_model_from_args, parse_target

ORDER = 30

#: Cheaper settings for ``--method all`` (a preview grid; run a method alone for full quality).
ALL_SETTINGS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 8},
    "occlusion": {"window": 32, "stride": 16},
    "rise": {"masks": 300},
}


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "explain",
        parents=parents,
        help="explain a prediction: saliency, CAM family, occlusion ... as a heatmap",
        description="Explain the prediction for IMAGE (a path or sample:NAME) with an attribution method.",
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image path or sample:NAME")
    p.add_argument("--method", default="gradcam", metavar="M", help="attribution method, or 'all' (see --list)")
    p.add_argument("--layer", default=None, metavar="L", help="layer of CAM methods (default: the last spatial layer)")
    p.add_argument("--target", default=None, metavar="T", help="class index or label (default: the top prediction)")
    p.add_argument("-o", "--output", default=None, metavar="PATH", help="output PNG (default: IMAGE_METHOD.png)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --option steps=64 --option baseline=blur)")
    p.add_argument("--mask", action="store_true", help="write the image with only its important region kept")
    p.add_argument("--threshold", type=float, default=0.5, help="map value in [0, 1] kept by --mask (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity of the overlay (default 0.5)")
    p.add_argument("--list", action="store_true", help="list the methods with their family, passes and options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..attribution import METHODS, method_names

    if args.list:
        method_names()
        for spec in METHODS.values():
            print(f"{spec.name:22s} {spec.family:13s} {spec.passes}")
            for key, opt in spec.options.items():
                choices = f" ({'/'.join(map(str, opt.choices))})" if opt.choices else ""
                print(f"{'':24s}{key}={opt.default}{choices}: {opt.help}")
        return 0
    if not args.image:
        raise ConvscopeError("explain needs an IMAGE (a path or sample:NAME), or --list")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConvscopeError(f"--threshold must lie in [0, 1], got {args.threshold}")
    if args.method == "all" and args.mask:
        raise ConvscopeError("--mask works with one method, not with --method all")
    from ..images import load_image

    image = load_image(args.image)
    model = load_model_from_args(args)
    target = parse_target(args.target, model)
    x = model.preprocess(image)
    output = args.output or _default_output(args.image, args.method, args.mask)
    if args.method == "all":
        picture = _all_methods(model, x, image, target, args)
    else:
        picture = _one_method(model, x, image, target, args)
    from ..render import save_image

    save_image(picture, output)
    print(output)
    return 0


def _one_method(model: Any, x: Any, image: Any, target: Any, args: argparse.Namespace):
    from ..attribution import attribute, get_method
    from ..attribution.registry import parse_option

    spec = get_method(args.method)
    options = dict(parse_option(spec, text) for text in args.option)
    start = time.perf_counter()
    a = attribute(model, x, spec.name, target=target, layer=args.layer, **options)
    seconds = time.perf_counter() - start
    _describe(model, a, seconds)
    if args.mask:
        return a.mask(image, threshold=args.threshold)
    return _picture(spec.family, a, image, args.alpha)


def _picture(family: str, a: Any, image: Any, alpha: float):
    """Pixel-level maps read best as a heatmap of their own; region maps as an overlay on the image."""
    if family == "gradient":
        return a.heatmap(cmap="inferno")
    return a.overlay(image, alpha=alpha)


def _all_methods(model: Any, x: Any, image: Any, target: Any, args: argparse.Namespace):
    from ..attribution import attribute, get_method, method_names
    from ..render import grid

    if args.option:
        raise ConvscopeError("--option applies to one method; run --method NAME to set options")
    pictures = [model.transform_image(image)]
    labels = ["input"]
    reduced = []
    for name in method_names():
        spec = get_method(name)
        options = {k: v for k, v in ALL_SETTINGS.get(name, {}).items() if k in spec.options}
        if options:
            reduced.append(f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})")
        layer = args.layer if spec.uses_layer else None
        start = time.perf_counter()
        a = attribute(model, x, name, target=target, layer=layer, **options)
        seconds = time.perf_counter() - start
        _describe(model, a, seconds)
        pictures.append(_picture(spec.family, a, image, args.alpha))
        labels.append(name)
    if reduced:
        info("preview settings (fewer passes) for: " + "; ".join(reduced))
    t = int(a.target[0])
    return grid(pictures, labels=labels, columns=6, title=f"{model.label(t)} ({t})")


def _describe(model: Any, a: Any, seconds: float) -> None:
    t = int(a.target[0])
    extra = ""
    if "completeness_error" in a.extras:
        extra = f", completeness error {float(a.extras['completeness_error'][0]):.2%}"
    layer = f" at {a.layer}" if a.layer else ""
    info(
        f"{a.method}{layer}: class {t} ({model.label(t)}), {a.forward_passes} forward + "
        f"{a.backward_passes} backward passes, {seconds:.2f} s{extra}"
    )


def _default_output(image: str, method: str, mask: bool) -> str:
    stem = image.split(":", 1)[1] if image.startswith("sample:") else Path(image).stem
    safe = method.replace("+", "p")
    return f"{stem}_{safe}{'_mask' if mask else ''}.png"
