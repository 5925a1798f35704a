"""The :class:`Attribution` result: raw tensor as the method defines it, a display map, and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import load_image
from ..models.model import Model
from ..options import check_range
from ..render import colorize, overlay, png_bytes


@dataclass(eq=False)
class Attribution:
    """Result of :func:`convscope.attribute`.

    ``raw``: exactly as the method defines it (gradient family (N, C, H, W) at input size; CAM family
    (N, h, w) at the layer's resolution; occlusion/RISE (N, H, W)). ``map``: (N, H, W) in [0, 1] at
    input size for display. ``target``: (N,) the classes explained. ``forward_passes`` and
    ``backward_passes`` count what the method cost, in network evaluations per image (finding the top
    class costs one forward pass unless the method's own pass on the input gives it); ``extras`` holds method-specific outputs (e.g. the
    integrated-gradients completeness error, the occlusion top-class map).
    """

    method: str
    raw: torch.Tensor
    map: torch.Tensor
    target: torch.Tensor
    layer: str | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    input: torch.Tensor | None = field(default=None, repr=False)
    model: Model | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.map.shape[0]

    def overlay(self, img: Any = None, index: int = 0, *, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
        """The display map blended over the image (the model's view of ``img``; default: the input itself)."""
        return overlay(self.picture(img, index), self.map[index], alpha=alpha, cmap=cmap)

    def picture(self, img: Any = None, index: int = 0) -> Image.Image:
        """The input image as the network saw it (cropped like the map), as a PIL image."""
        if img is not None:
            if self.model is not None:
                return self.model.transform_image(img)
            return load_image(img).resize((self.map.shape[2], self.map.shape[1]))
        if self.input is None:
            raise ValueError("no image given and no input stored in the result")
        if self.model is not None and self.input.shape[1] == 3:
            return self.model.deprocess(self.input[index : index + 1])
        x = self.input[index].detach().float().cpu()
        x = (x - x.min()) / (x.max() - x.min() + 1e-12)
        return load_image(x)

    def heatmap(self, index: int = 0, cmap: str = "jet") -> Image.Image:
        """The display map alone, coloured with ``cmap``."""
        return colorize(self.map[index], cmap)

    def signed(self, index: int = 0, *, clip: float = 0.99) -> Image.Image:
        """The raw pixel attribution (gradient family, (C, H, W)) drawn as an RGB image, grey at zero:
        ``0.5 + 0.5 * raw / s`` with ``s`` the ``clip`` quantile of |raw| (values beyond saturate), so each
        colour channel shows the sign and size of its own attribution (Springenberg et al. 2015, Fig. 3;
        Zeiler & Fergus 2014's projections). Inputs without three channels are averaged to grey."""
        check_range("clip", clip, float, 0.5, 1.0)
        r = self.raw[index].detach().float().cpu()
        if r.dim() != 3:
            raise ValueError(f"a signed picture needs a pixel attribution (C, H, W), got shape {tuple(r.shape)}")
        if r.shape[0] != 3:
            r = r.mean(0, keepdim=True).expand(3, -1, -1)
        flat = r.abs().flatten()
        s = float(torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], clip)) or float(flat.max()) or 1.0
        pixels = (0.5 + 0.5 * (r / s)).clamp(0, 1)
        return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    def mask(self, img: Any = None, index: int = 0, *, threshold: float = 0.5, fill: int = 0) -> Image.Image:
        """The image with only its important region kept: pixels whose map value is below ``threshold``
        (on the [0, 1] display map) are replaced by ``fill`` (the seeds' occlusion mask)."""
        check_range("threshold", threshold, float, 0.0, 1.0)
        picture = np.asarray(self.picture(img, index)).copy()
        keep = self.map[index].detach().cpu().numpy() >= threshold
        if keep.shape != picture.shape[:2]:
            keep = np.asarray(Image.fromarray(keep.astype(np.uint8) * 255).resize(picture.shape[1::-1])) > 127
        picture[~keep] = fill
        return Image.fromarray(picture)

    def _repr_png_(self) -> bytes:
        return png_bytes(self.overlay())


def display_map(raw: torch.Tensor, family: str, size: tuple[int, int]) -> torch.Tensor:
    """Turn a raw attribution into an (N, H, W) map in [0, 1] at input size.

    gradient family: largest absolute value over colour channels, clipped at its 99th percentile; CAM family: ReLU, bilinear upsampling;
    perturbation family: positive part (evidence for the class). Each image is min-max scaled on its own.
    """
    r = raw.detach().float()
    if family == "gradient":
        m = r.abs().amax(dim=1)
        # pixel maps are sparse: saturate the top 1% so the structure is visible (Smilkov et al. 2017)
        flat = m.flatten(1)
        k = max(1, int(0.99 * flat.shape[1]))
        top = flat.kthvalue(k, dim=1).values.view(-1, 1, 1)
        m = torch.minimum(m, top.clamp(min=1e-30))
    elif family == "cam":
        m = F.interpolate(r.clamp(min=0).unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    else:
        m = r.clamp(min=0)
        if m.shape[-2:] != size:
            m = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return minmax(m)


def minmax(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each map of a batch (N, ...) to [0, 1] independently (constant maps become zeros)."""
    flat = m.reshape(m.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp(min=eps), torch.zeros_like(flat))
    return out.reshape(m.shape)
