"""Report section: why the network decides, Grad-CAM, guided Grad-CAM, saliency, integrated gradients and
occlusion side by side, each scored by its deletion and insertion AUC (Petsiuk et al. 2018)."""

from __future__ import annotations

import html
import time
import warnings

from ..attribution import CompletenessWarning, attribute, get_method
from ..attribution.metrics import deletion, insertion
from ..render import grid
from .build import figure_html, table_html
from .sections import ReportContext, section

#: Methods shown, in order; each runs with its registered preview settings (``MethodSpec.preview``).
REPORT_METHODS: tuple[str, ...] = ("gradcam", "guided_gradcam", "saliency", "guided_backprop", "integrated_gradients",
                                   "occlusion")


@section("Attribution: why this class", order=30)
def attribution(ctx: ReportContext) -> str:
    """Maps of the top class by six methods over the image, with deletion (lower is better) and insertion
    (higher is better) AUCs of the target's probability; ``options["attribution_steps"]`` (default 25)
    sets the number of steps of those curves."""
    steps = int(ctx.options.get("attribution_steps", 25))
    pictures, labels, rows = [], [], []
    target = None
    for name in REPORT_METHODS:
        spec = get_method(name)
        start = time.perf_counter()
        with warnings.catch_warnings():  # a step cap reached is said in the table's note
            warnings.simplefilter("ignore", CompletenessWarning)
            a = attribute(ctx.model, ctx.x, name, target=target, progress=ctx.progress, **spec.preview)
        seconds = time.perf_counter() - start
        target = int(a.target[0])
        pictures.append(spec.draw(a, ctx.image))
        labels.append(name)
        del_auc = float(deletion(ctx.model, ctx.x, a, steps=steps, progress=ctx.progress).auc[0])
        ins_auc = float(insertion(ctx.model, ctx.x, a, steps=steps, progress=ctx.progress).auc[0])
        note = ""
        if "completeness_error" in a.extras:
            note = f"completeness error {float(a.extras['completeness_error'][0]):.1%}"
            if "steps" in a.extras:
                note += f" at {int(a.extras['steps'][0])} steps"
            if "converged" in a.extras and not bool(a.extras["converged"][0]):
                note += f" (step cap reached, above the {a.extras['tolerance']:.0%} tolerance)"
        setting = ", ".join(f"{k}={v}" for k, v in spec.preview.items()) or "defaults"
        rows.append([name, a.layer or "input", setting, f"{a.forward_passes} + {a.backward_passes}", f"{seconds:.2f}",
                     f"{del_auc:.3f}", f"{ins_auc:.3f}", note])
    label = ctx.model.label(target)
    figure = figure_html(
        grid(pictures, labels=labels, columns=len(pictures), cell=200),
        f"Evidence for <b>{html.escape(label)}</b> ({target}). Pixel methods (saliency, guided Grad-CAM, "
        "integrated gradients) as heatmaps of max |attribution| over colour channels; guided backprop as "
        "Springenberg et al. draw it, signed RGB with grey = 0; region methods over the image.",
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
    return lead + figure + table
