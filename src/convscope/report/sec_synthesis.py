"""Report section: what the network's units want to see (channel gallery, class image, inversions by depth).

Kept small so the report stays fast: options ``synthesis_steps`` (default 24), ``synthesis_size``
(default 64 px), ``synthesis_layer`` (gallery layer; default a middle layer) and ``synthesis_channels``
(default 8, the channels most active on the report image).
"""

from __future__ import annotations

import html

import torch

from ..probe import Capture
from ..render import grid
from ..synthesis import invert_layers, render_channels, visualize
from ..synthesis.dream import default_dream_layer
from ..synthesis.style import default_layers
from .build import figure_html
from .sections import ReportContext, section


@section("Synthesis: what units respond to", order=80)
def synthesis(ctx: ReportContext) -> str:
    """A batched channel gallery, an image of the predicted class, and reconstructions from three depths."""
    steps = int(ctx.options.get("synthesis_steps", 24))
    size = int(ctx.options.get("synthesis_size", 64))
    count = int(ctx.options.get("synthesis_channels", 8))
    name = ctx.options.get("synthesis_layer") or default_dream_layer(ctx.model)
    x = ctx.x
    with torch.no_grad(), Capture(ctx.model, [name], stop=True) as cap:
        cap.forward(x)
        act = cap.activations[name]
    means = act.flatten(2).mean(2)[0] if act.ndim == 4 else act[0]
    channels = means.topk(min(count, means.numel())).indices.tolist()
    gallery = render_channels(ctx.model, name, channels, steps=steps, size=size, progress=ctx.progress)
    parts = [
        f'<p class="lead">Images optimised so that one unit responds strongly (feature visualisation: Fourier '
        f"parameterisation, decorrelated colour, jitter/scale/rotation; {steps} steps at {size} px, all "
        f"{len(channels)} channels in one batch, {gallery.seconds:.1f} s).</p>",
        '<div class="row">',
        figure_html(grid(gallery.images, labels=[f"{name}:{c}" for c in channels], columns=4, cell=max(size, 96)),
                    f"The {len(channels)} channels of <code>{html.escape(name)}</code> most active on this image, "
                    "each rendered to excite its channel.", alt="channel gallery"),
    ]
    top = int(ctx.model.logits(x).argmax(1)[0])
    cls = visualize(ctx.model, f"logit:{top}", steps=steps * 2, size=max(size, 96), progress=ctx.progress)
    parts.append(figure_html(cls.image.resize((192, 192)),
                             f"An image that maximises the logit of the predicted class <b>{html.escape(ctx.model.label(top))}</b>"
                             f" ({top}).", alt="class image"))
    parts.append("</div>")
    style_layers, _ = default_layers(ctx.model)
    depths = [style_layers[i] for i in sorted({1, len(style_layers) // 2 + 1, len(style_layers) - 1}) if i < len(style_layers)]
    invs = invert_layers(ctx.model, x, depths, steps=2 * steps, size=size, progress=ctx.progress)
    original = ctx.image.resize((size, size))
    caption = ", ".join(f"{html.escape(i.layer)}: pixel RMSE {i.pixel_error:.3f}" for i in invs)
    parts.append(figure_html(grid([original] + [i.image for i in invs], labels=["image"] + [i.layer for i in invs],
                                  columns=len(invs) + 1, cell=max(size, 96)),
                             "Feature inversion (Mahendran &amp; Vedaldi): images whose features at each depth match this "
                             f"image's; deeper layers keep less of the picture ({caption}).", alt="inversions"))
    return "\n".join(parts)
