"""``convscope serve`` as a process: prints its URL, answers, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from serverkit import Client

from convscope.cli.main import main


def test_serve_prints_its_url_and_stops_on_ctrl_c():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "convscope", "serve", "--port", "0", "--model", "resnet18", "--weights", "none", "--quiet"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line or line.startswith("convscope: serving"):
                break
        match = re.fullmatch(r"convscope: serving (http://127\.0\.0\.1:(\d+)/\?token=[\w-]{32})\n", line)
        assert match, line
        info = Client(match.group(1)).get("/api/info")
        assert info.status == 200 and info.data["num_classes"] == 1000 and info.data["default_layer"] == "layer4"
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert rest.strip() == "convscope: stopped"


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "70000"], "--port: must be an int in 0..65535, got 70000"),
    (["--port", "http"], "--port: must be an int in 0..65535, got 'http'"),
    (["--max-upload-mb", "0"], "--max-upload-mb: must be a float in 0.001..4096"),
])
def test_bad_port_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_is_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_allow_host_is_repeatable():
    from convscope.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--allow-host", "box.lan", "--allow-host", "gpu.lan"])
    assert (args.host, args.allow_host) == ("0.0.0.0", ["box.lan", "gpu.lan"])
    assert build_parser().parse_args(["serve"]).allow_host == []
