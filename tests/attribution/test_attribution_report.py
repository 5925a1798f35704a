"""The report's attribution section: maps side by side and deletion/insertion scores per method."""

from __future__ import annotations

import convscope.report.sec_attribution as sec
from convscope.attribution import get_method
from convscope.report.sections import ReportContext


def test_attribution_section_shows_each_method_with_scores(builtin, chelsea, monkeypatch):
    monkeypatch.setattr(sec, "REPORT_METHODS", ("gradcam", "saliency"))
    picture = builtin.transform_image(chelsea)
    ctx = ReportContext(model=builtin, image=picture, image_name="chelsea", x=builtin.preprocess(chelsea),
                        options={"attribution_steps": 4}, progress=False)
    html = sec.attribution(ctx)
    assert "tiger cat" in html and html.count("data:image/png;base64,") == 1
    assert "<td>gradcam</td><td>bn2</td>" in html and "<td>saliency</td><td>input</td>" in html
    assert "Deletion AUC" in html and "Insertion AUC" in html
    cells = html.split("<td>gradcam</td>")[1].split("</tr>")[0]
    numbers = [c for c in cells.replace("<td class=num>", "|").replace("</td>", "|").split("|") if c.startswith("0.")]
    assert len(numbers) >= 2  # both AUCs are numbers in [0, 1]


def test_report_methods_run_with_their_registered_preview_settings():
    for name in sec.REPORT_METHODS:
        get_method(name)  # every listed method is registered
    occlusion = get_method("occlusion").preview
    assert occlusion == {"window": 16, "stride": 8}
