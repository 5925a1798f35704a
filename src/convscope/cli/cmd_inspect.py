"""Inspection commands: ``summary``, ``predict``, ``filters``, ``activations``, ``channels``.

Each parses its options, calls one function of :mod:`convscope.inspect` (or ``Model.predict``), prints
data on stdout and writes a picture with ``save_image`` (atomic); messages for people go to stderr.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..images import load_image
from ..inspect import channel_means, feature_maps, filters, summary
from ..models import Model, default_layer
from .common import (
    image_stem,
    load_model_from_args,
    output_file,
    positive_int,
    save,
    slug,
)

ORDER = 10


def _image_model_layer(args: argparse.Namespace) -> tuple[Any, Model, str]:
    """Check ``-o``, read the image, load the model and pick ``--layer`` (default: the last spatial layer),
    cheapest failure first: a bad output path or image fails before the model loads."""
    if args.output:
        output_file(args.output, "")
    img = load_image(args.image)
    model = load_model_from_args(args)
    return img, model, args.layer or default_layer(model, "cam")


def _save_view(picture: Any, args: argparse.Namespace, kind: str, layer: str, what: str) -> None:
    """Write a view of ``layer`` for ``args.image`` to ``-o`` or ``KIND-IMAGE-LAYER.png``."""
    save(picture, output_file(args.output, f"{kind}-{image_stem(args.image)}-{slug(layer)}.png"), what)


# ============================================================================ commands


def run_summary(args: argparse.Namespace) -> int:
    """``convscope summary``: print the layer table (or JSON) of the chosen model."""
    model = load_model_from_args(args)
    s = summary(model, depth=args.depth, leaves=args.leaves)
    if args.json:
        print(json.dumps(s.to_dict(), indent=2))
    else:
        print(s)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``convscope predict IMAGE``: print the top-K classes with softmax probabilities (or JSON)."""
    img = load_image(args.image)
    model = load_model_from_args(args)
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
    layer = args.layer_opt or args.layer
    out = output_file(args.output, "") if args.output else None
    model = load_model_from_args(args)
    fs = filters(model, layer, max_filters=args.max_filters, max_channels=args.max_channels, scale=args.scale)
    print(fs)
    if fs.dead:
        shown = ", ".join(str(i) for i in fs.dead[:20]) + (" ..." if len(fs.dead) > 20 else "")
        print(f"dead filters (all zero, or norm <= {fs.dead_fraction:g} x the median): {shown}")
    save(fs.image, out or output_file(None, f"filters-{slug(fs.layer)}.png"), "filter picture")
    return 0


def run_activations(args: argparse.Namespace) -> int:
    """``convscope activations IMAGE --layer L``: print a one-line digest and write the feature-map grid."""
    img, model, layer = _image_model_layer(args)
    fm = feature_maps(model, model.preprocess(img), layer, max_channels=args.max_channels, sort=args.sort)
    c, h, w = fm.shape
    means = fm.means
    zero = int((fm.activations.flatten(1) == 0).all(1).sum())
    print(f"{layer}: {c} channels of {h}x{w}; channel means from {float(means.min()):.4g} to {float(means.max()):.4g};"
          f" {zero} channels are zero everywhere")
    _save_view(fm.image, args, "activations", layer, "feature maps")
    return 0


def run_channels(args: argparse.Namespace) -> int:
    """``convscope channels IMAGE --layer L``: print the top-K channel means and write the plot."""
    img, model, layer = _image_model_layer(args)
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
    _save_view(resp.to_image(top=args.top), args, "channels", layer, "channel plot")
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

    p = _image_view(subparsers, parents, "activations", help="feature maps of a layer for an image, as a grid",
                    description="Run the image up to LAYER and draw every channel's activation map, labelled with its "
                    "channel number.", output="picture file (default activations-IMAGE-LAYER.png)")
    p.add_argument("--max-channels", type=positive_int, default=64, metavar="N", help="show at most N channels (default 64)")
    p.add_argument("--sort", choices=("index", "mean", "max"), default="index", help="channel order (default index)")
    p.set_defaults(func=run_activations)

    p = _image_view(subparsers, parents, "channels", help="mean activation of every channel of a layer, plotted",
                    description="Mean activation of every channel of LAYER for the image; prints the top K and plots "
                    "all of them.", output="plot file (default channels-IMAGE-LAYER.png)")
    p.add_argument("--top", type=positive_int, default=5, metavar="K", help="channels to list and label (default 5)")
    p.add_argument("--json", action="store_true", help="print the top channels and every channel's mean as JSON")
    p.set_defaults(func=run_channels)


def _image_view(subparsers: Any, parents: list[argparse.ArgumentParser], name: str, *, help: str, description: str,
                output: str) -> argparse.ArgumentParser:
    """A parser for a view of one layer for one image: IMAGE, ``--layer`` and ``-o``."""
    p = subparsers.add_parser(name, parents=parents, help=help, description=description)
    p.add_argument("image", metavar="IMAGE", help="image file or sample:NAME")
    p.add_argument("--layer", default=None, metavar="L",
                   help="layer name (default: the last spatial layer; see `convscope summary`)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help=output)
    return p
