"""``convscope report``: writes one self-contained HTML file atomically; broken sections only warn."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from convscope.cli import cmd_report
from convscope.report import SECTIONS, Section
from testkit import run_cli as run

MINE = "prediction,model_summary,first_filters,features,channels"


@pytest.fixture(autouse=True)
def fast_model(monkeypatch, builtin):
    real = cmd_report.load_model_from_args
    monkeypatch.setattr(cmd_report, "load_model_from_args", lambda args: builtin if args.model is None else real(args))




def test_report_writes_a_self_contained_file_and_says_where(capsys, tmp_path):
    target = tmp_path / "sub" / "r.html"
    code, out, err = run(capsys, "report", "sample:chelsea", "-o", str(target), "--sections", MINE)
    assert code == 0 and out == ""
    page = target.read_text(encoding="utf-8")
    assert "tiger cat" in page and "data:image/png;base64," in page
    assert "https://" not in page and "http://" not in page
    assert f"report written to {target}" in err and "(5 of 5 sections" in err
    assert [p.name for p in target.parent.iterdir()] == ["r.html"]  # no temporary file left behind


def test_image_defaults_to_chelsea_and_output_to_convscope_report(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run(capsys, "report", "--sections", "prediction", "--top", "2")
    page = (tmp_path / "convscope-report.html").read_text(encoding="utf-8")
    assert code == 0 and "sample:chelsea" in page
    assert page.count("<tr><td class=num>") == 2


def test_list_sections_shows_the_registry(capsys):
    code, out, _ = run(capsys, "report", "--list-sections")
    keys = [line.split()[0] for line in out.splitlines()]
    assert code == 0
    assert [k for k in keys if k in MINE.split(",")] == MINE.split(",")


def test_failed_section_warns_on_stderr_and_still_writes_the_report(capsys, tmp_path, monkeypatch):
    def broken(ctx):
        raise ValueError("cannot draw this")

    monkeypatch.setitem(SECTIONS, "broken", Section("broken", "Broken", 15, broken))
    target = tmp_path / "r.html"
    code, _, err = run(capsys, "report", "-o", str(target), "--sections", "prediction,broken")
    assert code == 0
    assert "convscope: warning: report section 'broken' failed: ValueError: cannot draw this" in err
    assert "(1 of 2 sections" in err
    assert "cannot draw this" in target.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--sections", "prediction,featurez"], "did you mean features"),
        (["--layers", "blocks.9"], "unknown layer 'blocks.9'"),
        (["sample:nothing"], "unknown sample image"),
        (["--top", "0"], "argument --top: must be an int in 1..1000"),
        (["-o", "report.xyz"], "'.xyz'; use one of .html, .htm"),
    ],
)
def test_bad_report_options_are_one_line_errors(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "r.html"
    code, _, err = run(capsys, "report", "-o", str(target), *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_directory_is_an_error(capsys, tmp_path):
    folder = tmp_path / "r.html"
    folder.mkdir()
    code, _, err = run(capsys, "report", "-o", str(folder))
    assert code == 2 and "is a directory" in err
    code, _, err = run(capsys, "report", "-o", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_output_path_is_checked_before_the_work(capsys, tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(cmd_report, "load_model_from_args", lambda args: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "report", "-o", str(tmp_path / "file.txt" / "r.html"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a folder" in err


def test_no_progress_reaches_the_sections(capsys, tmp_path, monkeypatch):
    seen = []
    real = cmd_report.render_report
    monkeypatch.setattr(cmd_report, "render_report", lambda *a, **k: seen.append(k["progress"]) or real(*a, **k))
    code, _, _ = run(capsys, "report", "-o", str(tmp_path / "r.html"), "--sections", "prediction", "--no-progress")
    assert code == 0 and seen == [False]


def test_subprocess_report(tmp_path):
    target = tmp_path / "r.html"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "convscope", "report", "sample:coffee", "-o", str(target), "--sections", "prediction,channels"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "espresso" in target.read_text(encoding="utf-8")
    assert done.stderr.strip().splitlines()[-1].startswith("report written to")
