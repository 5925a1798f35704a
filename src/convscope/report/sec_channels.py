"""Report section: mean activation of every channel of the last spatial layer, and where the top ones fire."""

from __future__ import annotations

import html

from ..inspect import channel_means, feature_maps
from ..models import default_layer
from ..render import grid, normalize, overlay
from .build import figure_html, table_html
from .sections import ReportContext, section


@section("Channel responses", order=60)
def channels(ctx: ReportContext) -> str:
    """The channel-mean plot of ``options["channel_layer"]`` (default: the last spatial layer) and top-k overlays."""
    layer = ctx.options.get("channel_layer") or default_layer(ctx.model, "cam")
    k = int(ctx.options.get("top_channels", 6))
    resp = channel_means(ctx.model, ctx.x, layer)
    ctx.cache["channel_means"] = resp
    top = resp.top(k)
    n, c = resp.means.shape
    zero = int(resp.zero[0])
    plot = figure_html(
        resp.to_image(top=k),
        f"Mean activation of each of the {c} channels of <code>{html.escape(layer)}</code> for this image; the"
        f" {k} strongest are labelled. {zero} channels are exactly zero everywhere: most units stay silent and a"
        " few spike, which is what makes single channels interpretable.",
        alt=f"channel means of {layer}",
    )
    fm = ctx.cache.get("feature_maps", {}).get(layer)  # the feature-map section may have computed it
    if fm is None:
        fm = feature_maps(ctx.model, ctx.x, layer, channels=[i for i, _ in top])
    tiles = [overlay(ctx.image, normalize(fm.activations[i]), alpha=0.6) for i, _ in top]
    overlays = grid(tiles, labels=[f"channel {i}: {v:.3g}" for i, v in top], cell=160, columns=min(len(tiles), 6))
    table = table_html(
        ["Rank", "Channel", "Mean activation", "Peak activation"],
        [(r + 1, i, f"{v:.4g}", f"{float(fm.activations[i].max()):.4g}") for r, (i, v) in enumerate(top)],
        numeric=(0, 1, 2, 3),
    )
    return (
        '<p class="lead">Which units of the last spatial layer this image drives hardest. The classifier only sees'
        " these channel means (after global pooling), so the spikes are the evidence behind the prediction.</p>"
        + plot
        + '<div class="row">'
        + table
        + figure_html(
            overlays,
            "Where the top channels fire: each channel's map, scaled to its own range and upsampled to the"
            " input, over the image (red = strongest).",
            alt="top channel overlays",
        )
        + "</div>"
    )
