"""The page in a real browser (Debian chromium driven by playwright): choose the cat, run Grad-CAM, see it.

Skipped without the ``playwright`` package or ``/usr/bin/chromium``. ``CONVSCOPE_SCREENSHOT=path.png``
also saves a screenshot of the finished page there.
"""

from __future__ import annotations

import os
import shutil

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def page(builtin_server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: problems.append(str(e)))
            pg.problems = problems
            pg.set_default_timeout(60_000)
            pg.goto(builtin_server.url)
            yield pg
        finally:
            browser.close()


def test_gradcam_on_chelsea_in_the_browser(page, tmp_path):
    page.wait_for_selector("#image-select option[value='sample:chelsea']", state="attached")
    page.select_option("#image-select", "sample:chelsea")
    page.wait_for_selector("#predictions li")
    assert "tiger cat" in page.inner_text("#predictions li:first-child")
    page.select_option("#method", "gradcam")
    page.click("#explain-button")
    page.wait_for_selector("#explain-result:not([hidden])")
    page.wait_for_selector("#busy[hidden]", state="attached")
    image = page.locator("#explain-image")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('explain-image').naturalWidth") == 224
    assert image.is_visible()
    assert "tiger cat" in page.inner_text("#explain-caption")
    assert page.locator(".error:not([hidden])").count() == 0
    assert page.problems == []
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("CONVSCOPE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CONVSCOPE_SCREENSHOT"])


def test_api_errors_show_in_the_page(page):
    page.fill("#explain-layer", "no.such.layer")
    page.click("#explain-button")
    error = page.locator("#explain-error")
    error.wait_for(state="visible")
    assert "unknown layer 'no.such.layer'" in error.inner_text()
    page.fill("#explain-layer", "")
