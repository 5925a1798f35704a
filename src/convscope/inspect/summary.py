"""The Keras-style model summary: one row per layer with output shape, parameters and receptive field."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ViewOptionError
from ..models import Model, as_model
from ..probe import LayerInfo

MB = 2**20
"""Bytes per MB in :attr:`Summary.size_mb` (binary megabytes, as Keras and PyTorch tools report them)."""


@dataclass
class Summary:
    """A model's layer table and totals, as :func:`summary` computes them.

    ``rows``: the :class:`~convscope.probe.LayerInfo` rows shown (after the ``depth``/``leaves`` filters),
    in forward order; ``all_rows``: every layer. Totals always count the whole model once, shared
    parameters once: ``total_params = sum(p.numel() for p in module.parameters())``,
    ``trainable_params`` those with ``requires_grad``. ``param_bytes``/``buffer_bytes``: storage of
    parameters and buffers (BatchNorm statistics) in bytes; ``size_mb`` = their sum / 2**20.
    ``input_size``: (C, H, W) of the dry run that measured the output shapes.
    """

    name: str
    rows: list[LayerInfo]
    total_params: int
    trainable_params: int
    param_bytes: int
    buffer_bytes: int
    input_size: tuple[int, int, int]
    all_rows: list[LayerInfo] = field(default_factory=list, repr=False)
    depth: int | None = None
    leaves: bool = False

    @property
    def non_trainable_params(self) -> int:
        """Parameters with ``requires_grad=False``."""
        return self.total_params - self.trainable_params

    @property
    def size_mb(self) -> float:
        """Storage of parameters and buffers in MB (2**20 bytes)."""
        return (self.param_bytes + self.buffer_bytes) / MB

    def totals(self) -> dict[str, Any]:
        """The totals as a plain dict (for JSON output and tests)."""
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "size_mb": self.size_mb,
            "input_size": list(self.input_size),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: ``{"model", "layers": [one dict per shown row], **totals()}``; each row has name,
        type, output_shape (with the batch axis), params, trainable, receptive_field and stride (input pixels,
        ``None`` when undefined or global), depth and leaf."""
        rows = []
        for r in self.rows:
            rf = r.receptive_field if r.receptive_field is not None and r.receptive_field.size is not None else None
            rows.append({
                "name": r.name,
                "type": r.type,
                "output_shape": list(r.output_shape) if r.output_shape is not None else None,
                "params": r.params,
                "trainable": r.trainable,
                "receptive_field": list(rf.size) if rf is not None else None,
                "stride": list(rf.stride) if rf is not None else None,
                "depth": r.depth,
                "leaf": r.is_leaf,
            })
        return {"model": self.name, "layers": rows, **self.totals()}

    # ------------------------------------------------------------------ text
    def table(self) -> list[tuple[str, str, str, str, str, str]]:
        """The shown rows as text cells: layer (indented by depth), type, output shape, params, trainable, RF."""
        base = min((r.depth for r in self.rows), default=1)
        return [
            (
                "  " * (r.depth - base) + r.name,
                r.type,
                format_shape(r.output_shape),
                f"{r.params:,}",
                _trainable(r),
                format_field(r),
            )
            for r in self.rows
        ]

    def footer(self) -> list[str]:
        """The totals lines under the table (parameters, size, input size)."""
        c, h, w = self.input_size
        return [
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.non_trainable_params:,}",
            f"Model size: {self.size_mb:.2f} MB (parameters {self.param_bytes / MB:.2f} MB + buffers {self.buffer_bytes / MB:.2f} MB)",
            f"Input size: {c}x{h}x{w}",
        ]

    def __str__(self) -> str:
        header = ("Layer", "Type", "Output shape", "Params", "Trainable", "Receptive field")
        cells = self.table()
        widths = [max(len(header[i]), *(len(row[i]) for row in cells)) if cells else len(header[i]) for i in range(6)]
        right = {3}

        def line(row: Sequence[str]) -> str:
            parts = [row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i]) for i in range(6)]
            return "  ".join(parts).rstrip()

        total_width = sum(widths) + 2 * 5
        shown = f"{len(self.rows)} of {len(self.all_rows) or len(self.rows)} layers"
        if self.depth is not None:
            shown += f", depth <= {self.depth}"
        if self.leaves:
            shown += ", leaf modules only"
        out = [f'Model: "{self.name}" ({shown})', "=" * total_width, line(header), "-" * total_width]
        out += [line(row) for row in cells]
        out += ["=" * total_width, *self.footer()]
        return "\n".join(out)

    # ------------------------------------------------------------------ html
    def to_html(self, *, totals: bool = True) -> str:
        """The table as an HTML fragment (``<table class="summary">``, then the totals when ``totals``)."""
        head = "".join(f"<th>{h}</th>" for h in ("Layer", "Type", "Output shape", "Params", "Trainable", "Receptive field"))
        body = []
        for (name, typ, shape, params, trainable, rf), r in zip(self.table(), self.rows):
            indent = max(0, len(name) - len(name.lstrip(" "))) // 2
            body.append(
                f'<tr><td style="padding-left:{0.4 + 1.1 * indent:.1f}em"><code>{html.escape(r.name)}</code></td>'
                f"<td>{html.escape(typ)}</td><td>{shape}</td><td class=num>{params}</td>"
                f"<td>{trainable}</td><td>{html.escape(rf)}</td></tr>"
            )
        table = f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        if not totals:
            return table
        items = "".join(f"<li>{html.escape(t)}</li>" for t in self.footer())
        return f'{table}<ul class="totals">{items}</ul>'

    def _repr_html_(self) -> str:
        return f"<p><b>{html.escape(self.name)}</b></p>" + self.to_html()


def format_shape(shape: tuple[int, ...] | None) -> str:
    """``(1, 32, 112, 112)`` -> ``"32x112x112"`` (batch axis dropped); ``None`` (never ran) -> ``"not run"``."""
    if shape is None:
        return "not run"
    dims = shape[1:] if len(shape) > 1 else shape
    return "x".join(str(d) for d in dims) if dims else "scalar"


def format_field(row: LayerInfo) -> str:
    """Receptive field as ``"size /stride"`` in input pixels, ``"global"``, or ``"-"`` when undefined."""
    if row.output_shape is None or row.receptive_field is None:
        return "-"
    return str(row.receptive_field)


def _trainable(row: LayerInfo) -> str:
    if row.params == 0:
        return "-"
    if row.trainable == row.params:
        return "yes"
    return "no" if row.trainable == 0 else f"{row.trainable:,}"


def summary(
    model: Model | nn.Module,
    *,
    depth: int | None = None,
    leaves: bool = False,
    input_size: int | tuple[int, int] | None = None,
) -> Summary:
    """The layer table of ``model`` with parameter totals, like Keras' ``model.summary()``.

    ``model``: a :class:`~convscope.Model` or a plain ``nn.Module`` (:func:`~convscope.models.as_model`),
    measured with a zero input of ``input_size`` (default the model's own; 224 px for a plain module). ``depth``: keep rows whose name has at most
    that many dotted parts (``blocks.0`` has depth 2); ``leaves``: keep only modules without children.
    Output shapes come from one dry forward pass; receptive fields are in input pixels.
    """
    if depth is not None and depth < 1:
        raise ViewOptionError(f"depth must be at least 1, got {depth}")
    model = as_model(model, input_size=input_size)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size or model.input_size)
    rows = list(model.layers(size))
    module = model.module
    shown = [r for r in rows if (depth is None or r.depth <= depth) and (not leaves or r.is_leaf)]
    params = list(module.parameters())
    return Summary(
        name=model.name,
        rows=shown,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in module.buffers()),
        input_size=(3, *size),
        all_rows=rows,
        depth=depth,
        leaves=leaves,
    )
