"""The HTML report: self-contained, every inspection section works, broken sections do not kill it."""

from __future__ import annotations

import html
import io
import re

import pytest
import torch

from convscope.report import SECTIONS, Section
from convscope.report.build import ReportError, build_report, render_report, select_sections

MINE = ["prediction", "model_summary", "first_filters", "features", "channels"]


@pytest.fixture(scope="module")
def report(builtin):
    return render_report(builtin, "sample:chelsea", sections=MINE, progress=False)


def test_every_inspection_section_succeeds_on_the_builtin_model(report):
    assert [s.key for s in report.sections] == MINE
    assert report.failures == []
    for s in report.sections:
        assert f'<section id="sec-{s.key}"><h2>{html.escape(s.title)}' in report.html
        assert f'<a href="#sec-{s.key}">{html.escape(s.title)}</a>' in report.html  # table of contents


def test_report_is_self_contained(report):
    page = report.html
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert page.count("data:image/png;base64,") >= 8


def test_report_shows_the_prediction_summary_and_views(report, builtin):
    page = report.html
    assert "tiger cat" in page
    assert "EfficientNet-Lite0" in page and "sample:chelsea" in page
    assert "<details><summary>All 272 layers</summary>" in page
    assert "Total params: 4,652,008" in page
    for layer in ("bn1", "blocks.2", "bn2"):
        assert f"<code>{layer}</code>" in page
    top = report.html.split('id="sec-channels"')[1]
    from convscope.inspect import channel_means

    best = channel_means(builtin, builtin.preprocess("sample:chelsea"), "bn2").top(1)[0][0]
    assert f"<td class=num>{best}</td>" in top


def test_report_leaves_the_model_untouched(builtin):
    def state():
        buf = io.BytesIO()
        torch.save(builtin.module.state_dict(), buf)
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in builtin.module.modules())
        flags = [(m.training, getattr(m, "inplace", None)) for m in builtin.module.modules()]
        return buf.getvalue(), hooks, flags, [p.requires_grad for p in builtin.module.parameters()]

    before = state()
    build_report(builtin, "sample:coffee", sections=["prediction", "channels"])
    after = state()
    assert after == before and after[1] == 0


def test_a_failing_section_becomes_an_error_box(builtin, monkeypatch):
    def broken(ctx):
        raise RuntimeError("deliberately broken <section>")

    monkeypatch.setitem(SECTIONS, "broken", Section("broken", "Broken one", 15, broken))
    rep = render_report(builtin, "sample:chelsea", sections=["prediction", "broken"])
    assert [s.key for s in rep.failures] == ["broken"]
    assert rep.failures[0].error == "RuntimeError: deliberately broken <section>"
    assert '<div class="error"><b>This section failed.</b> RuntimeError: deliberately broken &lt;section&gt;</div>' in rep.html
    assert "tiger cat" in rep.html  # the other section still ran


def test_interrupting_a_section_stops_the_report(builtin, monkeypatch):
    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(SECTIONS, "stop", Section("stop", "Stop", 1, interrupted))
    with pytest.raises(KeyboardInterrupt):
        render_report(builtin, "sample:chelsea", sections=["stop"])


def test_options_choose_layers_and_unknown_sections_are_errors(builtin):
    page = build_report(builtin, "sample:chelsea", options={"layers": ["blocks.1"]}, sections=["features"])
    assert "<code>blocks.1</code> &middot; 24 channels of 56x56" in page
    with pytest.raises(ReportError, match="did you mean features"):
        select_sections(["feature"])


def test_every_registered_section_succeeds_on_the_builtin_model(builtin):
    """All sections, including those other features add, build without an error box on the built-in model."""
    rep = render_report(builtin, "sample:chelsea", progress=False)
    assert [s.key for s in rep.failures] == []


def test_filter_health_section_reports_the_counts_of_every_convolution(builtin):
    from convscope.inspect import filter_health

    page = render_report(builtin, "sample:chelsea", sections=["health"], progress=False)
    assert page.failures == []
    h = filter_health(builtin)
    text = page.html.split('id="sec-health"')[1]
    assert f"Across the {len(h.layers)} convolutions, <b>{h.dead}</b> filters are dead" in text
    assert f"<b>{h.aliased}</b> are aliased" in text
    assert "<code>conv_stem</code></td><td>3x3 / 2x2</td><td>32</td><td>4</td><td>7</td>" in text
