"""Report section: feature maps of a few layers at increasing depth."""

from __future__ import annotations

import html

from ..inspect import feature_maps, stage_layers
from .build import figure_html
from .sections import ReportContext, section


@section("Feature maps", order=50)
def features(ctx: ReportContext) -> str:
    """The most active channels of an early, a middle and the last spatial layer (``options["layers"]``)."""
    layers = ctx.options.get("layers") or stage_layers(ctx.model, 3)
    count = int(ctx.options.get("max_channels", 24))
    parts = [
        '<p class="lead">What a few layers compute for this image, from early to late. Each tile is one channel\'s'
        " activation map (bright = strong), labelled with its channel number; the most active channels are shown"
        " first. Early layers respond to edges and colours at full detail; late ones to object parts, coarsely.</p>"
    ]
    for layer in layers:
        fm = feature_maps(ctx.model, ctx.x, layer, max_channels=count, sort="mean")
        c, h, w = fm.shape
        rf = next((r.receptive_field for r in ctx.model.layers() if r.name == layer), None)
        seen = f"; each unit sees {rf.size[0]}x{rf.size[1]} input pixels" if rf is not None and rf.size else ""
        ctx.cache.setdefault("feature_maps", {})[layer] = fm
        parts.append(f"<h3><code>{html.escape(layer)}</code> &middot; {c} channels of {h}x{w}</h3>")
        parts.append(
            figure_html(
                fm.to_image(title=False, columns=8),
                f"The {min(count, c)} channels of <code>{html.escape(layer)}</code> with the highest mean activation,"
                f" each scaled to its own range{seen}.",
                alt=f"feature maps of {layer}",
            )
        )
    return "".join(parts)
