"""The explorer's JSON API over a tiny model: info, upload, predict, explain, layer views, errors, limits."""

from __future__ import annotations

import threading

import pytest
from serverkit import Client, decode, png_bytes, tiny_model

import statecheck
from convscope.server import MAX_UPLOAD_BYTES, make_server


def test_info_lists_model_layers_methods_and_samples(client):
    a = client.get("/api/info")
    assert a.status == 200
    info = a.data
    assert info["input_size"] == [32, 32] and info["num_classes"] == 10
    assert info["labels"][3] == "thing 3"
    layers = {row["name"]: row for row in info["layers"]}
    assert layers["conv1"]["conv"] and layers["conv1"]["output_shape"] == [1, 8, 32, 32]
    assert layers["conv2"]["receptive_field"] and not layers["fc"]["conv"]
    assert info["default_layer"] == "relu2" or info["default_layer"] in layers
    assert info["first_conv"] == "conv1"
    methods = {m["name"]: m for m in info["methods"]}
    assert {"gradcam", "saliency", "occlusion", "integrated_gradients"} <= set(methods)
    assert methods["gradcam"]["family"] == "cam" and methods["gradcam"]["uses_layer"]
    steps = {o["name"]: o for o in methods["integrated_gradients"]["options"]}["steps"]
    assert steps["type"] == ["int"] and steps["default"] is None and steps["help"]  # None: adaptive
    assert (steps["minimum"], steps["maximum"], steps["range"]) == (1, 4096, "an int in 1..4096")
    from convscope.attribution import get_method

    occlusion = dict(methods["occlusion"])
    description = occlusion.pop("description")
    assert occlusion == get_method("occlusion").to_json()  # the registry's own serialisation, plus:
    assert description.startswith("Occlusion sensitivity (Zeiler & Fergus 2014)") and "``" not in description
    assert description.endswith(".") and len(description) > len(occlusion["summary"])  # whole sentences
    assert methods["saliency"]["view"] == "heatmap" and methods["gradcam"]["view"] == "overlay"
    assert "chelsea" in [s["name"] for s in info["samples"]]
    assert info["limits"]["max_upload"] == MAX_UPLOAD_BYTES == 20 * 1024 * 1024


def test_upload_then_predict(client):
    body = png_bytes(40, 30)
    a = client.post("/api/image", body)
    assert a.status == 200, a.data
    assert (a.data["width"], a.data["height"]) == (40, 30)
    assert decode(a.data["preview"]).size == (32, 32)  # what the network sees
    image_id = a.data["id"]
    assert client.post("/api/image", body).data["id"] == image_id  # same bytes, same id
    p = client.get(f"/api/predict?image={image_id}&top=3")
    assert p.status == 200
    preds = p.data["predictions"]
    assert [x["rank"] for x in preds] == [1, 2, 3]
    probs = [x["probability"] for x in preds]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert all(x["label"] == f"thing {x['index']}" for x in preds)
    assert client.get(f"/api/image?image={image_id}").data["width"] == 40


def test_explain_gradcam_returns_a_png_of_the_input_size(client):
    image_id = client.post("/api/image", png_bytes(seed=1)).data["id"]
    a = client.get(f"/api/explain?image={image_id}&method=gradcam&layer=conv2&target=4")
    assert a.status == 200, a.data
    img = decode(a.data["image"])
    assert img.size == (32, 32) == (a.data["width"], a.data["height"]) and img.mode == "RGB"
    assert a.data["target"] == {"index": 4, "label": "thing 4"}
    assert a.data["layer"] == "conv2" and a.data["view"] == "overlay"
    assert (a.data["forward_passes"], a.data["backward_passes"]) == (1, 1)
    assert a.data["passes"].startswith("1 forward") and a.data["seconds"] >= 0


def test_explain_options_are_typed_by_the_registry(client):
    a = client.get("/api/explain?image=sample:coffee&method=integrated_gradients&opt.steps=3&opt.baseline=zero&target=thing%202")
    assert a.status == 200, a.data
    assert a.data["options"]["steps"] == 3 and a.data["options"]["baseline"] == "zero"
    assert a.data["target"]["index"] == 2 and a.data["view"] == "heatmap"
    assert "completeness_error" in a.data["extras"]
    m = client.get("/api/explain?image=sample:coffee&method=saliency&view=mask&threshold=0.7")
    assert m.status == 200 and decode(m.data["image"]).size == (32, 32)


def test_layer_views(client):
    maps = client.get("/api/activations?image=sample:chelsea&layer=conv1&max=4&sort=mean")
    assert maps.status == 200 and maps.data["channels"] == 8 and maps.data["shown"] == 4
    decode(maps.data["image"])
    ch = client.get("/api/channels?image=sample:chelsea&layer=conv2&top=3")
    assert ch.status == 200 and ch.data["channels"] == 16 and len(ch.data["means"]) == 16
    top = ch.data["top"]
    assert len(top) == 3 and top[0]["mean"] == max(ch.data["means"])
    f = client.get("/api/filters?layer=conv2&max=4")
    assert f.status == 200 and f.data["filters"] == 16 and "conv2" in f.data["summary"]
    decode(f.data["image"])
    assert client.get("/api/filters").data["layer"] == "conv1"  # default: the first convolution


def test_visualize_renders_and_caps(client):
    a = client.get("/api/visualize?objective=conv2:3&steps=4&size=32&seed=1")
    assert a.status == 200, a.data
    assert decode(a.data["image"]).size == (32, 32) and a.data["steps"] == 4
    over = client.get("/api/visualize?objective=conv2:3&steps=257")
    assert over.status == 400 and "in 1..256" in over.data["error"]
    big = client.get("/api/visualize?objective=conv2:3&size=500")
    assert big.status == 400 and "in 16..224" in big.data["error"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/explain?image=sample:chelsea&method=gradkam", "unknown attribution method 'gradkam'"),
        ("/api/explain?image=sample:chelsea&method=gradcam&layer=conv9", "unknown layer 'conv9'"),
        ("/api/explain?image=sample:chelsea&target=10", "out of range"),
        ("/api/explain?image=sample:chelsea&target=-1", "out of range"),
        ("/api/explain?image=sample:chelsea&method=saliency&opt.steps=3", "has no option 'steps'"),
        ("/api/explain?image=sample:chelsea&method=integrated_gradients&opt.steps=many", "must be an int"),
        ("/api/explain?image=sample:chelsea&method=integrated_gradients&opt.steps=1000000",
         "option 'steps' of 'integrated_gradients' must be an int in 1..4096"),
        ("/api/explain?image=sample:chelsea&method=smoothgrad&opt.noise=nan", "option 'noise' of 'smoothgrad' must be a finite"),
        ("/api/explain?image=sample:chelsea&method=smoothgrad&opt.seed=99999999999999999999999",
         "option 'seed' of 'smoothgrad' must be an int in 0..4294967295"),
        ("/api/explain?image=sample:chelsea&method=saliency&opt.batch_size=0", "must be an int in 1..4096"),
        ("/api/explain?image=sample:chelsea&alpha=2", "option 'alpha' must be a float in 0..1"),
        ("/api/explain?image=sample:chelsea&view=sideways", "view must be one of"),
        ("/api/predict?image=sample:kitten", "unknown sample image 'kitten'"),
        ("/api/predict?image=0123456789abcdef", "unknown image id"),
        ("/api/predict", "missing query parameter 'image'"),
        ("/api/predict?image=sample:chelsea&top=two", "option 'top' must be an int"),
        ("/api/predict?image=sample:chelsea&top=0", "option 'top' must be an int in 1..100"),
        ("/api/activations?image=sample:chelsea&layer=fc", "not feature maps"),
        ("/api/filters?layer=relu1", "not a Conv2d"),
        ("/api/visualize?objective=conv2:3@@", "objective"),
    ],
)
def test_bad_input_is_a_one_line_400(client, path, message):
    a = client.get(path)
    assert a.status == 400, a.data
    assert set(a.data) == {"error"}
    assert message in a.data["error"] and "\n" not in a.data["error"] and "Traceback" not in a.data["error"]


@pytest.mark.parametrize("body", [b"not an image at all", png_bytes()[:60], b"\x80\x04\x95pickle"], ids=["text", "truncated", "pickle"])
def test_corrupt_upload_is_a_400(client, body):
    a = client.post("/api/image", body)
    assert a.status == 400
    assert a.data["error"].startswith("upload: ") and "\n" not in a.data["error"]
    assert "/tmp" not in a.data["error"] and "convscope-upload" not in a.data["error"]


def test_uploads_never_touch_the_disk(client, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise AssertionError("the server wrote a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert client.post("/api/image", png_bytes(seed=5)).status == 200
    assert client.post("/api/image", b"not an image at all").status == 400


def test_empty_upload_is_a_400(client):
    a = client.post("/api/image", b"")
    assert a.status == 400 and "empty upload" in a.data["error"]


def test_unknown_paths_and_methods(client):
    for path in ("/api/nothing", "/nothing", "/static/secret.py", "/static/../api.py"):
        a = client.get(path)
        assert a.status == 404 and "error" in a.data, path
    a = client.post("/api/predict?image=sample:chelsea", b"x")
    assert a.status == 405 and "GET" in a.data["error"]
    assert client.post("/api/nowhere", b"x").status == 404
    assert client.request("/api/info", method="DELETE").status == 405


def test_oversize_upload_is_a_413(client):
    a = client.post("/api/image", b"\0" * (MAX_UPLOAD_BYTES + 1))
    assert a.status == 413 and "over the limit" in a.data["error"]


def test_upload_limit_and_image_store_are_configurable(tiny):
    s = make_server(tiny, port=0, quiet=True, max_upload=2000, max_images=2)
    s.start()
    try:
        c = Client(s.url)
        assert c.post("/api/image", b"\0" * 2001).status == 413
        ids = [c.post("/api/image", png_bytes(8, 8, seed=i)).data["id"] for i in range(3)]
        assert c.get(f"/api/predict?image={ids[0]}").status == 400  # dropped: least recently used
        assert c.get(f"/api/predict?image={ids[2]}").status == 200
    finally:
        s.stop()


def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status == 200 and b"convscope" in page.data and b"/static/app.js" in page.data
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    js = client.get("/static/app.js")
    assert js.status == 200 and js.headers["Content-Type"].startswith("text/javascript") and b"/api/jobs" in js.data
    assert client.get("/static/style.css").status == 200
    for data in (page.data, js.data):
        text = data.replace(b"http://www.w3.org/2000/svg", b"")  # the SVG namespace is a name, not a fetch
        assert b"http://" not in text and b"https://" not in text and b"//cdn" not in text  # nothing external


def test_binds_to_localhost_by_default(tiny):
    s = make_server(tiny, port=0, quiet=True)
    try:
        assert s.server_address[0] == "127.0.0.1" and s.url == f"http://127.0.0.1:{s.port}/?token={s.token}"
        other = make_server(tiny, port=0, quiet=True)
        other.server_close()
        assert len(s.token) >= 32 and s.token != other.token  # random per launch
    finally:
        s.server_close()
    from convscope.cli.main import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_model_is_untouched_by_requests(client, tiny):
    before = statecheck.snapshot(tiny.module)
    for path in (
        "/api/explain?image=sample:chelsea&method=gradcam",
        "/api/explain?image=sample:chelsea&method=guided_backprop",
        "/api/explain?image=sample:chelsea&method=occlusion&opt.window=16&opt.stride=16",
        "/api/explain?image=sample:chelsea&method=gradcam&layer=nowhere",
        "/api/activations?image=sample:chelsea&layer=relu1",
        "/api/channels?image=sample:chelsea&layer=relu2",
        "/api/filters?layer=conv1",
        "/api/visualize?objective=relu2:1&steps=3&size=32",
    ):
        client.get(path)
    statecheck.assert_untouched(tiny.module, before)


def test_concurrent_requests_are_serialised(client):
    results: list[int] = []

    def call(i: int) -> None:
        method = ("gradcam", "saliency", "layercam", "guided_backprop")[i % 4]
        results.append(client.get(f"/api/explain?image=sample:chelsea&method={method}").status)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 8


def test_stop_leaves_no_thread_running():
    s = make_server(tiny_model(), port=0, quiet=True)
    s.start()
    c = Client(s.url)
    assert c.get("/api/predict?image=sample:chelsea").status == 200
    mine = [t for t in threading.enumerate() if t.name == f"convscope-server-{s.port}"]
    assert len(mine) == 1
    s.stop()
    assert s.threads() == [] and not mine[0].is_alive()
    assert [t for t in threading.enumerate() if t.name.endswith(f"-{s.port}")] == []
    with pytest.raises(OSError):
        Client(s.url).get("/api/info")


def test_foreign_host_header_is_refused(client):
    """A DNS-rebinding page would reach 127.0.0.1 under its own host name: refused with a 403."""
    import http.client
    import urllib.parse

    port = urllib.parse.urlsplit(client.url).port
    for host, expected in ((f"evil.example:{port}", 403), (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("GET", "/api/info", skip_host=True)
        conn.putheader("Host", host)
        conn.putheader("X-Convscope-Token", client.token)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == expected, (host, body[:200])
        if expected == 403:
            assert b"own name" in body


def test_a_class_name_with_a_space_gets_a_quoting_hint(client):
    a = client.get("/api/visualize?objective=logit:thing%203&steps=2&size=32")
    assert a.status == 400 and 'class names with spaces need quotes: logit:"thing 3"' in a.data["error"]
    ok = client.get('/api/visualize?objective=logit:%22thing%203%22&steps=2&size=32')
    assert ok.status == 200, ok.data


def test_completeness_advice():
    from convscope.server.api import completeness_advice

    assert completeness_advice(0.01, {"steps": 32}) == ""
    assert "raise steps (try 16)" in completeness_advice(0.32, {"steps": 4})
    assert "raise max_steps (now 512" in completeness_advice(0.32, {"steps": None, "max_steps": 512})
