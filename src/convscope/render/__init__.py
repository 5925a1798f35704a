"""Rendering: colour maps, overlays, grids, figures and the HTML report. Nothing here runs a model."""

from .core import (
    colorize,
    data_uri,
    figure_to_image,
    font,
    grid,
    matrix_grid,
    normalize,
    overlay,
    png_bytes,
    save_image,
    titled,
    to_numpy,
    write_text_atomic,
)

__all__ = [
    "colorize",
    "data_uri",
    "figure_to_image",
    "font",
    "grid",
    "matrix_grid",
    "normalize",
    "overlay",
    "png_bytes",
    "save_image",
    "titled",
    "to_numpy",
    "write_text_atomic",
]
