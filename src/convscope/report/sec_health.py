"""Report section: dead and aliased filters over every convolution (``inspect.filter_health``)."""

from __future__ import annotations

import html

from ..inspect import filter_health
from .build import figure_html
from .sections import ReportContext, section


@section("Filter health", order=45)
def health(ctx: ReportContext) -> str:
    """Per convolution: dead filters (near-zero weights) and, in strided layers, aliased ones (mostly
    high-frequency energy), with the flagged filters drawn."""
    h = filter_health(ctx.model)
    rows = [r for r in h.rows() if r["dead"] or r["aliased"]]
    lead = (
        f'<p class="lead">Across the {len(h.layers)} convolutions, <b>{h.dead}</b> filters are dead (weights at most '
        f"1/1000 of their layer's median norm: they respond to nothing) and <b>{h.aliased}</b> are aliased: in a "
        "layer with stride above 1, more than 75% of their spectral energy lies above half the Nyquist frequency, "
        "which the stride folds back onto coarser patterns (Zeiler &amp; Fergus, fig. 6).</p>"
    )
    if not rows:
        return lead + "<p>No convolution has a dead or aliased filter.</p>"
    shown = rows[:12]
    body = "".join(
        f"<tr><td><code>{html.escape(r['layer'])}</code></td><td>{html.escape(r['kernel'])} / "
        f"{html.escape(r['stride'])}</td><td>{r['filters']}</td><td>{r['dead']}</td><td>{r['aliased']}</td>"
        f"<td>{_score(r['mean_aliasing'])}</td></tr>"
        for r in shown
    )
    more = f"<p>{len(rows) - len(shown)} more layers have flagged filters (<code>convscope diagnose</code> lists all).</p>" if len(rows) > len(shown) else ""
    table = (
        "<table><thead><tr><th>Layer</th><th>Kernel / stride</th><th>Filters</th><th>Dead</th><th>Aliased</th>"
        f"<th>Mean aliasing score</th></tr></thead><tbody>{body}</tbody></table>{more}"
    )
    picture = figure_html(h.image, "Flagged filters of the first layers that have any, each labelled 'dead' or with its "
                          "aliasing score.", alt="flagged filters")
    return lead + table + picture


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
