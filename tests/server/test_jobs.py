"""Jobs: ids, progress from the library's own loops, cancel (by request, by a client hanging up, by a page
that stopped asking), a bounded queue, and ``/api/info`` answered while a job runs."""

from __future__ import annotations

import socket
import time

import pytest
from serverkit import Client

from convscope.server import make_server

#: RISE with many small batches: several seconds on the tiny model, a progress step every few ms.
LONG = "/api/jobs?kind=explain&image=sample:chelsea&method=rise&opt.masks=100000&opt.batch_size=8"


def wait(client: Client, job: str, until, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = client.get(f"/api/jobs/{job}").data
        if until(j):
            return j
        time.sleep(0.02)
    raise AssertionError(f"job {job} never reached the state: {j}")


@pytest.fixture
def fresh(tiny):
    s = make_server(tiny, port=0, quiet=True, max_queued=3, abandon_after=1.5)
    s.start()
    yield s
    s.stop()


def test_a_job_reports_progress_and_its_result(client):
    a = client.post("/api/jobs?kind=explain&image=sample:chelsea&method=rise&opt.masks=2000&opt.batch_size=8", b"")
    assert a.status == 202 and a.data["status"] in ("queued", "running") and len(a.data["id"]) == 16
    done = wait(client, a.data["id"], lambda j: j["status"] == "done")
    assert done["total"] == 2000 and done["done"] == 2000 and done["fraction"] == 1.0 and done["stage"] == "rise"
    assert done["result"]["method"] == "rise" and done["result"]["image"].startswith("data:image/png;base64,")


def test_cancel_frees_the_server_within_a_second_and_info_answers_meanwhile(fresh):
    c = Client(fresh.url)
    job = c.post(LONG, b"").data["id"]
    first = wait(c, job, lambda j: j["status"] == "running" and j["done"] > 0)
    start = time.perf_counter()
    assert c.get("/api/info").status == 200 and c.get("/").status == 200
    assert time.perf_counter() - start < 0.5  # not behind the job
    later = wait(c, job, lambda j: j["done"] > first["done"] + 100)
    assert later["total"] == 100_000 and 0 < later["fraction"] < 1  # progress moves
    start = time.perf_counter()
    assert c.request(f"/api/jobs/{job}", method="DELETE").status == 200
    assert c.get("/api/predict?image=sample:chelsea").status == 200  # the model is free again
    assert time.perf_counter() - start < 1.0
    gone = c.get(f"/api/jobs/{job}").data
    assert gone["status"] == "cancelled" and gone["reason"] == "cancelled by the user"


def test_the_queue_is_bounded_and_waiting_jobs_cancel_at_once(fresh):
    c = Client(fresh.url)
    running = c.post(LONG, b"").data["id"]
    wait(c, running, lambda j: j["status"] == "running")
    waiting = [c.post(LONG, b"") for _ in range(3)]
    assert [w.status for w in waiting] == [202] * 3 and [w.data["position"] for w in waiting] == [1, 2, 3]
    full = c.post(LONG, b"")
    assert full.status == 503 and "queue is full" in full.data["error"]
    assert c.post(f"/api/jobs/{waiting[0].data['id']}/cancel", b"").data["status"] == "cancelled"
    assert c.get(f"/api/jobs/{waiting[1].data['id']}").data["position"] == 1
    for j in [running] + [w.data["id"] for w in waiting[1:]]:
        c.request(f"/api/jobs/{j}", method="DELETE")
    assert c.get("/api/jobs").data["queued"] == 0
    assert c.post("/api/jobs?kind=predict", b"").status == 400  # only long calls are jobs


def test_a_job_nobody_asks_about_is_cancelled(fresh):
    c = Client(fresh.url)
    job = c.post(LONG, b"").data["id"]
    time.sleep(3.0)  # abandon_after=1.5: the page went away
    j = c.get(f"/api/jobs/{job}").data
    assert j["status"] == "cancelled" and "nobody asked" in j["reason"]


def test_hanging_up_cancels_a_waiting_request(fresh):
    path = LONG.replace("/api/jobs?kind=explain&", "/api/explain?")
    with socket.create_connection(("127.0.0.1", fresh.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Convscope-Token: {fresh.token}\r\n\r\n".encode())
        time.sleep(0.5)
    c = Client(fresh.url)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and c.get("/api/jobs").data["running"]:
        time.sleep(0.05)
    assert c.get("/api/jobs").data == {"jobs": [], "running": 0, "queued": 0}
    (job,) = fresh.jobs.jobs()
    assert job.status == "cancelled" and job.reason == "the client went away"


def test_a_job_over_its_budget_stops_early_with_an_estimate(client):
    a = client.post(LONG + "&budget=1", b"")
    assert a.status == 202
    start = time.perf_counter()
    j = wait(client, a.data["id"], lambda j: j["status"] not in ("queued", "running"))
    assert j["status"] == "estimate" and j["estimate_seconds"] > 1 and j["budget"] == 1
    assert time.perf_counter() - start < 3  # stopped after its first steps, not run to the end
    assert 0 < j["done"] < j["total"] == 100_000
    quick = client.post("/api/jobs?kind=explain&image=sample:chelsea&method=gradcam&budget=1", b"").data["id"]
    assert wait(client, quick, lambda j: j["status"] == "done")["result"]["method"] == "gradcam"
    assert client.post(LONG + "&budget=0", b"").status == 400
