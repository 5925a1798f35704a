"""Rendering helpers added for the inspection views: matrix grids, titles, Agg figures."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from convscope.render import figure_to_image, matrix_grid, titled
from convscope.render.figures import channel_response_figure


def solid(value: int, size: int = 3) -> Image.Image:
    return Image.new("L", (size, size), value)


def test_matrix_grid_places_tiles_by_row_and_column():
    tiles = [[solid(0), solid(50), solid(100)], [solid(150), solid(200), solid(250)]]
    picture = matrix_grid(tiles, cell=10, pad=2)
    assert picture.size == (3 * (10 + 2) + 2, 2 * (10 + 2) + 2)
    a = np.asarray(picture)
    for r in range(2):
        for c in range(3):
            y, x = 2 + r * 12, 2 + c * 12
            assert (a[y : y + 10, x : x + 10] == tiles[r][c].getpixel((0, 0))).all()
    assert (a[0:2] == 255).all()  # padding is background


def test_matrix_grid_labels_add_a_left_margin_and_a_top_band():
    tiles = [[solid(0)] * 4 for _ in range(3)]
    plain = matrix_grid(tiles, cell=12, pad=1)
    labelled = matrix_grid(tiles, row_labels=["0", "1", "22"], column_labels=["a", "b", "c", "d"], cell=12, pad=1)
    assert labelled.size[1] == plain.size[1] + 10 + 4
    assert labelled.size[0] > plain.size[0]


def test_titled_adds_a_band_and_widens_for_long_titles():
    small = Image.new("RGB", (20, 10), (0, 0, 255))
    out = titled(small, "a rather long title for a small picture")
    assert out.size[1] == 32 and out.size[0] > 20
    assert out.getpixel((5, 25)) == (0, 0, 255)


def test_figure_to_image_renders_with_agg_at_the_figure_size():
    fig = channel_response_figure(np.array([0.0, 3.0, 1.0, 2.0]), top=2, size=(4.0, 2.0))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "3"]
    img = figure_to_image(fig)
    assert img.size == (400, 200) and img.mode == "RGB"
    assert figure_to_image(fig, dpi=50).size == (200, 100)
