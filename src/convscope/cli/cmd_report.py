"""The ``report`` command: one self-contained HTML file with every registered report section."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import ConvscopeError
from ..files import check_output_path
from ..images import load_image
from ..options import bounded
from ..render import write_text_atomic
from ..report.build import all_sections, render_report, select_sections
from .common import info, load_model_from_args

ORDER = 50

#: Suffixes ``report -o`` writes.
REPORT_SUFFIXES = (".html", ".htm")


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConvscopeError("expected a comma-separated list, got nothing")
    return items


def run_report(args: argparse.Namespace) -> int:
    """``convscope report [IMAGE] -o FILE.html``: run the sections, write the file atomically, warn per failure."""
    if args.list_sections:
        for s in all_sections():
            print(f"{s.key:<20} {s.title}")
        return 0
    out = args.output
    check_output_path(out, REPORT_SUFFIXES, what="report")  # before any slow work
    keys = _csv(args.sections)
    select_sections(keys)  # unknown names fail before anything slow happens
    img = load_image(args.image)
    model = load_model_from_args(args)
    if args.upconv_net is not None and not os.path.isfile(args.upconv_net):
        raise ConvscopeError(f"{args.upconv_net}: no such decoder file (train one with convscope upconv-train)")
    options: dict[str, Any] = {"top": args.top}
    if args.upconv_net is not None:
        options["upconv_net"] = args.upconv_net
    if args.layers:
        layers = _csv(args.layers)
        for layer in layers or []:
            model.layer(layer)  # unknown layer: one clear error now, not a broken section later
        options["layers"] = layers
    report = render_report(model, img, image_name=args.image, options=options, sections=keys,
                           progress=not args.no_progress)
    for failed in report.failures:
        info(f"convscope: warning: report section {failed.key!r} failed: {failed.error}")
    try:
        write_text_atomic(report.html, out)
    except OSError as exc:
        raise ConvscopeError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    ok = len(report.sections) - len(report.failures)
    info(f"report written to {os.path.abspath(out)} ({ok} of {len(report.sections)} sections, {report.seconds:.1f} s)")
    return 0


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the report parser."""
    p = subparsers.add_parser(
        "report", parents=parents, help="self-contained HTML report for an image (prediction, filters, feature maps, ...)",
        description="Write one HTML file (pictures embedded, no network needed) with every report section for IMAGE.",
    )
    p.add_argument("image", nargs="?", default="sample:chelsea", metavar="IMAGE", help="image file or sample:NAME (default sample:chelsea)")
    p.add_argument("-o", "--output", default="convscope-report.html", metavar="FILE.html",
                   help="output file, .html or .htm (default convscope-report.html)")
    p.add_argument("--sections", default=None, metavar="A,B", help="only these sections (see --list-sections)")
    p.add_argument("--list-sections", action="store_true", help="list the available sections and exit")
    p.add_argument("--top", type=bounded(int, 1, 1000, name="--top"), default=5, metavar="K",
                   help="classes in the prediction table, 1..1000 (default 5)")
    p.add_argument("--layers", default=None, metavar="L1,L2", help="layers for the feature-map section (default: early, middle, last)")
    p.add_argument("--upconv-net", default=None, metavar="NET.pt",
                   help="a decoder from `convscope upconv-train`: the synthesis section adds its reconstruction of "
                        "IMAGE and the predicted class rendered through it (DGN-AM)")
    p.add_argument("--no-progress", action="store_true", help="draw no progress bars")
    p.set_defaults(func=run_report)
