"""``convscope bias``: shape-versus-texture bias (Geirhos et al., ICLR 2019) and shape-only accuracy.

``bias [--data DIR] [--silhouettes DIR] [--edges DIR] [--categories FILE] [--state FILE] [--json] [-o plot.png]``
prints the shape bias, the shares of shape / texture / other decisions, the counts per shape category and
the 16-way accuracy on silhouettes and edge drawings (a short table, or JSON); ``-o`` writes the
per-category plot (with an accuracy panel when shape-only sets ran). Without ``--data`` the shipped sample
in ``../shared/data`` is used, and its silhouettes and edges too unless ``--no-shape-only``.

The stimuli stream through the dataset engine (``--workers``, ``--amp``, ``--engine ray``...). ``--state FILE``
keeps every set of the command in one state file (:func:`~convscope.dataset.bias.stimuli_state`): after a
Ctrl-C (exit 130) the same command continues where it stopped, finished sets are read back without a forward
pass, and a state of other stimuli, categories, ``--crop`` or weights is refused with the reason (exit 2).
Unreadable stimuli are skipped and listed on stderr (and under ``unreadable`` in ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ..dataset.bias import (
    PUBLISHED_SHAPE_ACCURACY,
    PUBLISHED_SHAPE_BIAS,
    find_stimuli,
    shape_accuracy,
    shape_bias,
    stimuli_state,
)
from ..dataset.folder import skipped_summary
from .common import (
    check_run_outputs,
    dataset_command,
    engine_kwargs,
    info,
    load_model_from_args,
    save,
    skipped_reported_once,
)

ORDER = 55


#: One line for ``convscope --help``.
HELP = "shape-vs-texture bias on cue-conflict images (Geirhos et al. 2019)"
#: What ``convscope bias --help`` says the command does.
DESCRIPTION = (
    "Shape bias = shape / (shape + texture) 16-way decisions over cue-conflict images whose shape and "
    "texture categories differ; the 16-way decision averages the softmax over each category's ImageNet classes. "
    "Also the 16-way accuracy on shape-only stimuli (silhouettes, edge drawings). With --state FILE the run is saved "
    "as it goes and the same command resumes it; unreadable stimuli are skipped and listed."
)


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = dataset_command(subparsers, parents, "bias", save_every=True, help=HELP, description=DESCRIPTION,
                        func=run_bias, output="write the per-category plot", json_help="machine-readable output (with every image's decision)",
                        state=True, engine=True)
    p.add_argument("--data", default=None, metavar="DIR",
                   help="cue-conflict folder, SHAPE/SHAPEi-TEXTUREj.png (default: the shipped sample in ../shared/data)")
    p.add_argument("--silhouettes", default=None, metavar="DIR", help="silhouettes folder, CATEGORY/*.png")
    p.add_argument("--edges", default=None, metavar="DIR", help="edge drawings folder, CATEGORY/*.png")
    p.add_argument("--no-shape-only", action="store_true",
                   help="do not look for the shipped silhouettes and edges when --silhouettes/--edges are not given")
    p.add_argument("--crop", action="store_true",
                   help="feed stimuli through the model's ImageNet preprocessing (resize, centre crop) instead of the "
                   "published protocol (whole stimulus resized to the input size, no crop)")
    p.add_argument("--categories", default=None, metavar="FILE",
                   help="16-class mapping JSON {category: [ImageNet indices]} (default: imagenet16.json)")


def _shape_only_sets(args: argparse.Namespace) -> list[tuple[str, str]]:
    sets = []
    for kind in ("silhouettes", "edges"):
        folder = getattr(args, kind)
        if folder is None and args.data is None and not args.no_shape_only:
            found = find_stimuli(kind)
            folder = str(found) if found is not None else None
        if folder is not None:
            sets.append((kind, folder))
    return sets


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, spec)


def run_bias(args: argparse.Namespace) -> int:
    """Shape bias on the cue-conflict images, then the shape-only accuracies; print them, draw the plot.

    Exit 130 after a Ctrl-C (the numbers cover the images done; with ``--state`` the same command continues)."""
    check_run_outputs(args)
    engine = engine_kwargs(args)
    model = load_model_from_args(args)
    progress = False if args.no_progress else None
    sets = _shape_only_sets(args)
    state = None
    if args.state is not None:  # one file for every set of the command, each set one stage of it
        state = stimuli_state(args.state, model, data=args.data, shape_only=sets, categories=args.categories,
                              crop=args.crop)
    kw = dict(categories=args.categories, batch_size=args.batch_size, progress=progress, crop=args.crop, state=state,
              save_every=args.save_every, **engine)
    with skipped_reported_once():  # reported below, one line per set
        result = shape_bias(model, args.data, **kw)
        accuracies = []
        if not result.interrupted:
            for kind, folder in sets:
                acc = shape_accuracy(model, folder, kind=kind, **kw)
                accuracies.append(acc)
                if acc.interrupted:
                    break
    if args.json:
        print(json.dumps({"shape_bias": result.to_dict(), "shape_only": [a.to_dict() for a in accuracies]}, indent=2))
    else:
        _print_table(result, accuracies, PUBLISHED_SHAPE_BIAS, PUBLISHED_SHAPE_ACCURACY)
    for r, label in [(result, "cue conflicts")] + [(a, a.kind) for a in accuracies]:
        if r.unreadable:
            info(f"{label}: {skipped_summary(r.unreadable)}")
    if args.output:
        save(result.to_image(accuracies), args.output, "shape-bias plot")
    if args.state:
        info(f"state in {args.state}")
    if result.interrupted or any(a.interrupted for a in accuracies):
        info("interrupted: the numbers cover the images done so far; "
             + ("run the same command again to continue" if args.state else "rerun with --state FILE to be able to resume"))
        return 130
    return 0


def _print_table(result: Any, accuracies: list[Any], bias_refs: dict[str, float], acc_refs: dict[str, dict[str, float]]) -> None:
    done = len(result.decisions)
    print(f"{result.model_name} on {result.root}")
    print(f"stimuli: {result.protocol}")
    print(f"{done} images: {result.conflicts} cue conflicts, {result.excluded} with the same shape and texture category "
          f"(left out)" + (f"; {len(result.unreadable)} unreadable (left out)" if result.unreadable else "")
          + (f"; interrupted after {result.processed} of {result.total}" if result.interrupted else ""))
    refs = ", ".join(f"{k} {v:g}" for k, v in bias_refs.items())
    print(f"shape bias  {_fmt(result.shape_bias)}   (published: {refs})")
    print(f"{'decision':<10} {'images':>6} {'share':>7}")
    for name, count, share in (("shape", result.shape, result.shape_fraction), ("texture", result.texture, result.texture_fraction),
                               ("neither", result.neither, result.neither_fraction)):
        print(f"{name:<10} {count:>6} {_fmt(share, '7.1%'):>7}")
    print()
    print(f"{'shape category':<15} {'shape':>5} {'texture':>7} {'n':>3} {'shape bias':>10}")
    for c in result.per_category:
        print(f"{c.category:<15} {c.shape:>5} {c.texture:>7} {c.n:>3} {_fmt(c.shape_bias):>10}")
    if accuracies:
        print()
        print(f"{'shape only':<12} {'accuracy':>8} {'correct':>9}   published")
        for a in accuracies:
            pub = ", ".join(f"{k} {v:g}" for k, v in acc_refs.get(a.kind, {}).items()) or "-"
            print(f"{a.kind:<12} {_fmt(a.accuracy):>8} {f'{a.correct}/{a.n}':>9}   {pub}")
