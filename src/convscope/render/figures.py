"""Matplotlib figures, built as ``Figure`` objects with the Agg canvas: no pyplot, no global state.

Every figure convscope returns is a :class:`Figure`: a ``matplotlib.figure.Figure`` that also shows
itself in Jupyter (``_repr_png_``) without ``%matplotlib inline``. Importing this module loads
matplotlib, so modules that only sometimes draw a figure import it where they draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.figure
import numpy as np

from .core import figure_to_image, png_bytes, to_numpy


class Figure(matplotlib.figure.Figure):
    """A matplotlib figure that Jupyter displays as a PNG picture with no backend set up (``_repr_png_``).

    Build it like ``matplotlib.figure.Figure`` (``Figure(figsize=..., layout="constrained")``); draw
    it to a PIL image with :func:`convscope.render.figure_to_image`.
    """

    def _repr_png_(self) -> bytes:
        return png_bytes(figure_to_image(self))


def channel_response_figure(
    values: Any,
    *,
    top: int = 5,
    title: str | None = None,
    xlabel: str = "channel",
    ylabel: str = "mean activation",
    size: tuple[float, float] = (9.0, 3.2),
    marks: Sequence[int] = (),
    marks_label: str = "",
) -> Figure:
    """Plot one value per channel (e.g. mean activations (C,)) as thin bars; label the ``top`` largest.

    ``marks``: channels to flag with a grey triangle under the axis (e.g. dead filters), explained by
    ``marks_label`` in a legend. Returns a :class:`Figure` (a ``matplotlib.figure.Figure`` that Jupyter
    shows as a picture); render it with :func:`convscope.render.figure_to_image`.
    """
    v = to_numpy(values).astype(np.float64).ravel()
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    idx = np.arange(v.size)
    ax.vlines(idx, 0, v, color="#4c72b0", linewidth=0.8)
    ax.axhline(0, color="#888888", linewidth=0.6)
    k = min(max(int(top), 0), v.size)
    if k:
        best = np.argsort(-v, kind="stable")[:k]
        ax.scatter(best, v[best], color="#d62728", s=14, zorder=3)
        span = (v.max() - min(v.min(), 0)) or 1.0
        for rank, c in enumerate(best):
            ax.annotate(
                str(int(c)),
                (c, v[c]),
                xytext=(0, 4 + (rank % 2) * 9),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color="#d62728",
            )
        ax.set_ylim(min(v.min(), 0) - 0.02 * span, v.max() + 0.18 * span)
    if len(marks):
        m = np.asarray(list(marks), dtype=int)
        ax.scatter(m, np.zeros(len(m)), marker="^", color="#444444", s=30, zorder=4, label=marks_label or None, clip_on=False)
        if marks_label:
            ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_xlim(-0.5, v.size - 0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return fig
