"""Report section: first-layer filters (RGB), filter norms, and the next convolution's kernels."""

from __future__ import annotations

import html

from ..inspect import conv_layers, filters
from ..render import figure_to_image
from ..render.figures import channel_response_figure
from .build import figure_html
from .sections import ReportContext, section


@section("First-layer filters", order=40)
def first_filters(ctx: ReportContext) -> str:
    """Kernels of the first convolution as pictures, their L2 norms (dead filters), and the second convolution."""
    first = filters(ctx.model)
    kh, kw = first.kernel_size
    dead = len(first.dead)
    dead_text = (
        f"<b>{dead}</b> of {first.out_channels} filters are dead (all zero, or a norm at most "
        f"{first.dead_fraction:g} x the layer's median): they respond to nothing, as Zeiler &amp; Fergus"
        " observed in AlexNet's first layer."
        if dead
        else f"No filter is dead (all norms above {first.dead_fraction:g} x the layer's median)."
    )
    kind = "an RGB patch" if first.kind == "rgb" else "a grey patch per input channel"
    parts = [
        f'<p class="lead">The first layer <code>{html.escape(first.layer)}</code> has {first.out_channels} filters of '
        f"{kh}x{kw} pixels with stride {first.stride[0]}; they are what the network looks for in raw pixels.</p>",
        '<div class="row">',
        figure_html(
            first.to_image(cell=40),
            f"Each filter drawn as {kind}, scaled symmetrically: mid-grey is a zero weight, bright colours are"
            " positive weights for that colour, dark ones negative.",
            alt=f"filters of {first.layer}",
        ),
        figure_html(
            figure_to_image(
                channel_response_figure(
                    first.norms,
                    top=5,
                    title=f"L2 norm of each filter of {first.layer}",
                    xlabel="filter",
                    ylabel="L2 norm",
                    size=(6.0, 2.8),
                    marks=first.dead,
                    marks_label="near-zero (dead)",
                )
            ),
            dead_text,
            alt="filter norms",
        ),
        "</div>",
    ]
    convs = conv_layers(ctx.model)
    if len(convs) > 1:
        second = filters(ctx.model, convs[1], max_filters=int(ctx.options.get("max_filters", 32)), max_channels=16)
        how = (
            "one grey tile per filter, since each filter of this depthwise convolution reads a single channel"
            if second.kind == "depthwise"
            else "one row per filter and one column per input channel it reads"
        )
        parts.append(
            figure_html(
                second.image,
                f"The next convolution, <code>{html.escape(second.layer)}</code> ({second.out_channels} filters of "
                f"{second.kernel_size[0]}x{second.kernel_size[1]}), drawn with {how}; grey is zero.",
                alt=f"filters of {second.layer}",
            )
        )
    return "".join(parts)
