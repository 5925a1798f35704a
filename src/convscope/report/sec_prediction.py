"""Report section: the picture the network sees and its top predictions."""

from __future__ import annotations

import html

from .build import figure_html
from .sections import ReportContext, section


@section("Prediction", order=10)
def prediction(ctx: ReportContext) -> str:
    """The input as the network sees it (resized, centre-cropped) and the top-k classes (``options["top"]``, 5)."""
    model = ctx.model
    top = int(ctx.options.get("top", 5))
    pred = model.predict(ctx.x, top=top)[0]
    ctx.cache["prediction"] = pred
    h, w = model.input_size
    picture = figure_html(
        ctx.image,
        f"The network's view of <b>{html.escape(ctx.image_name)}</b>: shorter side resized to {model.resize_size} px"
        f" ({html.escape(model.interpolation)}), centre crop {w}x{h}.",
        alt=ctx.image_name,
        width=w,
    )
    rows = []
    best = max(pred.probabilities) or 1.0
    for rank, (idx, label, p) in enumerate(pred, start=1):
        bar = f'<span class="bar" style="width:{max(1.0, 160 * p / best):.0f}px"></span>'
        rows.append(
            f"<tr><td class=num>{rank}</td><td>{html.escape(label)}</td><td class=num>{idx}</td>"
            f"<td class=num>{p:.2%}</td><td>{bar}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>#</th><th>Class</th><th>Index</th><th>Probability</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    lead = (
        f'<p class="lead">Top-{len(pred.indices)} classes by softmax probability; the network answers '
        f"<b>{html.escape(pred.labels[0])}</b> with {pred.probabilities[0]:.1%}.</p>"
    )
    return f'{lead}<div class="row">{picture}<div>{table}</div></div>'
