"""The atlas pages in a real browser (Debian chromium driven by playwright), on the synthetic atlas: model ->
layer -> unit -> activation atlas, history back and forward, a reloaded deep link, the layer view of an image,
search, and the static export opened from ``file://`` showing the same unit page.

Skipped without the ``playwright`` package or ``/usr/bin/chromium``. ``CONVSCOPE_ATLAS_SCREENSHOTS=DIR`` also
saves a screenshot of every page visited there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from convscope.atlas.export import export_static

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def site(synthetic_atlas, tmp_path_factory) -> Path:
    return export_static(synthetic_atlas.root, tmp_path_factory.mktemp("export") / "site")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.problems = problems
    pg.set_default_timeout(15_000)
    yield pg
    context.close()


def shown(page, view: str, title: str | None = None) -> None:
    """Wait until the page shows ``view`` (and an h1 holding ``title``)."""
    page.wait_for_selector(f"#view[data-view='{view}']:not([aria-busy])")
    if title is not None:
        page.wait_for_function("t => document.querySelector('#view h1')?.textContent.includes(t)", arg=title)
    shots = os.environ.get("CONVSCOPE_ATLAS_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / f"{time.monotonic_ns()}-{view}.png"), full_page=True)


def loaded(page, selector: str) -> bool:
    """Whether every picture matching ``selector`` is decoded (naturalWidth > 0)."""
    page.wait_for_function("s => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)", arg=selector)
    return page.locator(selector).count() > 0


def plane_view(page) -> tuple[float, float, float]:
    """(x, y, zoom) of the activation atlas's plane, from its CSS transform."""
    return tuple(page.eval_on_selector(".atlas-plane", "e => e.style.transform.match(/-?[0-9.]+/g).map(Number)"))


def test_model_layer_unit_atlas_with_history(page, atlas_server):
    page.goto(atlas_server.url)
    shown(page, "model", "synthetic-tiny")
    assert page.locator(".layer-row").count() == 2
    assert page.inner_text(".layer-row[data-layer='blocks.4'] .shape") == "6×8×8"
    page.click(".layer-row[data-layer='conv1'] a.layer-link")
    shown(page, "layer", "conv1")
    assert page.url.endswith("#/layer/conv1")
    assert page.locator(".unit-card").count() == 8
    assert loaded(page, ".unit-card img")
    page.select_option("#sort", "max")
    page.wait_for_function("() => location.hash === '#/layer/conv1?sort=max'")
    shown(page, "layer")
    first = page.locator(".unit-card").first
    assert first.get_attribute("data-unit") in ("1", "6")  # the largest max (4.32): units 1 and 6, by number
    assert page.locator(".unit-card").last.get_attribute("data-unit") == "3"  # the dead unit, max 0
    page.click(".unit-card[data-unit='2']")
    shown(page, "unit", "conv1 · unit 2")
    assert page.url.endswith("#/layer/conv1/unit/2")
    assert loaded(page, ".vis-row img") and page.locator(".vis-row figure").count() == 6
    assert page.locator(".hit").count() == 9 and loaded(page, ".hit img")
    assert "sky" in page.inner_text(".concept-line") and "0.13" in page.inner_text(".concept-line")
    page.click(".pager a.next")
    shown(page, "unit", "conv1 · unit 3")
    assert page.locator("#view h1 .badge.dead").is_visible()
    page.go_back()
    shown(page, "unit", "conv1 · unit 2")
    page.go_back()
    shown(page, "layer", "conv1")
    assert page.input_value("#sort") == "max"
    page.go_forward()
    shown(page, "unit", "conv1 · unit 2")
    assert page.inner_text(".neighbours").split("\n") == ["unit 3 (0.8)", "unit 4 (0.55)"]
    page.click("a.neighbour >> text=unit 4")
    shown(page, "unit", "conv1 · unit 4")
    page.click("#crumbs a >> text=conv1")
    shown(page, "layer", "conv1")
    page.click("#atlas-link")
    shown(page, "atlas", "conv1 · activation atlas")
    assert page.url.endswith("#/layer/conv1/atlas")
    assert page.locator(".cell").count() == 13 and loaded(page, ".cell img")
    cell = page.locator(".cell[data-gx='1'][data-gy='2']")
    cell.hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    assert tip.inner_text().splitlines() == ["cell (1, 2) · 11 activations", "fire truck (5)", "tabby cat (2)"]
    cell.click()
    page.wait_for_selector("#cell-panel .near-unit")
    assert "Cell (1, 2)" in page.inner_text("#cell-panel")
    page.wait_for_function("() => location.hash.includes('cell=1%2C2')")
    before = plane_view(page)
    page.click("#zoom-in")
    zoomed = plane_view(page)
    assert zoomed[2] == pytest.approx(1.5 * before[2])
    assert f"z={zoomed[2]:.3f}" in page.url
    page.reload()
    shown(page, "atlas")
    page.wait_for_selector("#cell-panel .near-unit")  # the chosen cell comes back with the URL
    assert plane_view(page) == pytest.approx(zoomed, abs=1e-3 * zoomed[2] + 0.5)
    page.click("#cell-panel a.near-unit >> nth=0")
    shown(page, "unit", "conv1 · unit 3")  # cell (1, 2): nearest units 3 and 3
    page.go_back()
    shown(page, "atlas")
    assert page.problems == []


def test_a_pasted_deep_link_and_reload_restore_the_view(page, atlas_server):
    page.goto(atlas_server.url + "#/layer/blocks.4/unit/5")
    shown(page, "unit", "blocks.4 · unit 5")
    page.reload()
    shown(page, "unit", "blocks.4 · unit 5")
    assert page.locator(".pager a.next").count() == 0  # the last unit of the layer
    page.keyboard.press("ArrowLeft")
    shown(page, "unit", "blocks.4 · unit 4")
    assert page.title() == "blocks.4 unit 4 · convscope atlas"
    assert page.problems == []


def test_the_layer_view_of_an_image(page, atlas_server):
    page.goto(atlas_server.url + "#/flow/0")
    shown(page, "flow", "image 0")
    layers = page.locator(".flow-layer")
    assert layers.count() == 2 and page.locator(".flow-layer.open").count() == 0
    page.wait_for_selector(".flow-layer[data-layer='conv1'] canvas[data-drawn='8']")  # closed: the mean of 8 maps
    page.click(".flow-layer[data-layer='conv1'] .flow-mean")
    page.wait_for_selector(".flow-layer[data-layer='conv1'].open .flow-grid")
    assert page.locator(".flow-layer[data-layer='conv1'] .tile").count() == 8
    page.wait_for_function("() => location.hash === '#/flow/0?open=conv1'")
    tile = page.locator(".flow-layer[data-layer='conv1'] .tile[data-unit='5']")
    tile.hover()
    page.locator("#tooltip").wait_for(state="visible")
    assert "unit 5" in page.inner_text("#tooltip") and "16×16" in page.inner_text("#tooltip")
    page.reload()
    shown(page, "flow")
    assert page.locator(".flow-layer.open").count() == 1
    page.click(".flow-layer[data-layer='conv1'] .tile[data-unit='5']")
    shown(page, "unit", "conv1 · unit 5")
    page.go_back()
    shown(page, "flow")
    page.click("#open-all")
    page.wait_for_selector(".flow-layer[data-layer='blocks.4'].open .tile[data-unit='5']")
    assert page.problems == []


def test_search_finds_units_by_concept_and_class(page, atlas_server, synthetic_atlas):
    page.goto(atlas_server.url)
    shown(page, "model")
    page.fill("#search", "dog")
    page.press("#search", "Enter")
    shown(page, "search", "dog")
    assert page.url.endswith("#/search/dog")
    assert page.locator(".result").count() == 4
    assert page.inner_text(".result >> nth=0").startswith("blocks.4 · unit 5")
    page.goto(atlas_server.url + "#/search/tree%20frog")
    shown(page, "search", "tree frog")
    assert page.locator(".result").count() == len(synthetic_atlas.search("tree frog")) == 2
    assert page.problems == []


def test_unknown_pages_say_what_is_wrong(page, atlas_server):
    page.goto(atlas_server.url + "#/layer/conv1/unit/99")
    shown(page, "error")
    assert "no unit 99 in layer 'conv1' (units 0..7)" in page.inner_text("#view .error")
    page.goto(atlas_server.url + "#/nowhere")
    shown(page, "error")
    assert "no such page" in page.inner_text("#view .error")


def test_the_static_export_from_file_shows_the_same_pages(page, atlas_server, site):
    page.goto(atlas_server.url + "#/layer/conv1/unit/2")
    shown(page, "unit", "conv1 · unit 2")
    served = page.inner_text("#view")
    page.goto(f"file://{site}/index.html#/layer/conv1/unit/2")
    shown(page, "unit", "conv1 · unit 2")
    assert page.inner_text("#view") == served
    assert loaded(page, ".vis-row img") and loaded(page, ".hit img")
    assert page.eval_on_selector(".vis-positive img", "i => i.src").startswith("file://")
    page.click(".pager a.up")
    shown(page, "layer", "conv1")
    page.click("#atlas-link")
    shown(page, "atlas")
    assert loaded(page, ".cell img")
    page.go_back()
    shown(page, "layer")
    page.fill("#search", "dog")
    page.press("#search", "Enter")
    shown(page, "search")
    assert page.locator(".result").count() == 4  # the same as the server's search
    page.goto(f"file://{site}/index.html#/flow/1?open=blocks.4")
    shown(page, "flow")
    page.wait_for_selector(".flow-layer[data-layer='conv1'] canvas[data-drawn='8']")
    assert page.locator(".flow-layer[data-layer='blocks.4'] .tile").count() == 6
    page.reload()
    shown(page, "flow")
    assert page.problems == []
    page.goto(f"file://{site}/index.html#/layer/conv1/unit/30")
    shown(page, "error")
    assert "no unit 30 in layer \"conv1\"" in page.inner_text("#view .error")
