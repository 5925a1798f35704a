"""``convscope explain``: why the network predicts what it does, with any attribution method.

``explain IMAGE --method M [--layer L] [--target T] [-o out.png]`` writes the map over the image;
``--method all`` a labelled grid of every registered method (each with its registered preview
settings, fewer passes, listed on stderr); ``--mask`` the image with only its important region kept;
``--list`` the methods with their family, cost and options. Method options: ``--option key=value``
(repeatable), typed and bounded by the method registry.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

from ..attribution import METHODS, attribute, get_method, method_names
from ..attribution.registry import MethodSpec, parse_option
from ..errors import ConvscopeError
from ..files import check_output_path
from ..images import IMAGE_SUFFIXES, load_image
from ..options import Option
from ..render import grid, save_image
from .common import info, load_model_from_args, parse_target

ORDER = 30

#: ``--alpha`` and ``--threshold``: declared once, parsed (with their range in the error) by argparse.
ALPHA = Option(float, 0.5, "heatmap opacity of the overlay, 0..1 (default 0.5)", minimum=0.0, maximum=1.0)
THRESHOLD = Option(float, 0.5, "map value kept by --mask, 0..1 (default 0.5)", minimum=0.0, maximum=1.0)


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
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="output picture, .png, .jpg ... (default: IMAGE_METHOD.png)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --option steps=64 --option baseline=blur)")
    p.add_argument("--mask", action="store_true", help="write the image with only its important region kept")
    p.add_argument("--threshold", type=THRESHOLD.argtype("--threshold"), default=THRESHOLD.default, help=THRESHOLD.help)
    p.add_argument("--alpha", type=ALPHA.argtype("--alpha"), default=ALPHA.default, help=ALPHA.help)
    p.add_argument("--list", action="store_true", help="list the methods with their family, passes and options")
    p.add_argument("--no-progress", action="store_true", help="draw no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        method_names()
        for spec in METHODS.values():
            print(f"{spec.name:22s} {spec.family:13s} {spec.passes}")
            for key, opt in spec.options.items():
                print(f"{'':24s}{key}={opt.default} ({opt.range_text()}): {opt.help}")
        return 0
    if not args.image:
        raise ConvscopeError("explain needs an IMAGE (a path or sample:NAME), or --list")
    if args.method == "all" and args.mask:
        raise ConvscopeError("--mask works with one method, not with --method all")
    if args.method == "all" and args.option:
        raise ConvscopeError("--option applies to one method; run --method NAME to set options")
    output = args.output or _default_output(args.image, args.method, args.mask)
    check_output_path(output, IMAGE_SUFFIXES, what="picture")  # before any slow work
    # every option is parsed and bounded before the model loads
    spec = None if args.method == "all" else get_method(args.method)
    options = {} if spec is None else dict(parse_option(spec, text) for text in args.option)
    image = load_image(args.image)
    model = load_model_from_args(args)
    target = parse_target(args.target, model)
    x = model.preprocess(image)
    if spec is None:
        picture = _all_methods(model, x, image, target, args)
    else:
        picture = _one_method(spec, options, model, x, image, target, args)
    save_image(picture, output)
    print(output)
    return 0


def _explain(spec: MethodSpec, model: Any, x: Any, target: Any, layer: str | None, options: dict[str, Any],
             args: argparse.Namespace) -> Any:
    """Run one method, describing it on stderr."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = attribute(model, x, spec.name, target=target, layer=layer, progress=not args.no_progress, **options)
    seconds = time.perf_counter() - start
    t = int(a.target[0])
    extra = ""
    if "completeness_error" in a.extras:
        extra = f", completeness error {float(a.extras['completeness_error'][0]):.2%}"
        if "steps" in a.extras:
            extra += f" at {int(a.extras['steps'][0])} steps"
    where = f" at {a.layer}" if a.layer else ""
    info(
        f"{a.method}{where}: class {t} ({model.label(t)}), {a.forward_passes} forward + "
        f"{a.backward_passes} backward passes, {seconds:.2f} s{extra}"
    )
    for w in caught:  # the method's warnings (e.g. a step cap reached), one line each
        info(f"warning: {w.message}")
    return a


def _one_method(spec: MethodSpec, options: dict[str, Any], model: Any, x: Any, image: Any, target: Any,
                args: argparse.Namespace):
    a = _explain(spec, model, x, target, args.layer, options, args)
    return spec.draw(a, image, view="mask" if args.mask else None, alpha=args.alpha, threshold=args.threshold)


def _all_methods(model: Any, x: Any, image: Any, target: Any, args: argparse.Namespace):
    pictures = [model.transform_image(image)]
    labels = ["input"]
    reduced = []
    for name in method_names():
        spec = get_method(name)
        if spec.preview:
            reduced.append(f"{name} ({', '.join(f'{k}={v}' for k, v in spec.preview.items())})")
        layer = args.layer if spec.uses_layer else None
        a = _explain(spec, model, x, target, layer, spec.preview, args)
        pictures.append(spec.draw(a, image, alpha=args.alpha))
        labels.append(name)
    if reduced:
        info("preview settings (fewer passes) for: " + "; ".join(reduced))
    t = int(a.target[0])
    return grid(pictures, labels=labels, columns=6, title=f"{model.label(t)} ({t})")


def _default_output(image: str, method: str, mask: bool) -> str:
    stem = image.split(":", 1)[1] if image.startswith("sample:") else Path(image).stem
    safe = method.replace("+", "p")
    return f"{stem}_{safe}{'_mask' if mask else ''}.png"
