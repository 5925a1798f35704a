"""Inspection commands: ``summary``, ``predict``, ``filters``, ``activations``, ``channels``.

Each parses its options, calls one function of :mod:`convscope.inspect` (or ``Model.predict``), prints
data on stdout and writes a picture with ``save_image`` (atomic); messages for people go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from ..errors import ConvscopeError
from .common import info, load_model_from_args

ORDER = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into one line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def image_stem(source: str) -> str:
    """A file-name-safe short name for an image argument (``sample:chelsea`` -> ``chelsea``)."""
    name = source.split(":", 1)[1] if source.startswith("sample:") else os.path.splitext(os.path.basename(source))[0]
    return slug(name) or "image"


def slug(text: str) -> str:
    """``text`` with runs of characters unsafe in file names replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")


def output_file(path: str | None, default: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> str:
    """``-o`` or the default name; an unusable suffix or an existing directory is a user error."""
    out = path or default
    if os.path.isdir(out):
        raise ConvscopeError(f"{out}: is a directory; give a file name with -o")
    if os.path.splitext(out)[1].lower() not in suffixes:
        raise ConvscopeError(f"{out}: unsupported output type; use one of {', '.join(suffixes)}")
    return out


def save(picture: Any, path: str, what: str) -> None:
    """Write ``picture`` atomically and say where on stderr; write errors become one-line user errors."""
    from ..render import save_image

    try:
        save_image(picture, path)
    except OSError as exc:
        raise ConvscopeError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
    info(f"{what} written to {os.path.abspath(path)}")


def _image_and_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Read the image first (fails fast, before the model loads), then the model."""
    from ..images import load_image

    img = load_image(args.image)
    return img, load_model_from_args(args)


def _layer_or_default(model: Any, layer: str | None) -> str:
    from ..probe import default_layer

    return layer or default_layer(model, "cam")


# ============================================================================ commands


def run_summary(args: argparse.Namespace) -> int:
    """``convscope summary``: print the layer table (or JSON) of the chosen model."""
    from ..inspect import summary

    model = load_model_from_args(args)
    s = summary(model, depth=args.depth, leaves=args.leaves)
    if args.json:
        rows = [
            {
                "name": r.name,
                "type": r.type,
                "output_shape": list(r.output_shape) if r.output_shape is not None else None,
                "params": r.params,
                "trainable": r.trainable,
                "receptive_field": None if r.receptive_field is None or r.receptive_field.size is None else list(r.receptive_field.size),
                "stride": None if r.receptive_field is None or r.receptive_field.size is None else list(r.receptive_field.stride),
                "depth": r.depth,
                "leaf": r.is_leaf,
            }
            for r in s.rows
        ]
        print(json.dumps({"model": s.name, "layers": rows, **s.totals()}, indent=2))
    else:
        print(s)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``convscope predict IMAGE``: print the top-K classes with softmax probabilities (or JSON)."""
    img, model = _image_and_model(args)
    pred = model.predict(model.preprocess(img), top=args.top)[0]
    if args.json:
        items = [{"rank": r, "index": i, "label": lab, "probability": p} for r, (i, lab, p) in enumerate(pred, start=1)]
        print(json.dumps({"image": args.image, "model": model.name, "predictions": items}, indent=2))
        return 0
    width = max(len("class"), *(len(lab) for lab in pred.labels))
    print(f"{args.image}  ({model.name})")
    print(f"{'#':>3}  {'class':<{width}}  {'index':>5}  {'probability':>11}")
    for rank, (i, lab, p) in enumerate(pred, start=1):
        bar = "#" * max(1, round(20 * p)) if p >= 0.005 else ""
        print(f"{rank:>3}  {lab:<{width}}  {i:>5}  {p:>11.2%}  {bar}")
    return 0


def run_filters(args: argparse.Namespace) -> int:
    """``convscope filters [LAYER]``: print filter norms and write the filter picture."""
    from ..inspect import filters

    layer = args.layer_opt or args.layer
    out = output_file(args.output, "") if args.output else None
    model = load_model_from_args(args)
    fs = filters(model, layer, max_filters=args.max_filters, max_channels=args.max_channels, scale=args.scale)
    print(fs)
    if fs.dead:
        shown = ", ".join(str(i) for i in fs.dead[:20]) + (" ..." if len(fs.dead) > 20 else "")
        print(f"near-zero filters (norm <= {fs.dead_tolerance:g} x max): {shown}")
    save(fs.image, out or output_file(None, f"filters-{slug(fs.layer)}.png"), "filter picture")
    return 0


def run_activations(args: argparse.Namespace) -> int:
    """``convscope activations IMAGE --layer L``: print a one-line digest and write the feature-map grid."""
    from ..inspect import feature_maps

    if args.output:
        output_file(args.output, "")
    img, model = _image_and_model(args)
    layer = _layer_or_default(model, args.layer)
    fm = feature_maps(model, model.preprocess(img), layer, max_channels=args.max_channels, sort=args.sort)
    c, h, w = fm.shape
    means = fm.means
    zero = int((fm.activations.flatten(1) == 0).all(1).sum())
    print(f"{layer}: {c} channels of {h}x{w}; channel means from {float(means.min()):.4g} to {float(means.max()):.4g};"
          f" {zero} channels are zero everywhere")
    out = output_file(args.output, f"activations-{image_stem(args.image)}-{slug(layer)}.png")
    save(fm.image, out, "feature maps")
    return 0


def run_channels(args: argparse.Namespace) -> int:
    """``convscope channels IMAGE --layer L``: print the top-K channel means and write the plot."""
    from ..inspect import channel_means

    if args.output:
        output_file(args.output, "")
    img, model = _image_and_model(args)
    layer = _layer_or_default(model, args.layer)
    resp = channel_means(model, model.preprocess(img), layer)
    top = resp.top(args.top)
    if args.json:
        print(json.dumps({"image": args.image, "layer": layer, "channels": int(resp.means.shape[1]),
                          "top": [{"channel": c, "mean": v} for c, v in top],
                          "means": [float(v) for v in resp.values.tolist()]}))
    else:
        print(f"{layer}: {resp.means.shape[1]} channels, {int(resp.zero[0])} exactly zero for this image")
        print(f"{'rank':>4}  {'channel':>7}  {'mean':>10}")
        for rank, (c, v) in enumerate(top, start=1):
            print(f"{rank:>4}  {c:>7}  {v:>10.4g}")
    out = output_file(args.output, f"channels-{image_stem(args.image)}-{slug(layer)}.png")
    save(resp.to_image(top=args.top), out, "channel plot")
    return 0


# ============================================================================ parsers


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the summary, predict, filters, activations and channels parsers."""
    p = subparsers.add_parser(
        "summary", parents=parents, help="layer table with output shapes, parameters and receptive fields",
        description="Keras-style table of every layer (output shape, parameters, trainable, receptive field) with totals.",
    )
    p.add_argument("--depth", type=positive_int, default=None, metavar="N", help="hide layers nested deeper than N")
    p.add_argument("--leaves", action="store_true", help="show only leaf modules (no containers)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_summary)

    p = subparsers.add_parser("predict", parents=parents, help="top classes with probabilities for an image",
                              description="Classify an image and print the top classes with softmax probabilities.")
    p.add_argument("image", metavar="IMAGE", help="image file or sample:NAME")
    p.add_argument("--top", type=positive_int, default=5, metavar="K", help="how many classes (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_predict)

    p = subparsers.add_parser(
        "filters", parents=parents, help="picture of a convolution's filters (default: the first layer)",
        description="Draw a Conv2d layer's kernels: RGB tiles for a first layer, else a filters x input-channels grid. "
        "Weights are scaled symmetrically per filter so grey is 0 (or --scale minmax).",
    )
    p.add_argument("layer", nargs="?", default=None, metavar="LAYER", help="a Conv2d layer (default: the first one)")
    p.add_argument("--layer", dest="layer_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help="picture file (default filters-LAYER.png)")
    p.add_argument("--max-filters", type=positive_int, default=64, metavar="N", help="show at most N filters (default 64)")
    p.add_argument("--max-channels", type=positive_int, default=16, metavar="N", help="show at most N input channels (default 16)")
    p.add_argument("--scale", choices=("symmetric", "minmax"), default="symmetric", help="weight scaling per filter")
    p.set_defaults(func=run_filters)

    p = subparsers.add_parser(
        "activations", parents=parents, help="feature maps of a layer for an image, as a grid",
        description="Run the image up to LAYER and draw every channel's activation map, labelled with its channel number.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file or sample:NAME")
    p.add_argument("--layer", default=None, metavar="L", help="layer name (default: the last spatial layer; see `convscope summary`)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help="picture file (default activations-IMAGE-LAYER.png)")
    p.add_argument("--max-channels", type=positive_int, default=64, metavar="N", help="show at most N channels (default 64)")
    p.add_argument("--sort", choices=("index", "mean", "max"), default="index", help="channel order (default index)")
    p.set_defaults(func=run_activations)

    p = subparsers.add_parser(
        "channels", parents=parents, help="mean activation of every channel of a layer, plotted",
        description="Mean activation of every channel of LAYER for the image; prints the top K and plots all of them.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file or sample:NAME")
    p.add_argument("--layer", default=None, metavar="L", help="layer name (default: the last spatial layer)")
    p.add_argument("--top", type=positive_int, default=5, metavar="K", help="channels to list and label (default 5)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help="plot file (default channels-IMAGE-LAYER.png)")
    p.add_argument("--json", action="store_true", help="print the top channels and every channel's mean as JSON")
    p.set_defaults(func=run_channels)
