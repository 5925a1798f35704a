"""``convscope topk FOLDER --layer L``: the images and patches that most activate each channel of a layer.

Parses options, calls :func:`convscope.dataset.topk.top_activations`, prints a table (or JSON) on stdout
and writes the grid picture atomically; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

from ..dataset.engine import ChannelStats
from ..dataset.engine import run as run_engine
from ..dataset.projection import BATCH_SIZE as PROJECT_BATCH_SIZE
from ..dataset.projection import DEFAULT_METHOD, METHODS, SCALES
from ..dataset.topk import DEFAULT_ROWS, REDUCES, K, TopKReducer, channel_ranges, top_activations
from ..errors import ConvscopeError
from ..options import bounded
from ..probe import NoSwitchesWarning
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

ORDER = 45


def parse_channels(text: str) -> list[int]:
    """``"0-15,20,31-33"`` -> ``[0, ..., 15, 20, 31, 32, 33]`` (argparse type; bad text exits with 2)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(s) for s in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected channels like 0-15,20, got {text!r}") from None
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"channel listed twice in {text!r}")
    return out


def run_topk(args: argparse.Namespace) -> int:
    """Stream the folder, print the top images per channel, write the grid picture."""
    if not os.path.isdir(args.folder):
        raise ConvscopeError(f"{args.folder}: not a folder")
    check_run_outputs(args)
    if args.reduce != "max" and (args.project or args.dead):
        raise ConvscopeError("--project and --dead need --reduce max (a unit position per image, the maximum over the dataset)")
    model = load_model_from_args(args)
    layer, out = layer_and_output(args, model, "topk")
    stats = None
    with skipped_reported_once():
        if args.stats:  # one pass for both: the engine hands every batch to the two reducers
            both = run_engine(model, args.folder, [TopKReducer(layer, k=args.k, channels=args.channels, reduce=args.reduce),
                                                  ChannelStats(layer)], what="top-k", batch_size=args.batch_size,
                             state=args.state, save_every=args.save_every, progress=False if args.no_progress else None,
                             desc=f"top-k + statistics {layer}", **engine_kwargs(args))
            r, stats = both.results
        else:
            r = top_activations(model, args.folder, layer, k=args.k, channels=args.channels, reduce=args.reduce,
                                batch_size=args.batch_size, state=args.state, save_every=args.save_every,
                                progress=False if args.no_progress else None, **engine_kwargs(args))
    if args.json:
        data = r.to_dict()
        data["root"] = os.path.abspath(args.folder)
        for item in data["channels"]:
            for hit in item["top"]:
                hit["source"] = _relative(hit["source"], args.folder)
        for item in data["skipped"]:
            item["source"] = _relative(item["source"], args.folder)
        if args.dead:
            data["dead"] = r.dead()
        if stats is not None:
            data["stats"] = stats.to_dict()
        print(json.dumps(data, indent=1))
    else:
        _print_table(r, args.folder)
        if args.dead:
            _print_dead(r)
        if stats is not None:
            _print_stats(stats)
    if r.channels:
        shown = args.channels if args.channels is not None else r.channels[: args.rows]
        if args.project:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NoSwitchesWarning)
                projections = r.projected(model, shown, method=args.project, batch_size=args.project_batch_size,
                                          progress=False if args.no_progress else None)
                picture = r.grid(shown, mode="projection", projections=projections, scale=args.project_scale)
            for w in caught:
                info(f"note: {w.message}")
            save(picture, out, f"top-{args.k} grid with {args.project} projections ({len(shown)} channels)")
        else:
            save(r.grid(shown, mode=args.mode), out, f"top-{args.k} grid ({len(shown)} channels)")
    else:
        info("no image could be scored; nothing to draw")
    return finish_run(r, args.state)


def _relative(source: str | None, folder: str) -> str | None:
    if source is None:
        return None
    return os.path.relpath(source, folder)


def _print_table(r: Any, folder: str) -> None:
    print(f"{r.layer}: top {r.k} by {r.reduce} over {r.processed - len(r.skipped)} images"
          + ("" if r.complete else f" ({r.processed}/{r.total} done)"))
    print(f"{'channel':>7}  {'value':>10}  {'where':>9}  top image (then the next ones)")
    for c in r.channels:
        hits = r.hits(c)
        if not hits:
            continue
        h = hits[0]
        where = "" if h.y is None else f"({h.y},{h.x})"
        rest = ", ".join(_relative(o.source, folder) or str(o.image) for o in hits[1:4]) + (" ..." if len(hits) > 4 else "")
        print(f"{c:>7}  {h.value:>10.4g}  {where:>9}  {_relative(h.source, folder)}" + (f"  | {rest}" if rest else ""))


def _print_stats(stats: Any) -> None:
    order = sorted(range(len(stats.mean)), key=lambda c: -float(stats.mean[c]))
    print(f"statistics of {stats.layer} over {stats.images} images (mean, std, max, sparsity = share of positions <= 0, "
          "fires = share of images with max > 0), strongest mean first:")
    print(f"{'channel':>7}  {'mean':>9}  {'std':>9}  {'max':>9}  {'sparsity':>8}  {'fires':>6}")
    for c in order[:16]:
        print(f"{c:>7}  {float(stats.mean[c]):>9.4g}  {float(stats.std[c]):>9.4g}  {float(stats.max[c]):>9.4g}  "
              f"{float(stats.sparsity[c]):>8.3f}  {float(stats.fires[c]):>6.3f}")
    if len(order) > 16:
        print(f"... and {len(order) - 16} more channels (--json lists all)")
    dead = stats.never_fires
    print(f"never fires: {channel_ranges(dead) if dead else 'none'} ({len(dead)} of {len(order)} channels)")


def _print_dead(r: Any) -> None:
    dead = r.dead()
    scored = r.processed - len(r.skipped)
    if dead:
        print(f"dead: {len(dead)} of {len(r.channels)} channels never above 0 on {scored} images: {channel_ranges(dead)}")
    else:
        print(f"dead: none of {len(r.channels)} channels (every one above 0 on some of {scored} images)")


#: One line for ``convscope --help``.
HELP = "the images and patches that most activate each channel, over a folder"
#: What ``convscope topk --help`` says the command does.
DESCRIPTION = (
    "Stream every image of FOLDER (recursively, sorted) through the model up to LAYER and keep, per channel, "
    "the K images with the largest response (spatial max with its receptive-field patch, or mean). Memory stays "
    "bounded by channels x K; with --state the run is saved as it goes and the same command resumes it."
)


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``topk`` parser."""
    p = dataset_command(subparsers, parents, "topk", save_every=True, help=HELP, description=DESCRIPTION,
                        func=run_topk, state=True, engine=True, output="grid picture (default topk-LAYER.png)", json_help="print every channel's top images as JSON")
    p.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    p.add_argument("--layer", default=None, metavar="L", help="layer name (default: the last spatial layer)")
    p.add_argument("--k", type=K.argtype("--k"), default=K.default, metavar="K",
                   help=f"images kept per channel ({K.range_text()}; default {K.default})")
    p.add_argument("--channels", type=parse_channels, default=None, metavar="LIST",
                   help="channels to rank, e.g. 0-15,20 (default: all; the picture shows the first --rows)")
    p.add_argument("--reduce", choices=REDUCES, default="max", help="spatial max (with patch) or mean (default max)")
    p.add_argument("--mode", choices=("patch", "image"), default=None,
                   help="picture tiles: receptive-field patches or whole images with the box (default: patch for max)")
    p.add_argument("--project", choices=METHODS, nargs="?", const=DEFAULT_METHOD, default=None,
                   help="draw each patch next to the unit's projection to pixels: guided backprop (the default when "
                   "--project has no value; it depends on the image), Zeiler & Fergus's DeconvNet (image-specific "
                   "only through max-pooling switches) or the plain gradient; needs --reduce max")
    p.add_argument("--project-scale", choices=SCALES, default="signed",
                   help="projection display: signed (grey = 0, Zeiler & Fergus) or abs (|x|, black = 0); default signed")
    p.add_argument("--project-batch-size", type=PROJECT_BATCH_SIZE.argtype("--project-batch-size"),
                   default=PROJECT_BATCH_SIZE.default, metavar="N",
                   help=f"units per forward + backward pass of --project ({PROJECT_BATCH_SIZE.range_text()}; default 16)")
    p.add_argument("--dead", action="store_true", help="also list the channels that never fire (max response <= 0)")
    p.add_argument("--stats", action="store_true",
                   help="also compute every channel's statistics (mean, std, max, sparsity, share of images where it "
                   "fires, never-firing channels) in the same forward passes")
    p.add_argument("--rows", type=bounded(int, 1, 4096, name="--rows"), default=DEFAULT_ROWS, metavar="N",
                   help=f"channels drawn without --channels (1..4096; default {DEFAULT_ROWS})")
