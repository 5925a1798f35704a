"""The ASGI application on its own, through Starlette's TestClient (no sockets): guards and routes."""

from __future__ import annotations

import pytest
from serverkit import png_bytes

from convscope.server import Explorer, JobQueue, build_app

testclient = pytest.importorskip("starlette.testclient")  # needs httpx (the dev extra)


@pytest.fixture(scope="module")
def app_client(tiny):
    explorer = Explorer(tiny)
    jobs = JobQueue(lambda job: (200, {}), name="convscope-jobs-testclient")
    app = build_app(explorer, jobs, token="s3cret", allowed_hosts={"testserver", "localhost"}, quiet=True)
    with testclient.TestClient(app, base_url="http://testserver") as c:
        yield c
    jobs.close()


def test_token_host_and_origin_guards(app_client):
    assert app_client.get("/api/info").status_code == 403
    ok = app_client.get("/api/info", headers={"X-Convscope-Token": "s3cret"})
    assert ok.status_code == 200 and ok.json()["num_classes"] == 10
    assert ok.headers["cache-control"] == "no-store" and ok.headers["x-content-type-options"] == "nosniff"
    evil = app_client.get("/api/info", headers={"X-Convscope-Token": "s3cret", "Host": "evil.example"})
    assert evil.status_code == 403 and "own name" in evil.json()["error"]
    cross = app_client.post("/api/image", content=png_bytes(), headers={"X-Convscope-Token": "s3cret",
                                                                        "Origin": "http://evil.example"})
    assert cross.status_code == 403 and "cross-site" in cross.json()["error"]
    page = app_client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]


def test_multipart_through_the_app(app_client):
    r = app_client.post("/api/image", files={"file": ("x.png", png_bytes(12, 10), "image/png")},
                        headers={"X-Convscope-Token": "s3cret"})
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (12, 10)
    bad = app_client.post("/api/jobs?kind=predict", headers={"X-Convscope-Token": "s3cret"})
    assert bad.status_code == 400 and "kind must be one of explain, visualize" in bad.json()["error"]
