"""``convscope dissect BRODEN --layer L``: Network Dissection, which units detect which labelled concepts.

Parses options, calls :func:`convscope.dataset.dissect.dissect`, prints a table (or JSON) on stdout and writes
the unit picture atomically; ``--synthetic DIR`` writes a small Broden-format dataset instead. Progress and
messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..dataset.dissect import MAX_IMAGES, TOP_K, dissect, make_synthetic_broden
from ..dataset.net2vec import EPOCHS, MODES, net2vec
from ..errors import ConvscopeError
from ..files import check_output_dir
from ..options import bounded
from .common import (
    check_run_outputs,
    dataset_command,
    engine_kwargs,
    finish_run,
    info,
    layer_and_output,
    load_model_from_args,
    save,
    skipped_reported_once,
)

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
    if args.synthetic:
        if args.broden:
            raise ConvscopeError("give either BRODEN or --synthetic DIR, not both")
        check_output_dir(args.synthetic, what="synthetic dataset folder")
        root = make_synthetic_broden(args.synthetic, args.synthetic_images)
        info(f"synthetic Broden dataset ({args.synthetic_images} images) written to {root.resolve()}")
        return 0
    if not args.broden:
        raise ConvscopeError("give a Broden dataset folder (or --synthetic DIR to write a small one)")
    check_run_outputs(args)
    engine = engine_kwargs(args)
    model = load_model_from_args(args)
    layer, out = layer_and_output(args, model, "dissect")
    with skipped_reported_once():
        r = dissect(model, args.broden, layer, batch_size=args.batch_size, categories=args.categories,
                    quantile=args.quantile, iou_threshold=args.iou_threshold, max_images=args.max_images,
                    top_k=args.top_k, state=args.state, progress=False if args.no_progress else None, **engine)
    vectors = None
    if args.net2vec and r.num_units and not r.interrupted:
        vectors = net2vec(model, args.broden, layer, mode=args.net2vec_mode, thresholds=r, categories=args.categories,
                          epochs=args.net2vec_epochs, max_images=args.max_images, batch_size=args.batch_size,
                          progress=not args.no_progress)
    elif args.net2vec:
        info("net2vec: skipped (the dissection did not finish, so there are no thresholds)")
    if args.json:
        print(json.dumps({**r.to_dict(), **({"net2vec": vectors.to_dict()} if vectors else {})}, indent=1))
    else:
        print(r.table(args.top))
        if vectors is not None:
            several = ", ".join(c.name for c in vectors.needs_several()) or "none"
            print(f"\nNet2Vec ({vectors.mode}, held-out scores; concepts better encoded by several units: {several})")
            print(vectors.table(args.top))
    if r.num_units and r.processed:
        save(r.grid(rows=args.rows), out, f"dissection picture ({min(args.rows, r.num_units)} units)")
    if vectors is not None:
        stem, suffix = os.path.splitext(out)
        save(vectors.picture(), f"{stem}-net2vec{suffix}", "Net2Vec picture")
    return finish_run(r, args.state)


#: One line for ``convscope --help``.
HELP = "Network Dissection: which units detect which concepts (Broden dataset)"
#: What ``convscope dissect --help`` says the command does.
DESCRIPTION = (
    "Network Dissection (Bau et al., CVPR 2017): per unit of LAYER, threshold its activations at their "
    "99.5th percentile over the dataset, upsample to the mask resolution and score IoU (total intersection / "
    "total union) with every labelled concept of a Broden-format dataset. A unit whose best IoU exceeds 0.04 is a "
    "detector of that concept. Two streaming passes on the dataset engine; memory bounded by units x concepts; with "
    "--state the run is saved as it goes and the same command resumes it."
)


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``dissect`` parser."""
    p = dataset_command(subparsers, parents, "dissect", help=HELP, description=DESCRIPTION,
                        func=run_dissect, state=True, engine=True, output="picture (default dissect-LAYER.png)", json_help="print the per-unit results and counts as JSON")
    p.add_argument("broden", metavar="BRODEN", nargs="?", default=None,
                   help="Broden-format folder (index.csv, label.csv, images/)")
    p.add_argument("--synthetic", default=None, metavar="DIR", help="write a small synthetic Broden-format dataset to DIR and stop")
    p.add_argument("--synthetic-images", type=bounded(int, 1, 100_000, name="--synthetic-images"), default=40, metavar="N",
                   help="images of --synthetic (1..100000; default 40)")
    p.add_argument("--layer", default=None, metavar="L", help="layer name (default: the last spatial layer)")
    p.add_argument("--categories", type=_categories, default=None, metavar="LIST",
                   help="categories to score, e.g. object,part (default: all)")
    p.add_argument("--max-images", type=MAX_IMAGES.argtype("--max-images"), default=None, metavar="N",
                   help=f"use the first N images of the index ({MAX_IMAGES.range_text()}; default all)")
    p.add_argument("--quantile", type=_fraction, default=0.995, metavar="Q",
                   help="activation threshold quantile, strictly between 0 and 1 (default 0.995)")
    p.add_argument("--iou-threshold", type=_fraction, default=0.04, metavar="T",
                   help="detector IoU threshold, strictly between 0 and 1 (default 0.04)")
    p.add_argument("--top-k", type=TOP_K.argtype("--top-k"), default=TOP_K.default, metavar="K",
                   help=f"top images kept per unit for the picture ({TOP_K.range_text()}; default {TOP_K.default})")
    p.add_argument("--top", type=bounded(int, 1, None, name="--top"), default=None, metavar="N",
                   help="rows of the table (at least 1; default all units)")
    p.add_argument("--rows", type=bounded(int, 1, 4096, name="--rows"), default=8, metavar="N",
                   help="units drawn in the picture (1..4096; default 8)")
    p.add_argument("--net2vec", action="store_true",
                   help="also learn Net2Vec concept vectors (Fong & Vedaldi 2018) over the layer's channels, with the "
                   "dissection's thresholds, and compare each with the best single unit on held-out images")
    p.add_argument("--net2vec-mode", choices=MODES, default="segmentation",
                   help="segmentation (set IoU of masks) or classification (average precision); default segmentation")
    p.add_argument("--net2vec-epochs", type=EPOCHS.argtype("--net2vec-epochs"), default=EPOCHS.default, metavar="N",
                   help=f"Net2Vec training epochs ({EPOCHS.range_text()}; default {EPOCHS.default})")
