"""``convscope diagnose``: dead and aliasing-prone convolution filters, from the weights alone.

Parses options, calls :func:`convscope.inspect.diagnostics.filter_health`, prints a table (or JSON) on
stdout and, with ``-o``, writes the picture of the flagged filters atomically; messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..inspect.diagnostics import filter_health
from ..options import bounded
from .common import load_model_from_args, output_file, save

ORDER = 15


def run_diagnose(args: argparse.Namespace) -> int:
    """Per-layer counts of dead and aliased filters, or the per-filter table of one layer."""
    if args.output:
        output_file(args.output, "")
    model = load_model_from_args(args)
    h = filter_health(model, args.layer, dead_fraction=args.dead_fraction, alias_threshold=args.alias_threshold,
                      strided_only=not args.all_strides)
    if args.json:
        print(json.dumps(h.to_dict(), indent=1))
    elif args.layer is None:
        _print_layers(h)
    else:
        _print_filters(h, args.all)
    if args.output:
        save(h.to_image(), args.output, "flagged filters")
    return 0


def _print_layers(h: Any) -> None:
    print(f"{'layer':<28} {'type':<11} {'filters':>7} {'kernel':>6} {'stride':>6} {'dead':>5} {'aliased':>7} {'mean alias':>10}")
    for r in h.rows():
        alias = "-" if r["mean_aliasing"] is None else f"{r['mean_aliasing']:.3f}"
        print(f"{r['layer']:<28} {r['type']:<11} {r['filters']:>7} {r['kernel']:>6} {r['stride']:>6} {r['dead']:>5} "
              f"{r['aliased']:>7} {alias:>10}")
    print(f"total: {h.dead} dead and {h.aliased} aliased filters in {len(h.layers)} conv layers")


def _print_filters(h: Any, everything: bool) -> None:
    print(h)
    rows = [r for r in h.table() if everything or r["dead"] or r["aliased"]]
    if not rows:
        print("no dead or aliased filters (--all lists every filter)")
        return
    print(f"{'filter':>6}  {'L2 norm':>10}  {'aliasing':>8}  flags")
    for r in rows:
        alias = "-" if r["aliasing"] is None else f"{r['aliasing']:.3f}"
        flags = " ".join(f for f in ("dead", "aliased") if r[f])
        print(f"{r['filter']:>6}  {r['norm']:>10.4g}  {alias:>8}  {flags}")


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``diagnose`` parser."""
    p = subparsers.add_parser(
        "diagnose", parents=parents, help="dead and aliasing-prone convolution filters (weights only)",
        description="For every Conv2d (or one, with --layer): filters that are zero or tiny (dead: L2 norm <= "
        "--dead-fraction x the layer's median) and filters dominated by high frequencies (aliasing score: share of "
        "spectral energy above half Nyquist, > --alias-threshold) in strided layers (Zeiler & Fergus 2014, fig. 6).",
    )
    p.add_argument("--layer", default=None, metavar="L", help="one conv layer: print its per-filter table")
    p.add_argument("--dead-fraction", type=bounded(float, 0, 1, name="--dead-fraction"), default=1e-3,
                   metavar="F", help="dead when the norm is at most F x the layer's median norm (0..1, default 1e-3)")
    p.add_argument("--alias-threshold", type=bounded(float, 0, 1, name="--alias-threshold"), default=0.75,
                   metavar="S", help="aliased when the high-frequency share exceeds S (0..1, default 0.75; random noise "
                   "scores about 0.69)")
    p.add_argument("--all-strides", action="store_true", help="flag aliasing in stride-1 layers too")
    p.add_argument("--all", action="store_true", help="with --layer: list every filter, not only the flagged ones")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png", help="write the picture of the flagged filters")
    p.set_defaults(func=run_diagnose)
