"""The explorer against hostile pages and clients: cross-site requests, the token, idle connections,
decompression-bomb uploads, the Host check on a wildcard address, bad option values, multipart uploads
and uploads kept per client."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serverkit import Client, png_bytes

from convscope.server import make_server

HERE = Path(__file__).parent


def raw_request(port: int, lines: list[str], body: bytes = b"") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def test_cross_site_requests_are_refused(client):
    body = png_bytes(seed=11)
    port = urllib.parse.urlsplit(client.url).port
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "null"}):
        a = client.request("/api/image", body=body, method="POST", headers=headers)
        assert a.status == 403 and "cross-site request refused" in a.data["error"], headers
        assert client.request("/api/info", headers=headers).status == 403
    ok = client.request("/api/image", body=body, method="POST",
                        headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})
    assert ok.status == 200, ok.data


def test_the_api_needs_the_token_and_the_page_does_not(server):
    no_token = Client(server.base_url, token="")
    a = no_token.get("/api/info")
    assert a.status == 403 and "token" in a.data["error"]
    assert Client(server.base_url, token="wrong" * 8).get("/api/info").status == 403
    assert no_token.post("/api/image", png_bytes()).status == 403
    assert no_token.get(f"/api/info?token={server.token}").status == 200  # for curl
    page = no_token.get("/")
    assert page.status == 200 and b"convscope" in page.data  # the page holds no data; it reads the token from its URL
    assert no_token.get("/static/app.js").status == 200


def test_a_silent_connection_is_closed_after_the_timeout_while_the_page_answers(tiny):
    s = make_server(tiny, port=0, quiet=True, request_timeout=1.0)
    s.start()
    try:
        silent = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(300)]
        half = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        half.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes its head
        c = Client(s.url)
        start = time.perf_counter()
        assert c.get("/").status == 200 and c.get("/api/info").status == 200
        assert time.perf_counter() - start < 2.0
        time.sleep(1.6)
        for conn in [*silent, half]:
            assert conn.recv(1) == b""  # closed by the server
            conn.close()
        assert c.get("/api/info").status == 200
    finally:
        s.stop()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 16-bit 7000x7000 PNG: about 100 KB on disk, about 100 MB as 16-bit pixels, far more as RGB floats."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((7000, 7000), dtype=np.uint16)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def test_a_16_bit_7000px_png_is_refused_before_decoding(client, bomb):
    assert len(bomb) < 300_000
    a = client.post("/api/image", bomb)
    assert a.status == 413 and "7000x7000" in a.data["error"] and "scale it down" in a.data["error"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc for the server's peak memory")
def test_16_parallel_bomb_uploads_stay_under_a_memory_cap(bomb):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r}); sys.path.insert(0, {str(HERE.parent)!r})
        from serverkit import tiny_model
        from convscope.server import make_server
        s = make_server(tiny_model(), port=0, quiet=True)
        s.start()
        print(s.url, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        status = Path(f"/proc/{proc.pid}/status")

        def kib(field: str) -> int:
            line = next(x for x in status.read_text().splitlines() if x.startswith(field + ":"))
            return int(line.split()[1])

        c = Client(url)
        assert c.post("/api/image", png_bytes()).status == 200  # warm: one real decode
        before = kib("VmRSS")
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/api/image", bomb).status)) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        grown_mib = (kib("VmHWM") - before) / 1024
        assert results == [413] * 16
        assert grown_mib < 300, f"peak memory grew by {grown_mib:.0f} MiB"  # unguarded: over 1 GiB per upload
    finally:
        proc.kill()
        proc.wait()


def test_host_check_stays_on_a_wildcard_address(tiny):
    s = make_server(tiny, host="0.0.0.0", port=0, quiet=True, allow_hosts=["explorer.lan"])
    s.start()
    try:
        for host, expected in (("evil.example", 403), ("explorer.lan", 200), ("localhost", 200), ("10.1.2.3", 200)):
            status, body = raw_request(s.port, ["GET /api/info HTTP/1.1", f"Host: {host}:{s.port}",
                                                f"X-Convscope-Token: {s.token}", "Connection: close"])
            assert status == expected, (host, body[:200])
        status, body = raw_request(s.port, ["GET /api/info HTTP/1.1", f"Host: evil.example:{s.port}", "Connection: close"])
        assert b"--allow-host" in body
    finally:
        s.stop()


@pytest.mark.parametrize(("query", "message"), [
    ("method=integrated_gradients&opt.steps=1000000", "option 'steps' of 'integrated_gradients' must be an int in 1..4096"),
    ("method=smoothgrad&opt.noise=nan", "option 'noise' of 'smoothgrad' must be a finite"),
    ("method=smoothgrad&opt.seed=99999999999999999999999", "must be an int in 0..4294967295"),
])
def test_bad_option_values_in_a_job_are_a_400_with_the_range(client, query, message):
    a = client.post(f"/api/jobs?kind=explain&image=sample:chelsea&{query}", b"")
    assert a.status == 202
    job = a.data["id"]
    for _ in range(200):
        j = client.get(f"/api/jobs/{job}").data
        if j["status"] not in ("queued", "running"):
            break
        time.sleep(0.02)
    assert j["status"] == "error" and j["status_code"] == 400 and message in j["error"]
    big_seed = client.get("/api/visualize?objective=conv2:1&steps=2&size=32&seed=99999999999999999999")
    assert big_seed.status == 400 and "in 0..2147483647" in big_seed.data["error"]


def multipart(field: str, filename: str | None, data: bytes) -> tuple[bytes, str]:
    boundary = "convscopeBoundary7MA4YWxk"
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_multipart_uploads_are_accepted(client):
    data = png_bytes(24, 20, seed=21)
    body, ctype = multipart("file", "x.png", data)
    a = client.request("/api/image", body=body, method="POST", content_type=ctype)
    assert a.status == 200, a.data
    assert (a.data["width"], a.data["height"]) == (24, 20)
    assert a.data["id"] == client.post("/api/image", data).data["id"]  # the same picture either way
    body, ctype = multipart("note", None, b"hello")
    b = client.request("/api/image", body=body, method="POST", content_type=ctype)
    assert b.status == 400 and "-F file=@" in b.data["error"]


def test_uploads_are_kept_per_client(server):
    alice, bob = Client(server.url, client="alice"), Client(server.url, client="bob")
    image = alice.post("/api/image", png_bytes(seed=31)).data["id"]
    assert alice.get(f"/api/predict?image={image}").status == 200
    a = bob.get(f"/api/predict?image={image}")
    assert a.status == 400 and "unknown image id" in a.data["error"]
    for i in range(16):  # alice's store is full and drops the oldest, and says so
        alice.post("/api/image", png_bytes(8, 8, seed=100 + i))
    gone = alice.get(f"/api/predict?image={image}")
    assert gone.status == 400 and "dropped to make room" in gone.data["error"]


def test_decoding_is_bounded_by_a_semaphore(client, monkeypatch):
    import convscope.server.api as api

    real, active, peak, lock = api.decode_image, [0], [0], threading.Lock()

    def slow_decode(data):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)
            return real(data)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(api, "decode_image", slow_decode)
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda i=i: statuses.append(client.post("/api/image", png_bytes(seed=200 + i)).status))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 8 and peak[0] == api.MAX_PARALLEL_DECODES == 2


def test_a_stalled_upload_is_cut_off(server, monkeypatch):
    import convscope.server.app as app

    monkeypatch.setattr(app, "BODY_TIMEOUT", 0.5)
    start = time.perf_counter()
    status, body = raw_request(server.port, ["POST /api/image HTTP/1.1", "Host: 127.0.0.1", f"X-Convscope-Token: {server.token}",
                                             "Content-Length: 1000", "Connection: close"], b"\x89PNG")
    assert status == 408 and b"stalled" in body and time.perf_counter() - start < 5
