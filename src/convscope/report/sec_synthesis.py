"""Report section: what the network's units want to see (channel gallery, class image, inversions by depth).

Kept within a few seconds: options ``synthesis_steps`` (gallery steps, default 48; the class image takes
twice as many, the inversions three times), ``synthesis_size`` (gallery side, default 80 px; the class
image and the inversions are at least 96 px), ``synthesis_layer`` (gallery
layer; default a middle layer) and ``synthesis_channels`` (default 8, the channels most active on the
report image). The settings are the library's defaults at a smaller size: Fourier parameterisation,
decorrelated colour, transforms (the wide set for the class image), and feature inversion with the
feature-norm-normalised loss, alpha-norm, total variation and jitter. With option ``upconv_net`` (a decoder
written by ``convscope upconv-train``; CLI ``report --upconv-net NET.pt``) the section adds the image
reconstructed by that decoder (Dosovitskiy & Brox 2016) and the predicted class rendered through it (DGN-AM,
Nguyen et al. 2016).
"""

from __future__ import annotations

import html

import torch
import torch.nn.functional as F

from ..probe import Capture
from ..render import grid
from ..synthesis import invert_layers, render_channels, visualize
from ..synthesis.dream import default_dream_layer
from ..synthesis.style import default_layers
from ..synthesis.upconv import dgn_am, invert_upconv, load_upconv
from .build import figure_html
from .sections import ReportContext, section


@section("Synthesis: what units respond to", order=80)
def synthesis(ctx: ReportContext) -> str:
    """A batched channel gallery, an image of the predicted class, and reconstructions from three depths."""
    steps = int(ctx.options.get("synthesis_steps", 48))
    size = int(ctx.options.get("synthesis_size", 80))
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
        f"{len(channels)} channels in one batch, {gallery.seconds:.1f} s; <code>convscope visualize</code> renders "
        "at 224 px in 256 steps).</p>",
        '<div class="row">',
        figure_html(grid(gallery.images, labels=[f"{name}:{c}" for c in channels], columns=4, cell=max(size, 96)),
                    f"The {len(channels)} channels of <code>{html.escape(name)}</code> most active on this image, "
                    "each rendered to excite its channel.", alt="channel gallery"),
    ]
    top = int(ctx.model.logits(x).argmax(1)[0])
    cls = visualize(ctx.model, f"logit:{top}", steps=steps * 2, size=max(size, 96), progress=ctx.progress)  # wide transforms
    parts.append(figure_html(cls.image.resize((192, 192)),
                             f"An image that maximises the logit of the predicted class <b>{html.escape(ctx.model.label(top))}</b>"
                             f" ({top}), with the wide transforms (zoom 0.6-1.4, rotation +-15 degrees) that keep it from "
                             "becoming texture.", alt="class image"))
    parts.append("</div>")
    style_layers, _ = default_layers(ctx.model)
    depths = [style_layers[i] for i in sorted({1, len(style_layers) // 2 + 1, len(style_layers) - 1}) if i < len(style_layers)]
    side = max(size, 96)
    small = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    invs = invert_layers(ctx.model, small, depths, steps=3 * steps, progress=ctx.progress)
    original = ctx.image.resize((side, side))
    caption = ", ".join(f"{html.escape(i.layer)}: pixel RMSE {i.pixel_error:.3f}" for i in invs)
    parts.append(figure_html(grid([original] + [i.image for i in invs], labels=["image"] + [i.layer for i in invs],
                                  columns=len(invs) + 1, cell=side),
                             "Feature inversion (Mahendran &amp; Vedaldi): images whose features at each depth match this "
                             "image's (decorrelated Fourier image, jitter, alpha-norm and total variation); deeper layers "
                             f"keep the layout but less of the detail ({caption}).", alt="inversions"))
    parts.append(_upconv_row(ctx, top, steps))
    return "\n".join(parts)


def _upconv_row(ctx: ReportContext, top: int, steps: int) -> str:
    """The trained decoder's reconstruction and the predicted class through it (DGN-AM), or how to get them."""
    path = ctx.options.get("upconv_net")
    if not path:
        return ('<p class="note">Inversion by a trained up-convolutional network and DGN-AM class images: train a '
                "decoder with <code>convscope upconv-train IMAGES --layer L -o net.pt</code>, then "
                "<code>convscope report --upconv-net net.pt</code> adds them here.</p>")
    net = load_upconv(path, ctx.model.device)
    inv = invert_upconv(ctx.model, ctx.image, net)
    gen = dgn_am(ctx.model, f"logit:{top}", net, steps=max(30, 2 * steps), progress=ctx.progress)
    side = max(96, inv.image.size[0])
    pictures = [ctx.image.resize((side, side)), inv.image.resize((side, side)), gen.image.resize((side, side))]
    return figure_html(grid(pictures, labels=["image", f"decoded from {net.layer}", f"DGN-AM {ctx.model.label(top)}"],
                            columns=3, cell=side),
                       f"A decoder trained to invert <code>{html.escape(net.layer)}</code> (Dosovitskiy &amp; Brox): "
                       f"one forward pass reconstructs this image (pixel MSE {inv.extras['mse']:.4f}); through the same "
                       f"decoder, a code optimised so the image maximises the logit of <b>{html.escape(ctx.model.label(top))}"
                       f"</b> (DGN-AM, Nguyen et al.; logit {gen.objective:.3g}).", alt="upconv and DGN-AM")
