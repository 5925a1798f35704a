"""The atlas's web API (``convscope serve --atlas``) and its static export, on a synthetic atlas.

The API answers exactly what the store holds, refuses unknown layers, units and images with a clear JSON
404, serves pictures only from inside the atlas's ``files/`` folder, and sits behind the explorer's guard
(token, Host and cross-site checks). The static export writes the page, one data script per view and the
pictures, atomically.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import atlaskit
import pytest
from atlaskit import http_get, http_json

import convscope as cs
from convscope.atlas.export import MANIFEST, export_static, layer_slugs
from convscope.atlas.serve import PAGES, picture_path, to_json
from convscope.atlas.store import AtlasError, AtlasStore
from convscope.server import make_server
from testkit import Tiny, run_cli


def roundtrip(value):
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------- the API answers the store
@pytest.mark.parametrize(("path", "read"), [
    ("/atlas/api/model", lambda s: s.model()),
    ("/atlas/api/images", lambda s: s.images()),
    ("/atlas/api/layer/conv1", lambda s: s.layer("conv1")),
    ("/atlas/api/layer/blocks.4", lambda s: s.layer("blocks.4")),
    ("/atlas/api/unit/conv1/2", lambda s: s.unit("conv1", 2)),
    ("/atlas/api/unit/blocks.4/5", lambda s: s.unit("blocks.4", 5)),
    ("/atlas/api/atlas/conv1", lambda s: s.atlas("conv1")),
    ("/atlas/api/flow/1", lambda s: s.flow(1)),
])
def test_api_routes_answer_the_stores_data(atlas_server, synthetic_atlas, path, read):
    status, data = http_json(atlas_server, path)
    assert status == 200
    assert data == roundtrip(read(synthetic_atlas))


def test_search_answers_the_stores_search(atlas_server, synthetic_atlas):
    status, data = http_json(atlas_server, "/atlas/api/search?q=DOG")
    assert status == 200
    assert data["results"] == roundtrip(synthetic_atlas.search("DOG"))
    assert {r["concept"] for r in data["results"]} == {"dog"}
    status, data = http_json(atlas_server, "/atlas/api/search?q=tree%20frog&limit=1")
    assert status == 200 and len(data["results"]) == 1 and data["results"][0]["top_class"] == "tree frog"
    assert http_json(atlas_server, "/atlas/api/search?q=")[1]["results"] == []
    status, data = http_json(atlas_server, "/atlas/api/search?q=dog&limit=0")
    assert status == 400 and "limit" in data["error"]


@pytest.mark.parametrize(("path", "message"), [
    ("/atlas/api/layer/nope", "no layer 'nope' in this atlas (layers: conv1, blocks.4)"),
    ("/atlas/api/unit/nope/1", "no layer 'nope'"),
    ("/atlas/api/unit/conv1/99", "no unit 99 in layer 'conv1' (units 0..7)"),
    ("/atlas/api/unit/conv1/x", "no unit 'x' in layer 'conv1'"),
    ("/atlas/api/atlas/nope", "no layer 'nope'"),
    ("/atlas/api/flow/7", "no layer view stored for image 7"),
    ("/atlas/api/flow/x", "no image 'x'"),
    ("/atlas/api/nothing", "no such atlas endpoint: /atlas/api/nothing"),
])
def test_unknown_things_are_404_with_a_clear_json_error(atlas_server, path, message):
    status, data = http_json(atlas_server, path)
    assert status == 404
    assert set(data) == {"error"} and message in data["error"]


def test_pictures_are_served_from_the_atlas(atlas_server, synthetic_atlas):
    rel = synthetic_atlas.unit("conv1", 2)["vis"]
    assert rel.startswith("files/")
    status, headers, body = http_get(atlas_server, f"/atlas/api/{rel}")
    assert status == 200 and headers["content-type"] == "image/png"
    assert body == (synthetic_atlas.root / rel).read_bytes()
    # an <img> cannot send headers: the token as a query parameter works too
    status, _, _ = http_get(atlas_server, f"/atlas/api/{rel}?token={atlas_server.token}", token=False)
    assert status == 200


@pytest.mark.parametrize("path", [
    "/atlas/api/files/../atlas.sqlite",
    "/atlas/api/files/%2e%2e/atlas.sqlite",
    "/atlas/api/files/..%2fatlas.sqlite",
    "/atlas/api/files/conv1/../../atlas.sqlite",
    "/atlas/api/files/../../../../../../etc/passwd",
    "/atlas/api/files//etc/passwd",
    "/atlas/api/files/%2fetc%2fpasswd",
    "/atlas/api/files/conv1",
    "/atlas/api/files/missing.png",
])
def test_path_traversal_is_refused(atlas_server, path):
    status, headers, body = http_get(atlas_server, path)
    assert status == 404, (path, body[:100])
    assert "no picture" in json.loads(body)["error"]


def test_links_out_of_files_and_other_file_types_are_refused(tmp_path):
    store = atlaskit.fill_synthetic_atlas(tmp_path / "atlas", [("c", "Conv2d", 2, 4, 4)], images=3)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG secret")
    (store.root / "files" / "escape.png").symlink_to(outside)
    (store.root / "files" / "notes.txt").write_text("not a picture")
    (store.root / "files" / "inside.png").symlink_to(store.root / "files" / "c" / "u000-vis.png")
    assert picture_path(store.root, "escape.png") is None
    assert picture_path(store.root, "notes.txt") is None
    assert picture_path(store.root, "inside.png") == (store.root / "files" / "c" / "u000-vis.png").resolve()
    server = make_server(None, port=0, quiet=True, atlas=store)
    server.start()
    try:
        assert http_get(server, "/atlas/api/files/escape.png")[0] == 404
        assert http_get(server, "/atlas/api/files/notes.txt")[0] == 404
        assert http_get(server, "/atlas/api/files/inside.png")[0] == 200
    finally:
        server.stop()
    # the export copies what the server would serve, and nothing else
    site = export_static(store.root, tmp_path / "site")
    assert not (site / "files" / "escape.png").exists()
    assert not (site / "files" / "notes.txt").exists()
    assert (site / "files" / "inside.png").read_bytes() == (store.root / "files" / "c" / "u000-vis.png").read_bytes()


# ---------------------------------------------------------------------- the guard of the explorer applies
def test_the_api_and_pictures_need_the_token(atlas_server, synthetic_atlas):
    rel = synthetic_atlas.unit("conv1", 0)["vis"]
    for path in ("/atlas/api/model", "/atlas/api/unit/conv1/0", f"/atlas/api/{rel}"):
        status, data = http_json(atlas_server, path, token=False)
        assert status == 403 and "token" in data["error"]
        status, data = http_json(atlas_server, path, token=False, headers={"X-Convscope-Token": "wrong"})
        assert status == 403
    # the page and its scripts hold no data: no token needed
    for name in PAGES:
        assert http_get(atlas_server, f"/atlas/{name if name != 'index.html' else ''}", token=False)[0] == 200


def test_cross_site_and_foreign_hosts_are_refused(atlas_server):
    status, data = http_json(atlas_server, "/atlas/api/model", headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-site" in data["error"]
    status, data = http_json(atlas_server, "/atlas/api/model", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "cross-site" in data["error"]
    status, data = http_json(atlas_server, "/atlas/api/model", headers={"Host": "evil.example"})
    assert status == 403 and "own name" in data["error"]


def test_the_page_has_the_content_security_policy(atlas_server):
    status, headers, body = http_get(atlas_server, "/atlas/", token=False)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert b'data-mode="server"' in body
    status, headers, _ = http_get(atlas_server, "/atlas/atlas.js", token=False)
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert http_get(atlas_server, "/atlas/nothing.js", token=False)[0] == 404


def test_atlas_alone_redirects_the_root_and_has_no_model_api(atlas_server):
    status, headers, _ = http_get(atlas_server, "/?token=abc", token=False)
    assert status == 307 and headers["location"] == "/atlas/?token=abc"
    status, headers, _ = http_get(atlas_server, "/atlas?token=abc", token=False)
    assert status == 307 and headers["location"] == "/atlas/?token=abc"
    status, data = http_json(atlas_server, "/api/info")
    assert status == 404 and "atlas only" in data["error"]
    assert atlas_server.url.endswith(f"/atlas/?token={atlas_server.token}")
    assert atlas_server.jobs is None and atlas_server.threads() == [atlas_server._thread]


def test_the_explorer_and_the_atlas_together(synthetic_atlas):
    model = cs.load_model(Tiny().eval(), input_size=32, labels=[f"c{i}" for i in range(10)], device="cpu")
    server = make_server(model, port=0, quiet=True, atlas=synthetic_atlas.root)
    server.start()
    try:
        assert http_json(server, "/api/info")[0] == 200
        assert http_json(server, "/atlas/api/model")[1]["model"] == "synthetic-tiny"
        assert http_get(server, "/", token=False)[0] == 200
        assert server.url.endswith(f":{server.port}/?token={server.token}")
        assert server.atlas_url.endswith(f":{server.port}/atlas/?token={server.token}")
    finally:
        server.stop()


def test_serve_refuses_a_folder_that_is_not_an_atlas(tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", "--atlas", str(tmp_path), "--port", "0")
    assert code == 2
    assert "not an atlas folder" in err and "convscope atlas build" in err


def test_answers_follow_a_build_writing_into_the_atlas(tmp_path):
    store = atlaskit.fill_synthetic_atlas(tmp_path / "atlas", [("c", "Conv2d", 2, 4, 4)], images=3)
    server = make_server(None, port=0, quiet=True, atlas=store.root)
    server.start()
    try:
        assert http_json(server, "/atlas/api/unit/c/1")[1]["concept"] == "striped"
        assert http_json(server, "/atlas/api/unit/c/1")[1]["concept"] == "striped"  # a kept answer
        AtlasStore(store.root).put_units("c", [{"unit": 1, "concept": "zigzag", "iou": 0.5}])
        assert http_json(server, "/atlas/api/unit/c/1")[1]["concept"] == "zigzag"
        assert [r["unit"] for r in http_json(server, "/atlas/api/search?q=zigzag")[1]["results"]] == [1]
        store.put_layer("d", 1, kind="ReLU", channels=1, height=4, width=4, rf_size=None, rf_stride=None,
                        fingerprint="x")
        assert [layer["name"] for layer in http_json(server, "/atlas/api/model")[1]["layers"]] == ["c", "d"]
    finally:
        server.stop()


def test_each_api_answer_takes_under_100_ms(atlas_server, synthetic_atlas):
    rel = synthetic_atlas.unit("conv1", 0)["vis"]
    paths = ["/atlas/api/model", "/atlas/api/layer/conv1", "/atlas/api/unit/conv1/2", "/atlas/api/atlas/conv1",
             "/atlas/api/flow/0", "/atlas/api/search?q=dog", "/atlas/api/images", f"/atlas/api/{rel}"]
    for path in paths:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            assert http_get(atlas_server, path)[0] == 200
            best = min(best, time.perf_counter() - start)
        assert best < 0.1, f"{path}: {1000 * best:.0f} ms"
    # and reading an answer from the store (what a first request does), encoded
    reads = [synthetic_atlas.model, synthetic_atlas.images, lambda: synthetic_atlas.layer("conv1"),
             lambda: synthetic_atlas.unit("conv1", 2), lambda: synthetic_atlas.atlas("conv1"),
             lambda: synthetic_atlas.flow(0), lambda: synthetic_atlas.search("dog")]
    for read in reads:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            to_json(read())
            best = min(best, time.perf_counter() - start)
        assert best < 0.1, f"{read}: {1000 * best:.0f} ms"


# ---------------------------------------------------------------------- the static export
def read_data(path: Path) -> tuple[str, object]:
    """The key and payload of one data script ``(window.__atlas_data = ...)[KEY] = PAYLOAD;``."""
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition("[")
    assert head == "(window.__atlas_data = window.__atlas_data || {})"
    key, _, rest = rest.partition("] = ")
    payload = rest.strip()
    assert payload.endswith(";")
    return json.loads(key), json.loads(payload[:-1])


def test_static_export_writes_every_view_and_the_pictures(synthetic_atlas, tmp_path):
    site = export_static(synthetic_atlas.root, tmp_path / "site")
    assert site == tmp_path / "site"
    html = (site / "index.html").read_text()
    assert 'data-mode="static"' in html and 'data-mode="server"' not in html
    assert (site / "atlas.js").read_bytes() == (Path(cs.__file__).parent / "atlas" / "pages" / "atlas.js").read_bytes()
    model_js = (site / "data" / "model.js").read_text()
    lines = model_js.splitlines()
    assert len(lines) == 2  # the model and the layers' file names
    for i, line in enumerate(lines):
        (tmp_path / f"line{i}.js").write_text(line + "\n")
    assert read_data(tmp_path / "line0.js") == ("model", roundtrip(synthetic_atlas.model()))
    assert read_data(tmp_path / "line1.js") == ("slugs", {"conv1": "conv1", "blocks.4": "blocks.4"})
    assert read_data(site / "data" / "layer" / "conv1.js") == ("layer/conv1", roundtrip(synthetic_atlas.layer("conv1")))
    for name, channels in (("conv1", 8), ("blocks.4", 6)):
        units = sorted(int(p.stem) for p in (site / "data" / "unit" / name).glob("*.js"))
        assert units == list(range(channels))
    assert read_data(site / "data" / "unit" / "blocks.4" / "5.js") == (
        "unit/blocks.4/5", roundtrip(synthetic_atlas.unit("blocks.4", 5)))
    assert read_data(site / "data" / "atlas" / "conv1.js")[1] == roundtrip(synthetic_atlas.atlas("conv1"))
    assert not (site / "data" / "atlas" / "blocks.4.js").exists()  # no atlas for that layer
    assert read_data(site / "data" / "flow" / "1.js") == ("flow/1", roundtrip(synthetic_atlas.flow(1)))
    key, index = read_data(site / "data" / "search.js")
    assert key == "search" and index["fields"] == ["layer", "unit", "concept", "iou", "top_class", "vis"]
    assert len(index["rows"]) == 14
    pictures = sorted(p.relative_to(synthetic_atlas.root) for p in (synthetic_atlas.root / "files").rglob("*.png"))
    assert sorted(p.relative_to(site) for p in (site / "files").rglob("*.png")) == pictures
    unit = synthetic_atlas.unit("conv1", 2)
    for rel in [unit["vis"], unit["negative"], *unit["diversity"], unit["hits"][0]["patch"]]:
        assert (site / rel).read_bytes() == (synthetic_atlas.root / rel).read_bytes()
    manifest = json.loads((site / MANIFEST).read_text())
    assert manifest["format"] == "convscope-atlas-static" and manifest["units"] == 14 and manifest["atlases"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site")]  # no temporary folder left


def test_export_replaces_an_earlier_export_and_refuses_other_folders(synthetic_atlas, tmp_path):
    site = export_static(synthetic_atlas.root, tmp_path / "site")
    (site / "stale.txt").write_text("from before")
    export_static(synthetic_atlas.root, site)
    assert not (site / "stale.txt").exists() and (site / "index.html").is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(AtlasError, match="not empty and not an atlas export"):
        export_static(synthetic_atlas.root, other)
    assert (other / "thesis.tex").read_text() == "keep me"
    with pytest.raises(AtlasError, match="outside the atlas folder"):
        export_static(synthetic_atlas.root, synthetic_atlas.root / "site")
    with pytest.raises(AtlasError, match="not an atlas folder"):
        export_static(tmp_path / "nothing", tmp_path / "site2")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_static(synthetic_atlas.root, empty) / "index.html").is_file()


def test_export_of_an_interrupted_write_leaves_nothing(synthetic_atlas, tmp_path, monkeypatch):
    import convscope.atlas.export as export

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_copy_pictures", boom)
    with pytest.raises(OSError, match="disk full"):
        export_static(synthetic_atlas.root, tmp_path / "site")
    assert os.listdir(tmp_path) == []


def test_layer_file_names_are_distinct():
    assert layer_slugs(["a b", "a_b", "A_B", "conv1"]) == {"a b": "a_b", "a_b": "a_b-2", "A_B": "A_B-3", "conv1": "conv1"}


def test_export_of_a_layer_name_with_odd_characters(tmp_path):
    store = atlaskit.fill_synthetic_atlas(tmp_path / "atlas", [("head/fc 1", "Linear", 2, 1, 1)], images=2)
    site = export_static(store.root, tmp_path / "site")
    assert read_data(site / "data" / "unit" / "head_fc_1" / "1.js")[0] == "unit/head/fc 1/1"
    assert isinstance(AtlasStore(store.root).layer("head/fc 1"), dict)
