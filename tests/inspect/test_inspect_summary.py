"""summary(): the Keras-style layer table and its totals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.inspect import ViewOptionError, summary


def test_totals_equal_parameter_counts_of_the_builtin_model(builtin):
    s = summary(builtin)
    params = list(builtin.module.parameters())
    assert s.total_params == sum(p.numel() for p in params) == 4_652_008
    assert s.trainable_params == sum(p.numel() for p in params if p.requires_grad)
    assert s.non_trainable_params == s.total_params - s.trainable_params
    size = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in builtin.module.buffers())
    assert s.size_mb == pytest.approx(size / 2**20)
    assert s.input_size == (3, 224, 224)
    text = str(s)
    assert "Total params: 4,652,008" in text
    assert "Input size: 3x224x224" in text
    assert f"Model size: {size / 2**20:.2f} MB" in text


def test_receptive_fields_of_stem_and_head(builtin):
    rows = {r.name: r for r in summary(builtin).rows}
    stem, head = rows["conv_stem"].receptive_field, rows["bn2"].receptive_field
    assert stem.size == (3, 3) and stem.stride == (2, 2)
    assert head.stride == (32, 32)
    assert rows["bn2"].output_shape == (1, 1280, 7, 7)
    line = next(line for line in str(summary(builtin, depth=1)).splitlines() if line.startswith("conv_stem"))
    assert "32x112x112" in line and "864" in line and "3 /2" in line


def test_frozen_and_shared_parameters_are_counted_once_and_as_non_trainable(tiny):
    tiny.module.conv1.weight.requires_grad_(False)
    tied = nn.Sequential(tiny.module, nn.Identity())
    s = summary(tied, input_size=32)
    assert s.total_params == sum(p.numel() for p in tiny.module.parameters())
    assert s.non_trainable_params == 8 * 3 * 3 * 3
    row = next(r for r in s.rows if r.name == "0.conv1")
    assert row.params == 8 * 27 + 8 and row.trainable == 8
    assert next(cells for cells in s.table() if cells[0].strip() == "0.conv1")[4] == "8"  # partly trainable


def test_depth_and_leaves_filter_rows_but_not_totals(builtin):
    full = summary(builtin)
    shallow = summary(builtin, depth=2)
    leaves = summary(builtin, leaves=True)
    assert {r.depth for r in shallow.rows} == {1, 2}
    assert [r.name for r in shallow.rows if r.depth == 1] == ["conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"]
    assert all(r.is_leaf for r in leaves.rows) and len(leaves.rows) < len(full.rows)
    assert shallow.total_params == leaves.total_params == full.total_params
    assert len(str(shallow).splitlines()) == len(shallow.rows) + 4 + 6
    with pytest.raises(ViewOptionError):
        summary(builtin, depth=0)


def test_works_on_plain_and_wrapped_modules(tiny):
    plain = summary(tiny.module, input_size=32)
    wrapped = summary(cs.load_model(tiny.module, input_size=32))
    names = ["conv1", "relu1", "dw", "relu2", "conv2", "relu3", "pool", "flat", "fc"]
    assert [r.name for r in plain.rows] == [r.name for r in wrapped.rows] == names
    rows = {r.name: r for r in plain.rows}
    assert rows["conv2"].output_shape == (1, 6, 16, 16)
    assert rows["conv2"].receptive_field.size == (7, 7) and rows["conv2"].receptive_field.stride == (2, 2)
    assert str(rows["fc"].receptive_field) == "global"


def test_html_repr_lists_every_row_and_the_totals(builtin):
    s = summary(builtin, depth=2)
    page = s._repr_html_()
    assert page.count("<tr>") == len(s.rows) + 1
    assert "<code>blocks.6</code>" in page and "Total params: 4,652,008" in page


def test_summary_does_not_touch_the_model(tiny, untouched):
    with untouched(tiny.module):
        summary(tiny.module, input_size=32)
    assert isinstance(tiny.module.relu1, nn.ReLU) and tiny.module.relu1.inplace
    assert torch.is_grad_enabled()


def test_to_dict_is_json_ready_and_matches_the_rows(tiny):
    s = summary(tiny, depth=1)
    data = json.loads(json.dumps(s.to_dict()))
    assert data["model"] == s.name and data["total_params"] == s.total_params
    by_name = {r["name"]: r for r in data["layers"]}
    assert list(by_name) == [r.name for r in s.rows]
    assert by_name["conv2"] == {"name": "conv2", "type": "Conv2d", "output_shape": [1, 6, 16, 16], "params": 438,
                                "trainable": 438, "receptive_field": [7, 7], "stride": [2, 2], "depth": 1, "leaf": True}
    assert by_name["fc"]["receptive_field"] is None  # global: no finite window
