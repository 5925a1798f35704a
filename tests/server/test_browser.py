"""The page in a real browser (Debian chromium driven by playwright): choose the cat, run Grad-CAM, see it;
a long job with progress and cancel; switching image during a job; errors clear results; deep links.

Skipped without the ``playwright`` package or ``/usr/bin/chromium``. ``CONVSCOPE_SCREENSHOT=path.png``
also saves a screenshot of the finished page there.
"""

from __future__ import annotations

import os
import shutil
import time

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


def poll(page, expression: str, ok, timeout: float = 60.0):
    """The value of ``expression`` in the page once ``ok(value)`` (wait_for_function needs eval, which the CSP forbids)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.evaluate(expression)
        if ok(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"{expression} stayed {value!r}; job: {page.inner_text('#job-text')!r}; "
                         f"errors: {page.inner_text('#explain-error')!r}")


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


def test_a_long_job_shows_progress_and_cancels(page, builtin_server):
    from serverkit import Client

    page.select_option("#image-select", "sample:chelsea")
    page.wait_for_selector("#predictions li")
    page.select_option("#method", "integrated_gradients")
    # 512 points one at a time: long enough to watch (IG builds the whole path first, so not 4096 of them)
    page.fill("#opt-integrated_gradients-steps", "512")
    page.fill("#opt-integrated_gradients-batch_size", "1")
    page.click("#explain-button")
    # over the page's 20 s budget (as on 2 CPU cores): the first steps give an estimate, and the job stops to ask
    outcome = poll(page, "document.getElementById('explain-run-anyway') ? 'ask' : "
                         "document.getElementById('job-progress').value > 0.06 ? 'running' : ''", bool)
    if outcome == "ask":
        assert "would take about" in page.inner_text("#explain-error")
        page.click("#explain-run-anyway")
    page.wait_for_selector("#job:not([hidden])")
    first = poll(page, "document.getElementById('job-progress').value", lambda v: v > 0)
    poll(page, "document.getElementById('job-progress').value", lambda v: v > first)  # progress moves
    assert "integrated_gradients" in page.inner_text("#job-text")
    page.click("#job-cancel")
    start = time.perf_counter()
    c = Client(builtin_server.url)
    while c.get("/api/jobs").data["running"]:
        assert time.perf_counter() - start < 1.0, "the server still runs the cancelled job"
        time.sleep(0.02)
    assert c.get("/api/predict?image=sample:chelsea&top=1").status == 200
    assert time.perf_counter() - start < 1.0
    assert page.locator("#job").is_hidden()
    page.fill("#opt-integrated_gradients-steps", "")
    page.fill("#opt-integrated_gradients-batch_size", "")


def test_switching_image_during_a_job_never_shows_the_old_result(page):
    page.select_option("#method", "gradcam")
    page.select_option("#image-select", "sample:chelsea")
    page.wait_for_selector("#predictions li")
    page.fill("#target", "bobsled")
    page.click("#explain-button")
    page.select_option("#image-select", "sample:coffee")  # while the job runs
    assert page.input_value("#target") == ""  # the target class belongs to the previous image
    page.wait_for_selector("#predictions li")
    time.sleep(1.5)  # long enough for the chelsea job to have finished
    assert page.locator("#explain-result").is_hidden()
    page.click("#explain-button")
    page.wait_for_selector("#explain-result:not([hidden])")
    assert page.get_attribute("#explain-image", "data-image") == "sample:coffee"
    top = page.inner_text("#predictions li:first-child .label")
    assert top in page.inner_text("#explain-caption") and "bobsled" not in page.inner_text("#explain-caption")


def test_an_error_clears_the_previous_result(page):
    page.wait_for_selector("#explain-result:not([hidden])")
    page.fill("#explain-layer", "no.such.layer")
    page.click("#explain-button")
    page.locator("#explain-error").wait_for(state="visible")
    assert page.locator("#explain-result").is_hidden()
    page.fill("#explain-layer", "")


def test_methods_side_by_side(page):
    page.select_option("#image-select", "sample:chelsea")
    page.wait_for_selector("#predictions li")
    page.click("#compare-box summary")
    for box in page.locator("#compare-methods input").all():
        box.set_checked(box.get_attribute("value") in ("gradcam", "saliency"))
    page.click("#compare-button")
    poll(page, "document.querySelectorAll('#compare-result figure').length", lambda n: n == 2)
    captions = page.locator("#compare-result figcaption").all_inner_texts()
    assert sorted(c.split()[0] for c in captions) == ["gradcam", "saliency"]
    assert all("tiger cat" in c for c in captions)
    assert page.locator("#compare-result img").first.get_attribute("data-image") == "sample:chelsea"


def test_a_batch_filtered_by_predicted_class(page):
    page.select_option("#method", "gradcam")
    page.click("#batch-box summary")
    page.fill("#batch-filter", "cat")  # tiger cat (chelsea); none of the other samples
    page.click("#batch-button")
    page.wait_for_selector("#batch-caption:not([hidden])")
    figures = page.locator("#batch-result figcaption").all_inner_texts()
    assert figures and all("cat" in f for f in figures) and any(f.startswith("chelsea: tiger cat") for f in figures)
    total = page.locator("#image-select option:not([value=''])").count()
    assert page.inner_text("#batch-caption").startswith(f"{len(figures)} of {total} images")
    assert len(figures) < total  # the filter left some out


def test_a_deep_link_survives_a_reload(page, builtin_server):
    page.goto(builtin_server.url + "#image=sample:coffee&tab=layer&method=saliency")
    page.reload()
    page.wait_for_selector("#predictions li")
    assert page.input_value("#image-select") == "sample:coffee"
    assert page.get_attribute("#tab-layer", "aria-selected") == "true" and page.locator("#panel-layer").is_visible()
    assert page.input_value("#method") == "saliency"
    assert "image=sample%3Acoffee" in page.url or "image=sample:coffee" in page.url
    assert "Simonyan" in page.inner_text("#method-paper")
    assert page.problems == []
