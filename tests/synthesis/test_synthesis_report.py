"""The report's synthesis section: gallery, class image and inversions, fast with small settings."""

from __future__ import annotations

from convscope.report.build import render_report


def test_synthesis_section_renders_three_figures(model, untouched):
    with untouched(model.module):
        rep = render_report(model, "sample:chelsea", sections=["synthesis"], progress=False,
                            options={"synthesis_steps": 3, "synthesis_size": 32, "synthesis_channels": 4})
    assert not rep.failures
    html = rep.html
    assert html.count("data:image/png;base64") >= 3
    assert "tiger cat" in html and "pixel RMSE" in html
