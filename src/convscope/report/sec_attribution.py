"""Report section: why the network decides, Grad-CAM, guided Grad-CAM, saliency, integrated gradients and
occlusion side by side, each scored by its deletion and insertion AUC (Petsiuk et al. 2018)."""

from __future__ import annotations

import html
import time
from typing import Any

from .build import figure_html, table_html
from .sections import ReportContext, section

#: Methods shown, in order, with the settings used in the report (kept cheap: one image, CPU-friendly).
REPORT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("gradcam", {}),
    ("guided_gradcam", {}),
    ("saliency", {}),
    ("integrated_gradients", {"steps": 32, "baseline": "black"}),
    ("occlusion", {"window": 16, "stride": 8}),
]


@section("Attribution: why this class", order=30)
def attribution(ctx: ReportContext) -> str:
    """Maps of the top class by five methods over the image, with deletion (lower is better) and insertion
    (higher is better) AUCs of the target's probability; ``options["attribution_steps"]`` (default 25)
    sets the number of steps of those curves. Methods absent from the registry are skipped."""
    from ..attribution import attribute, method_names
    from ..render import grid

    available = set(method_names())
    try:
        from ..attribution.metrics import deletion, insertion
    except ImportError:  # metrics not built yet
        deletion = insertion = None
    steps = int(ctx.options.get("attribution_steps", 25))
    pictures, labels, rows, skipped = [], [], [], []
    target = None
    for name, options in REPORT_METHODS:
        if name not in available:
            skipped.append(name)
            continue
        start = time.perf_counter()
        a = attribute(ctx.model, ctx.x, name, target=target, **options)
        seconds = time.perf_counter() - start
        target = int(a.target[0])
        family = _family(name)
        pictures.append(a.heatmap(cmap="inferno") if family == "gradient" else a.overlay(ctx.image))
        labels.append(name)
        del_auc = ins_auc = "–"
        if deletion is not None:
            del_auc = f"{float(deletion(ctx.model, ctx.x, a, steps=steps).auc[0]):.3f}"
            ins_auc = f"{float(insertion(ctx.model, ctx.x, a, steps=steps).auc[0]):.3f}"
        note = ""
        if "completeness_error" in a.extras:
            note = f"completeness error {float(a.extras['completeness_error'][0]):.1%}"
        setting = ", ".join(f"{k}={v}" for k, v in options.items())
        rows.append([name, a.layer or "input", setting, f"{a.forward_passes} + {a.backward_passes}", f"{seconds:.2f}", del_auc, ins_auc, note])
    if not pictures:
        return "<p>No attribution method is available.</p>"
    label = ctx.model.label(target) if hasattr(ctx.model, "label") else str(target)
    figure = figure_html(
        grid(pictures, labels=labels, columns=len(pictures), cell=200),
        f"Evidence for <b>{html.escape(label)}</b> ({target}). Pixel methods (saliency, guided Grad-CAM, "
        "integrated gradients) as heatmaps of max |attribution| over colour channels; region methods over the image.",
        alt="attribution maps",
    )
    table = table_html(
        ["Method", "Layer", "Settings", "Passes (fwd + bwd)", "Seconds", "Deletion AUC", "Insertion AUC", "Note"],
        rows,
        numeric=(4, 5, 6),
    )
    lead = (
        '<p class="lead">Where the evidence for the predicted class lies. Deletion removes the most important '
        "pixels first (a good map makes the probability fall fast: low AUC); insertion adds them to a blank "
        "image (high AUC is good).</p>"
    )
    tail = f"<p>Not available in this build: {html.escape(', '.join(skipped))}.</p>" if skipped else ""
    return lead + figure + table + tail


def _family(name: str) -> str:
    from ..attribution import get_method

    return get_method(name).family
