"""``convscope explain``: one method, a mask, options, the method list, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convscope.attribution import METHODS, method_names
from convscope.cli.main import main


def test_explain_gradcam_writes_an_overlay(tmp_path, capsys):
    out = tmp_path / "cam.png"
    assert main(["explain", "sample:chelsea", "--method", "gradcam", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "gradcam at bn2: class 282 (tiger cat), 1 forward + 1 backward" in captured.err
    img = Image.open(out)
    assert img.size == (224, 224) and img.mode == "RGB"


def test_explain_with_options_and_target(tmp_path, capsys):
    out = tmp_path / "ig.png"
    code = main(["explain", "sample:chelsea", "--method", "integrated_gradients", "--option", "steps=4",
                 "--option", "baseline=zero", "--target", "tabby", "-o", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "class 281 (tabby" in err and "6 forward + 4 backward" in err and "completeness error" in err
    assert out.exists()


def test_explain_says_the_integrated_gradients_error_steps_and_cap(tmp_path, capsys):
    out = tmp_path / "ig.png"
    code = main(["explain", "sample:chelsea", "--method", "integrated_gradients", "--option", "max_steps=9",
                 "--option", "tolerance=0", "--no-progress", "-o", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "completeness error" in err and "at 9 steps" in err and "11 forward + 9 backward" in err
    assert "warning: integrated gradients reached max_steps=9 with completeness error" in err


def test_explain_deconvnet_notes_the_missing_max_pooling(tmp_path, capsys):
    assert main(["explain", "sample:rocket", "--method", "deconvnet", "-o", str(tmp_path / "d.png")]) == 0
    assert "warning: the model has no max-pooling, so DeconvNet projections do not depend on the image" in capsys.readouterr().err


def test_explain_mask_keeps_the_important_region(tmp_path):
    out = tmp_path / "mask.png"
    assert main(["explain", "sample:chelsea", "--method", "gradcam", "--mask", "--threshold", "0.6", "-o", str(out)]) == 0
    pixels = np.asarray(Image.open(out))
    black = (pixels == 0).all(axis=2).mean()
    assert 0.2 < black < 0.95  # part of the image removed, part kept


def test_explain_list_shows_every_method_with_options(capsys):
    assert main(["explain", "--list"]) == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert name in out
    assert "steps=None" in out and "tolerance=0.05" in out and "max_steps=512" in out and "samples=25" in out
    assert METHODS["scorecam"].passes in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "gradkam"], "unknown attribution method 'gradkam'; did you mean gradcam"),
        (["--method", "gradcam", "--layer", "classifier"], "CAM methods need a spatial layer"),
        (["--method", "gradcam", "--target", "1000"], "out of range"),
        (["--method", "saliency", "--option", "steps=3"], "has no option 'steps'"),
        (["--method", "integrated_gradients", "--option", "steps=many"], "must be an int"),
        (["--method", "integrated_gradients", "--option", "steps=0"],
         "option 'steps' of 'integrated_gradients' must be an int in 1..4096, got 0"),
        (["--method", "smoothgrad", "--option", "noise=nan"], "option 'noise' of 'smoothgrad' must be a finite number"),
        (["--method", "gradcam", "--threshold", "2", "--mask"], "argument --threshold: must be a float in 0..1"),
        (["--method", "gradcam", "--alpha", "-1"], "argument --alpha: must be a float in 0..1, got -1.0"),
    ],
)
def test_explain_bad_usage_is_one_line_exit_2(argv, message, capsys, tmp_path):
    try:
        code = main(["explain", "sample:chelsea", *argv, "-o", str(tmp_path / "x.png")])
    except SystemExit as exc:  # argparse's own errors (--alpha, --threshold)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("convscope: error:")]
    assert len(lines) == 1 and message in lines[0]


@pytest.mark.parametrize(("name", "needle"), [
    ("out.xyz", "'.xyz'; use one of .png"),
    ("folder.png", "is a directory"),
    ("file.txt/out.png", "is not a folder"),
])
def test_explain_checks_the_output_path_before_the_work(tmp_path, capsys, monkeypatch, name, needle):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    import convscope.cli.cmd_explain as cmd

    monkeypatch.setattr(cmd, "load_model_from_args", lambda args: pytest.fail("the model was loaded"))
    assert main(["explain", "sample:chelsea", "-o", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder.png"]


def test_explain_no_progress_draws_no_bars(tmp_path, capsys, monkeypatch):
    import convscope.cli.cmd_explain as cmd

    seen = []
    real = cmd.attribute
    monkeypatch.setattr(cmd, "attribute", lambda *a, **k: seen.append(k["progress"]) or real(*a, **k))
    out = tmp_path / "o.png"
    assert main(["explain", "sample:chelsea", "--method", "gradcam", "--no-progress", "-o", str(out)]) == 0
    assert main(["explain", "sample:chelsea", "--method", "gradcam", "-o", str(out)]) == 0
    assert seen == [False, True]


def test_explain_missing_image_file(capsys):
    assert main(["explain", "/no/such/picture.jpg"]) == 2
    assert "convscope: error:" in capsys.readouterr().err


def test_explain_all_makes_a_labelled_grid(tmp_path, capsys, monkeypatch):
    """--method all walks the registry (here cut to four methods to stay fast) with preview settings."""
    import convscope.cli.cmd_explain as cmd

    monkeypatch.setattr(cmd, "method_names", lambda: ["saliency", "gradcam", "eigencam", "occlusion"])
    out = tmp_path / "all.png"
    assert main(["explain", "sample:chelsea", "--method", "all", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "preview settings (fewer passes) for: occlusion (window=16, stride=8)" in err
    grid = Image.open(out)
    assert grid.size[0] > 224 * 5  # input + 4 methods in one row
    cells = np.asarray(grid)
    assert cells.std() > 20


def test_explain_subprocess(tmp_path):
    out = tmp_path / "sal.png"
    proc = subprocess.run(
        [sys.executable, "-m", "convscope", "explain", "sample:coffee", "--method", "saliency", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "class 967 (espresso)" in proc.stderr
    assert Image.open(out).size == (224, 224)


@pytest.mark.slow
def test_explain_all_subprocess_grid(tmp_path):
    """--method all as a user runs it, on a random-weight resnet18 (fast): a labelled grid of every method."""
    out = tmp_path / "all.png"
    proc = subprocess.run(
        [sys.executable, "-m", "convscope", "explain", "sample:coffee", "--method", "all", "--model", "resnet18",
         "--weights", "none", "-o", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "preview settings (fewer passes)" in proc.stderr
    for name in method_names():
        assert f"\n{name}" in "\n" + proc.stderr
    grid = Image.open(out)
    assert grid.size[0] > 224 * 5 and grid.size[1] > 224 * 3
