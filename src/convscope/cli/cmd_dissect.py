"""``convscope dissect BRODEN --layer L``: Network Dissection, which units detect which labelled concepts.

Parses options, calls :func:`convscope.dataset.dissect.dissect`, prints a table (or JSON) on stdout and writes
the unit picture atomically; ``--synthetic DIR`` writes a small Broden-format dataset instead. Progress and
messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConvscopeError
from .cmd_inspect import output_file, positive_int, save, slug
from .common import info, load_model_from_args

ORDER = 47


def _categories(text: str) -> list[str]:
    out = [c.strip() for c in text.split(",") if c.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected categories like object,part, got {text!r}")
    return out


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def run_dissect(args: argparse.Namespace) -> int:
    """Dissect the layer over the Broden folder, or write the synthetic dataset."""
    from ..dataset.dissect import dissect, make_synthetic_broden
    from ..probe import default_layer

    if args.synthetic:
        if args.broden:
            raise ConvscopeError("give either BRODEN or --synthetic DIR, not both")
        root = make_synthetic_broden(args.synthetic, args.synthetic_images)
        info(f"synthetic Broden dataset ({args.synthetic_images} images) written to {root.resolve()}")
        return 0
    if not args.broden:
        raise ConvscopeError("give a Broden dataset folder (or --synthetic DIR to write a small one)")
    if args.output:
        output_file(args.output, "")
    model = load_model_from_args(args)
    layer = args.layer or default_layer(model, "cam")
    r = dissect(model, args.broden, layer, batch_size=args.batch_size, categories=args.categories,
                quantile=args.quantile, iou_threshold=args.iou_threshold, max_images=args.max_images,
                state=args.state, progress=False if args.no_progress else None)
    if r.skipped:
        info(f"skipped {len(r.skipped)} unreadable image(s): " + "; ".join(reason for _, reason in r.skipped[:3]))
    if args.json:
        print(json.dumps(r.to_dict(), indent=1))
    else:
        print(r.table(args.top))
    if r.num_units and r.processed:
        out = output_file(args.output, f"dissect-{slug(layer)}.png")
        save(r.grid(rows=args.rows), out, f"dissection picture ({min(args.rows, r.num_units)} units)")
    info(f"{r.processed - len(r.skipped)} images in {r.seconds:.1f} s" + (f"; state in {args.state}" if args.state else ""))
    if r.interrupted:
        info("interrupted: " + ("run the same command again to continue" if args.state else "rerun with --state FILE to be able to resume"))
        return 130
    return 0


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``dissect`` parser."""
    p = subparsers.add_parser(
        "dissect", parents=parents, help="Network Dissection: which units detect which concepts (Broden dataset)",
        description="Network Dissection (Bau et al., CVPR 2017): per unit of LAYER, threshold its activations at their "
        "99.5th percentile over the dataset, upsample to the mask resolution and score IoU (total intersection / "
        "total union) with every labelled concept of a Broden-format dataset. A unit whose best IoU exceeds 0.04 is a "
        "detector of that concept. Two streaming passes; memory bounded by units x concepts.",
    )
    p.add_argument("broden", metavar="BRODEN", nargs="?", default=None,
                   help="Broden-format folder (index.csv, label.csv, images/)")
    p.add_argument("--synthetic", default=None, metavar="DIR", help="write a small synthetic Broden-format dataset to DIR and stop")
    p.add_argument("--synthetic-images", type=positive_int, default=40, metavar="N", help="images of --synthetic (default 40)")
    p.add_argument("--layer", default=None, metavar="L", help="layer name (default: the last spatial layer)")
    p.add_argument("--categories", type=_categories, default=None, metavar="LIST",
                   help="categories to score, e.g. object,part (default: all)")
    p.add_argument("--max-images", type=positive_int, default=None, metavar="N", help="use the first N images of the index")
    p.add_argument("--quantile", type=_fraction, default=0.995, metavar="Q", help="activation threshold quantile (default 0.995)")
    p.add_argument("--iou-threshold", type=_fraction, default=0.04, metavar="T", help="detector IoU threshold (default 0.04)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per forward pass (default 32)")
    p.add_argument("--top", type=positive_int, default=None, metavar="N", help="rows of the table (default all units)")
    p.add_argument("--rows", type=positive_int, default=8, metavar="N", help="units drawn in the picture (default 8)")
    p.add_argument("--state", default=None, metavar="FILE", help="save progress to FILE (+ FILE.json); rerun to resume")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help="picture (default dissect-LAYER.png)")
    p.add_argument("--json", action="store_true", help="print the per-unit results and counts as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_dissect)
