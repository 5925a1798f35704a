"""``convscope evolution CKPT [CKPT ...] --arch A``: how filters and representations change over training.

Parses options, calls :func:`convscope.dataset.evolution.evolution`, prints the tables (or JSON) on
stdout and writes the curves (and optionally the filters over training) atomically; messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from typing import Any

from ..errors import ConvscopeError
from .cmd_inspect import output_file, positive_int, save
from .common import info

ORDER = 48


def _images(items: list[str] | None) -> Any:
    """``None`` (bundled samples), one folder as itself, or a list of image files / ``sample:NAME``."""
    if not items:
        return None
    if len(items) == 1 and not items[0].startswith("sample:"):
        if not os.path.exists(items[0]):
            raise ConvscopeError(f"{items[0]}: no such folder or file")
        if os.path.isdir(items[0]):
            return items[0]
    for item in items:
        if os.path.isdir(item):
            raise ConvscopeError(f"{item}: give one folder, or a list of image files")
    return items


def run_evolution(args: argparse.Namespace) -> int:
    """Measure the checkpoints, print the tables, draw the curves and the filters."""
    from ..dataset.evolution import evolution
    from ..dataset.folder import SkippedImagesWarning

    if args.model:
        raise ConvscopeError("evolution reads the checkpoints given as arguments; leave out --model (use --arch)")
    for path in args.checkpoints:
        if not os.path.isfile(path):
            raise ConvscopeError(f"{path}: no such checkpoint file")
    out = output_file(args.output, "evolution.png")
    filters_out = output_file(args.filters_out, "evolution-filters.png") if args.filters_out else None
    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)  # reported below, in one line
        ev = evolution(args.checkpoints, _images(args.images), arch=args.arch, num_classes=args.num_classes,
                       layers=layers, labels=labels, batch_size=args.batch_size, max_images=args.max_images,
                       features=args.features, device=args.device, trust=args.trust_pickle,
                       progress=False if args.no_progress else None)
    if ev.skipped:
        info(f"skipped {len(ev.skipped)} unreadable image(s): {ev.skipped[0][1]}" + (" ..." if len(ev.skipped) > 1 else ""))
    info(f"{ev} in {ev.seconds:.1f} s")
    if ev.interrupted:
        info("interrupted: showing the checkpoints done")
    save(ev.curves_image(), out, "evolution curves")
    if filters_out:
        layer = args.filter_layer or ev.layers[0]
        save(ev.filters_image(layer, max_filters=args.max_filters), filters_out, "filters over training")
    if args.json:
        print(json.dumps(ev.to_dict(), indent=1))
    else:
        _print_tables(ev)
    return 130 if ev.interrupted else 0


def _cell(v: Any) -> str:
    f = float(v)
    return f"{'-':>8}" if math.isnan(f) else f"{f:8.4f}"


def _print_tables(ev: Any) -> None:
    heads = [f"#{i}" for i in range(len(ev.checkpoints))]  # names listed below the tables
    width = max(12, max(len(n) for n in ev.layers))
    for title, table in (("CKA to final", ev.cka), ("weight drift from previous", ev.drift_previous),
                         ("weight drift from final", ev.drift_final), ("mean filter cosine to final", ev.filter_cosine)):
        print(f"{title} ({ev.images} probe images, {ev.features} features)" if "CKA" in title else title)
        print(f"{'layer':<{width}}  " + " ".join(f"{h:>8}" for h in heads))
        for j, layer in enumerate(ev.layers):
            print(f"{layer:<{width}}  " + " ".join(_cell(table[i, j]) for i in range(len(ev.checkpoints))))
        print()
    if ev.agreement is not None:
        print(f"{'top-1 agreement':<{width}}  " + " ".join(_cell(v) for v in ev.agreement))
    for i, name in enumerate(ev.checkpoints):
        print(f"#{i}: {name}")


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``evolution`` parser."""
    p = subparsers.add_parser(
        "evolution", parents=parents, help="how filters and representations change across training checkpoints",
        description="Compare checkpoints of one architecture (state_dict / safetensors files, in training order; the "
        "last is the reference): relative weight drift per layer, cosine of each filter to its final self, linear CKA "
        "of each layer's activations to the final checkpoint's on probe images (default: the bundled samples), and "
        "top-1 agreement with the final model. Checkpoints are loaded one at a time.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files in training order (need --arch)")
    p.add_argument("--images", action="append", default=None, metavar="DIR",
                   help="probe images: a folder, or an image file / sample:NAME (repeat for several); "
                   "default: the bundled samples")
    p.add_argument("--layers", default=None, metavar="L1,L2", help="comma-separated layers (default: every Conv2d)")
    p.add_argument("--checkpoint-labels", dest="labels", default=None, metavar="A,B",
                   help="comma-separated names of the checkpoints (default: file names)")
    p.add_argument("--features", choices=("pooled", "spatial"), default="pooled",
                   help="CKA features: global average per channel (default) or a 4x4 pooled map")
    p.add_argument("--max-images", type=positive_int, default=256, metavar="N", help="probe images at most (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per forward pass (default 32)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help="curves picture (default evolution.png)")
    p.add_argument("--filters-out", default=None, metavar="FILE.png", help="also draw the filters over training")
    p.add_argument("--filter-layer", default=None, metavar="L", help="layer of --filters-out (default: the first measured)")
    p.add_argument("--max-filters", type=positive_int, default=16, metavar="N", help="filters in --filters-out (default 16)")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evolution)
