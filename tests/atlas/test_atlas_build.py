"""The atlas build on a tiny model and 40 images made here: what the store holds, incremental builds (added images
are streamed alone and merged, an added layer is processed alone), the CLI, and a browser walk over the result."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.atlas import ActivationSample, AtlasError, AtlasStore, build_atlas
from convscope.atlas import build as atlas_build
from convscope.atlas.export import export_static
from convscope.cli import cmd_atlas
from convscope.cli.main import main
from convscope.dataset import make_synthetic_broden, top_activations
from convscope.dataset.engine import run
from convscope.server import make_server

SIZE = 32
FAST = {"vis_size": 24, "vis_steps": 3, "diversity": 2, "icon_size": 24, "icon_steps": 2, "samples": 3, "flows": 2,
        "batch_size": 8, "workers": 0, "progress": False}


def tiny_model() -> cs.Model:
    torch.manual_seed(0)
    module = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(6, 8, 3, stride=2, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 4),
    ))
    return cs.Model(module, input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                    labels=["ant", "bee", "cat", "dog"], resize_size=SIZE)


def write_images(folder, start: int, count: int) -> None:
    rng = np.random.default_rng(start)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        a = np.clip(rng.random(3) * 220 + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        a[8:16, 8:16] = 255 * (i % 2)  # a square in half of them
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas-build")
    images = root / "images"
    write_images(images, 0, 40)
    broden = make_synthetic_broden(root / "broden", n_images=20, size=SIZE)
    model = tiny_model()
    store = build_atlas(model, images, ["conv1", "relu2"], root / "atlas", concepts=broden, **FAST)
    return {"root": root, "images": images, "model": model, "store": store, "broden": broden}


def test_the_store_holds_every_part(built):
    store = built["store"]
    page = store.model()
    assert [layer["name"] for layer in page["layers"]] == ["conv1", "relu2"] and page["images"] == 40
    assert all(layer["built"] for layer in page["layers"]) and page["provenance"]["images"] == 40
    assert page["layers"][0]["shape"] == [6, 32, 32] and page["layers"][1]["receptive_field"]["size"] == 5
    layer = store.layer("relu2")
    assert len(layer["units"]) == 8 and layer["atlas"]
    unit = store.unit("relu2", 3)
    for key in ("vis", "negative"):
        assert (store.root / unit[key]).is_file()
    assert len(unit["diversity"]) == 2 and all((store.root / p).is_file() for p in unit["diversity"])
    assert 0 <= unit["sparsity"] <= 1 and unit["max"] >= unit["mean"]
    assert len(unit["hits"]) == 9 and all((store.root / h["patch"]).is_file() and (store.root / h["projection"]).is_file()
                                          for h in unit["hits"])
    # the hits are the engine's top-k, in order
    direct = top_activations(built["model"], built["images"], "relu2", k=9, progress=False)
    assert [h["image"] for h in unit["hits"]] == direct.indices[3].tolist()
    assert unit["iou"] is not None and unit["neighbours"] and unit["neighbours"][0][0] != 3
    conv = store.unit("conv1", 0)
    assert conv["filter"] and conv["filter_health"] in ("ok", "dead", "aliased")
    atlas = store.atlas("relu2")
    assert atlas["cells"] and atlas["samples"] == 120 and all(c["icon"] for c in atlas["cells"])
    assert sum(c["count"] for c in atlas["cells"]) <= 120
    assert all(c["classes"] and c["units"] for c in atlas["cells"])
    flow = store.flow(0)
    assert [f["layer"] for f in flow["layers"]] == ["conv1", "relu2"] and flow["layers"][1]["units"] == 8


def test_added_images_are_streamed_alone_and_merged(built, tmp_path, monkeypatch):
    images = tmp_path / "images"
    for p in built["images"].iterdir():
        (images / p.name).parent.mkdir(exist_ok=True)
        (images / p.name).write_bytes(p.read_bytes())
    atlas = tmp_path / "atlas"
    model = built["model"]
    build_atlas(model, images, ["relu2"], atlas, **{**FAST, "diversity": 0})
    write_images(images, 40, 8)
    streamed = []
    real = atlas_build.run_engine
    monkeypatch.setattr(atlas_build, "run_engine", lambda m, files, *a, **k: streamed.append(len(files)) or real(m, files, *a, **k))
    store = build_atlas(model, images, ["relu2"], atlas, **{**FAST, "diversity": 0})
    assert streamed == [8]  # the data pass streamed the 8 new images only
    direct = top_activations(model, images, "relu2", k=9, progress=False)
    for u in range(8):
        assert [h["image"] for h in store.unit("relu2", u)["hits"]] == direct.indices[u].tolist()
    assert store.model()["images"] == 48


def test_an_added_layer_is_processed_alone(built, tmp_path):
    atlas = tmp_path / "atlas"
    model = built["model"]
    build_atlas(model, built["images"], ["relu2"], atlas, **{**FAST, "diversity": 0})
    before = (atlas / "files" / "relu2" / "u0000-vis.png").stat().st_mtime_ns
    store = build_atlas(model, built["images"], ["relu2", "conv2"], atlas, **{**FAST, "diversity": 0})
    assert (atlas / "files" / "relu2" / "u0000-vis.png").stat().st_mtime_ns == before  # reused, not re-rendered
    assert store.layers() == ["conv2", "relu2"] and store.layer("conv2")["built"]


def test_activation_sample_is_deterministic_and_mergeable(built):
    model = built["model"]
    whole = run(model, built["images"], [ActivationSample("relu2", 3, seed=1)], batch_size=16, progress=False).results[0]
    parts = run(model, built["images"], [ActivationSample("relu2", 3, seed=1)], batch_size=5, progress=False).results[0]
    assert torch.equal(whole["vectors"], parts["vectors"]) and torch.equal(whole["images"], parts["images"])


def test_bad_builds_are_clear(built, tmp_path):
    with pytest.raises(AtlasError, match="no layers"):
        build_atlas(built["model"], built["images"], [], tmp_path / "a", **FAST)
    with pytest.raises(cs.LayerNotFoundError):
        build_atlas(built["model"], built["images"], ["conv9"], tmp_path / "a", **FAST)
    with pytest.raises(AtlasError, match="not an atlas"):
        AtlasStore(tmp_path)
    with pytest.raises(AtlasError, match="feature maps"):  # refused before anything is written
        build_atlas(built["model"], built["images"], ["fc"], tmp_path / "b", **FAST)
    assert not (tmp_path / "b").exists()
    other = tiny_model()
    with torch.no_grad():
        other.module.fc.weight.add_(1)
    with pytest.raises(AtlasError, match="another model"):
        build_atlas(other, built["images"], ["relu2"], built["store"].root, **FAST)


def test_cli_build_and_export(built, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cmd_atlas, "load_model_from_args", lambda args: built["model"])
    atlas = tmp_path / "atlas"
    code = main(["atlas", "build", str(built["images"]), "--layers", "relu2", "-o", str(atlas), "--vis-size", "24",
                 "--vis-steps", "2", "--diversity", "0", "--icon-steps", "2", "--icon-size", "24", "--no-progress",
                 "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "convscope serve --atlas" in err and AtlasStore(atlas).layer("relu2")["built"]
    assert main(["atlas", "export", str(atlas), "--static", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file()
    assert main(["atlas", "export", str(tmp_path / "nothing"), "--static", str(tmp_path / "s2")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["atlas", "build", str(built["images"]), "--layers", "relu2", "-o", str(tmp_path / "x"), "--vis-steps", "0"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------- the real atlas in a browser

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def test_browse_the_built_atlas_and_its_static_export(built, tmp_path):
    import os

    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium is not installed")
    store = built["store"]
    server = make_server(None, port=0, quiet=True, atlas=store)
    server.start()
    site = export_static(store.root, tmp_path / "site")
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.set_default_timeout(15_000)

            def shown(view: str) -> None:
                page.wait_for_selector(f"#view[data-view='{view}']:not([aria-busy])")

            page.goto(server.atlas_url if hasattr(server, "atlas_url") else server.url)
            shown("model")
            page.click(".layer-row[data-layer='relu2'] a.layer-link")
            shown("layer")
            assert page.locator(".unit-card").count() == 8
            page.click(".unit-card[data-unit='3']")
            shown("unit")
            assert page.locator(".hit").count() == 9
            page.click("#crumbs a >> text=relu2")
            shown("layer")
            page.click("#atlas-link")
            shown("atlas")
            assert page.locator(".cell").count() == len(store.atlas("relu2")["cells"])
            page.go_back()
            shown("layer")
            page.go_back()
            shown("unit")
            page.reload()
            shown("unit")
            assert "unit 3" in page.inner_text("#view h1")
            page.goto((site / "index.html").as_uri() + "#/layer/relu2/unit/3")
            shown("unit")
            assert page.locator(".hit").count() == 9 and "unit 3" in page.inner_text("#view h1")
            browser.close()
            assert problems == []
    finally:
        server.stop()
    json.dumps(store.model())  # JSON-ready
