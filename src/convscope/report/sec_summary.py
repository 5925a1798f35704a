"""Report section: the model's layer table with parameter totals."""

from __future__ import annotations

import html

from ..inspect import summary
from .sections import ReportContext, section


@section("Model summary", order=20)
def model_summary(ctx: ReportContext) -> str:
    """Totals, the top-level layers, and the full layer table in a collapsible block."""
    full = summary(ctx.model)
    compact = summary(ctx.model, depth=2)
    if len(compact.rows) > 40:
        compact = summary(ctx.model, depth=1)
    totals = "".join(f"<li>{html.escape(t)}</li>" for t in full.footer())
    lead = (
        f'<p class="lead">{len(full.all_rows)} named layers. Output shapes come from one forward pass; the receptive'
        " field says how many input pixels one unit of the layer can see and, after the slash, how many pixels apart"
        " neighbouring units are.</p>"
    )
    return (
        f'{lead}<ul class="totals">{totals}</ul>'
        f"<h3>Main blocks (depth &le; {compact.depth})</h3>{compact.to_html(totals=False)}"
        f"<details><summary>All {len(full.rows)} layers</summary>{full.to_html(totals=False)}</details>"
    )
