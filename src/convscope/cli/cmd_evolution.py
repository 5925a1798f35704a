"""``convscope evolution CKPT [CKPT ...] --arch A``: how filters and representations change over training.

Parses options, calls :func:`convscope.dataset.evolution.evolution`, prints the tables (or JSON) on
stdout and writes the curves (and optionally the filters over training) atomically; messages go to stderr.
``--state FILE`` saves the run after each checkpoint: after a Ctrl-C (exit 130) the same command skips the
checkpoints done, and a state of other checkpoints, probe images or options is refused with the reason
(exit 2). Unreadable probe images are skipped and reported on stderr. The probe passes take the dataset
engine's options (``--workers``, ``--amp``, ``--engine``...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from ..dataset.evolution import FEATURES, KEEP_FILTERS, MAX_IMAGES, evolution
from ..errors import ConvscopeError, LayerNotFoundError, suggestion
from ..files import check_output_path
from ..options import bounded
from .common import (
    dataset_command,
    engine_kwargs,
    image_inputs,
    info,
    output_file,
    report_skipped,
    save,
    skipped_reported_once,
)

ORDER = 48


def run_evolution(args: argparse.Namespace) -> int:
    """Measure the checkpoints, print the tables, draw the curves and the filters.

    Every picture is drawn before the first is written, so a bad ``--filter-layer`` leaves no file behind."""
    if args.model:
        raise ConvscopeError("evolution reads the checkpoints given as arguments; leave out --model (use --arch)")
    for path in args.checkpoints:
        if not os.path.isfile(path):
            raise ConvscopeError(f"{path}: no such checkpoint file")
    out = output_file(args.output, "evolution.png")
    filters_out = output_file(args.filters_out, "evolution-filters.png") if args.filters_out else None
    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if filters_out and args.filter_layer and layers is not None and args.filter_layer not in layers:
        raise LayerNotFoundError(f"--filter-layer {args.filter_layer!r} is not among --layers{suggestion(args.filter_layer, layers)}")
    if args.state is not None:
        check_output_path(args.state, what="state file")
    engine = engine_kwargs(args)
    images = image_inputs(args.images)
    with skipped_reported_once():
        ev = evolution(args.checkpoints, images, arch=args.arch, num_classes=args.num_classes,
                       layers=layers, labels=labels, batch_size=args.batch_size, max_images=args.max_images,
                       features=args.features, device=args.device, trust=args.trust_pickle,
                       progress=False if args.no_progress else None, state=args.state, **engine)
    report_skipped(ev.skipped)
    info(f"{ev} in {ev.seconds:.1f} s" + (f" ({ev.resumed} read back from {args.state})" if ev.resumed else "")
         + (f"; state in {args.state}" if args.state else ""))
    if ev.interrupted:
        info("interrupted: showing the checkpoints done; "
             + ("run the same command again to continue" if args.state else "rerun with --state FILE to be able to resume"))
    pictures = [(ev.curves_image(), out, "evolution curves")]
    if filters_out:
        layer = args.filter_layer or ev.layers[0]
        pictures.append((ev.filters_image(layer, max_filters=args.max_filters), filters_out, "filters over training"))
    for picture, path, what in pictures:
        save(picture, path, what)
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


#: One line for ``convscope --help``.
HELP = "how filters and representations change across training checkpoints"
#: What ``convscope evolution --help`` says the command does.
DESCRIPTION = (
    "Compare checkpoints of one architecture (state_dict / safetensors files, in training order; the "
    "last is the reference): relative weight drift per layer, cosine of each filter to its final self, linear CKA "
    "of each layer's activations to the final checkpoint's on probe images (default: the bundled samples), and "
    "top-1 agreement with the final model. Checkpoints are loaded one at a time; with --state FILE the run is saved "
    "after each checkpoint and the same command resumes it."
)


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``evolution`` parser."""
    p = dataset_command(subparsers, parents, "evolution", help=HELP, description=DESCRIPTION,
                        func=run_evolution, output="curves picture (default evolution.png)", json_help="print the tables as JSON",
                        state=True, engine=True)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files in training order (need --arch)")
    p.add_argument("--images", action="append", default=None, metavar="DIR",
                   help="probe images: a folder, or an image file / sample:NAME (repeat for several); "
                   "default: the bundled samples")
    p.add_argument("--layers", default=None, metavar="L1,L2", help="comma-separated layers (default: every Conv2d)")
    p.add_argument("--checkpoint-labels", dest="labels", default=None, metavar="A,B",
                   help="comma-separated names of the checkpoints (default: file names)")
    p.add_argument("--features", choices=FEATURES, default="pooled",
                   help="CKA features: global average per channel (default) or a 4x4 pooled map")
    p.add_argument("--max-images", type=MAX_IMAGES.argtype("--max-images"), default=MAX_IMAGES.default, metavar="N",
                   help=f"probe images at most ({MAX_IMAGES.range_text()}; default {MAX_IMAGES.default})")
    p.add_argument("--filters-out", default=None, metavar="FILE.png", help="also draw the filters over training")
    p.add_argument("--filter-layer", default=None, metavar="L", help="layer of --filters-out (default: the first measured)")
    p.add_argument("--max-filters", type=bounded(int, 1, KEEP_FILTERS, name="--max-filters"), default=16, metavar="N",
                   help=f"filters in --filters-out (1..{KEEP_FILTERS}; default 16)")
