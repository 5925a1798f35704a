"""Pictures from tensors: colour maps, heat-map overlays, labelled grids, PNG bytes and data URIs.

Everything here takes plain tensors/arrays/PIL images and returns PIL images or bytes; nothing here
runs a model. Figures (matplotlib) live in :mod:`convscope.render.figures`.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_write, write_text


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def normalize(x: Any, *, symmetric: bool = False, eps: float = 1e-12) -> np.ndarray:
    """Scale to [0, 1]: min-max, or ``symmetric`` (0 maps to 0.5, the largest magnitude to 0 or 1)."""
    a = to_numpy(x).astype(np.float64)
    if symmetric:
        m = np.abs(a).max(initial=0.0)
        return (a / (2 * m) + 0.5) if m > eps else np.full_like(a, 0.5)
    lo, hi = a.min(initial=0.0), a.max(initial=0.0)
    return (a - lo) / (hi - lo) if hi - lo > eps else np.zeros_like(a)


def colorize(values: Any, cmap: str = "jet", *, normalized: bool = True) -> Image.Image:
    """A 2-D map -> RGB image through a matplotlib colour map (``normalized``: values already in [0, 1])."""
    # heavy (matplotlib): loaded on the first coloured picture, not at CLI start
    from matplotlib import colormaps

    a = to_numpy(values)
    if a.ndim != 2:
        raise ValueError(f"colorize needs a 2-D map, got shape {a.shape}")
    a = np.clip(a, 0, 1) if normalized else normalize(a)
    rgb = colormaps[cmap](a)[..., :3]
    return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))


def overlay(image: Image.Image, heatmap: Any, *, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend a heat map in [0, 1] (any resolution, resized bilinearly) over ``image``.

    Transparency follows the map's value, so unimportant regions show the photo almost unchanged.
    """
    image = image.convert("RGB")
    a = np.clip(to_numpy(heatmap).astype(np.float32), 0, 1)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    heat = Image.fromarray((a * 255 + 0.5).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    a = np.asarray(heat, dtype=np.float32) / 255.0
    colour = np.asarray(colorize(a, cmap), dtype=np.float32)
    weight = (alpha * (0.25 + 0.75 * a))[..., None]
    out = np.asarray(image, dtype=np.float32) * (1 - weight) + colour * weight
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels (the one typeface of every picture convscope draws)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def grid(
    images: Sequence[Image.Image],
    *,
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    cell: int | None = None,
    pad: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
    title: str | None = None,
) -> Image.Image:
    """Tile images into a labelled grid (labels under each tile, an optional title on top).

    ``cell``: resize every tile to that many pixels on its longer side (nearest neighbour for tiles
    smaller than the cell, so small filters and feature maps stay crisp).
    """
    if not images:
        raise ValueError("grid needs at least one image")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    tiles = []
    for img in images:
        img = img.convert("RGB")
        if cell:
            scale = cell / max(img.size)
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
            img = img.resize(size, resample)
        tiles.append(img)
    tw = max(t.size[0] for t in tiles)
    th = max(t.size[1] for t in tiles)
    face = font(max(10, min(14, tw // 8)))
    label_h = (face.size + 4) if labels else 0  # type: ignore[attr-defined]
    title_h = 22 if title else 0
    width = columns * (tw + pad) + pad
    height = title_h + rows * (th + label_h + pad) + pad
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill=(0, 0, 0), font=font(15))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        x = pad + c * (tw + pad)
        y = title_h + pad + r * (th + label_h + pad)
        canvas.paste(tile, (x + (tw - tile.size[0]) // 2, y + (th - tile.size[1]) // 2))
        if labels and i < len(labels):
            text = _fit(draw, str(labels[i]), face, tw)
            draw.text((x, y + th + 2), text, fill=(0, 0, 0), font=face)
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "…", font=face) > width:
        text = text[:-1]
    return text + "…"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_uri(image: Image.Image) -> str:
    """``data:image/png;base64,...`` for embedding in HTML without any external file."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def save_image(image: Image.Image, path: str) -> str:
    """Write ``image`` atomically (temporary name, then rename); the format follows the suffix."""
    atomic_write(path, image.save, suffix=os.path.splitext(path)[1] or ".png")
    return path


def write_text_atomic(text: str, path: str) -> str:
    """Write a text file atomically (temporary name in the same folder, then rename)."""
    write_text(text, path)
    return path


def matrix_grid(
    tiles: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell: int = 24,
    pad: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
    title: str | None = None,
) -> Image.Image:
    """Tile a 2-D table of images (``tiles[row][column]``) with row labels on the left, column labels on top.

    Every tile is resized to ``cell`` x ``cell`` pixels (nearest neighbour when enlarging, so small
    kernels stay crisp). Layout in pixels: width = ``left + columns * (cell + pad) + pad``, height =
    ``top + rows * (cell + pad) + pad``, where ``left`` is the widest row label plus 6 (0 without
    labels) and ``top`` is the title band (22) plus the column-label band (font size + 4, 0 without
    labels). Column labels that would overlap are thinned to every k-th one.
    """
    if not tiles or not tiles[0]:
        raise ValueError("matrix_grid needs at least one tile")
    rows, columns = len(tiles), max(len(r) for r in tiles)
    face = font(10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = (int(max(probe.textlength(str(t), font=face) for t in row_labels)) + 6) if row_labels else 0
    col_h = (face.size + 4) if column_labels else 0  # type: ignore[attr-defined]
    title_h = 22 if title else 0
    top = title_h + col_h
    width = left + columns * (cell + pad) + pad
    height = top + rows * (cell + pad) + pad
    if title:
        width = max(width, int(probe.textlength(title, font=font(15))) + 2 * pad + 4)
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad + 2, 4), title, fill=(0, 0, 0), font=font(15))
    if column_labels:
        widest = max(probe.textlength(str(t), font=face) for t in column_labels)
        every = max(1, math.ceil((widest + 4) / (cell + pad)))
        for j, text in enumerate(column_labels):
            if j % every == 0:
                draw.text((left + pad + j * (cell + pad), title_h + 1), str(text), fill=(60, 60, 60), font=face)
    for i, row in enumerate(tiles):
        y = top + pad + i * (cell + pad)
        if row_labels and i < len(row_labels):
            draw.text((2, y + max(0, (cell - face.size) // 2)), str(row_labels[i]), fill=(60, 60, 60), font=face)  # type: ignore[attr-defined]
        for j, tile in enumerate(row):
            tile = tile.convert("RGB")
            if tile.size != (cell, cell):
                resample = Image.Resampling.NEAREST if cell >= max(tile.size) else Image.Resampling.LANCZOS
                tile = tile.resize((cell, cell), resample)
            canvas.paste(tile, (left + pad + j * (cell + pad), y))
    return canvas


def figure_to_image(figure: Any, *, dpi: int | None = None) -> Image.Image:
    """Render a matplotlib ``Figure`` with the Agg backend (no pyplot, no global state) -> RGB PIL image."""
    # heavy (matplotlib): only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    if dpi is not None:
        figure.set_dpi(dpi)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())


def titled(image: Image.Image, title: str, *, size: int = 15, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` under a one-line title band (22 px high); the canvas widens when the title is longer."""
    face = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(image.size[0], int(probe.textlength(title, font=face)) + 8)
    canvas = Image.new("RGB", (width, image.size[1] + 22), background)
    ImageDraw.Draw(canvas).text((4, 4), title, fill=(0, 0, 0), font=face)
    canvas.paste(image.convert("RGB"), (0, 22))
    return canvas
