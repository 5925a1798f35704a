"""The synthesis commands: visualize, dream, invert, texture, style, adversarial, fool."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

import convscope as cs
from convscope.cli.main import main


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_visualize_writes_an_image_and_reports_the_objective(tmp_path, capsys):
    out = tmp_path / "v.png"
    code, text, err = run(["visualize", "blocks.3.0:5", "--steps", "4", "--size", "48", "--seed", "1", "-o", str(out)], capsys)
    assert code == 0 and "objective blocks.3.0:5:" in text and f"wrote {out}" in err
    assert Image.open(out).size == (48, 48)


def test_visualize_channel_gallery(tmp_path, capsys):
    out = tmp_path / "g.png"
    code, text, _ = run(["visualize", "blocks.3.0", "--channels", "0-2", "--steps", "2", "--size", "32", "-o", str(out)], capsys)
    assert code == 0 and text.split("]: ")[1].split("  (")[0].count(",") == 2 and out.exists()


@pytest.mark.parametrize(("objective", "message"), [
    ("blocks.3.0:x", "column 12"),
    ("bn3:1", "did you mean bn2"),
    ("blocks.3.0:99999", "out of range"),
    ("logit:5000", "out of range"),
])
def test_visualize_bad_objectives_exit_2_with_a_clear_error(objective, message, capsys):
    code, _, err = run(["visualize", objective, "--steps", "1", "--size", "32"], capsys)
    assert code == 2 and err.startswith("convscope: error:") and message in err


def test_adversarial_reports_predictions_and_norms(tmp_path, capsys):
    out = tmp_path / "a.png"
    code, text, _ = run(["adversarial", "sample:chelsea", "--target", "386", "--eps", "4/255", "--steps", "10", "-o", str(out)], capsys)
    assert code == 0 and "before: tiger cat" in text and "after:  African elephant" in text
    assert "L-inf 4.00/255" in text and "success" in text and out.exists()


@pytest.mark.parametrize("eps", ["0", "-1/255"])
def test_adversarial_rejects_empty_budgets(eps, capsys):
    code, _, err = run(["adversarial", "sample:chelsea", "--target", "386", f"--eps={eps}"], capsys)
    assert code == 2 and "budget" in err and len(err.strip().splitlines()) == 1


def test_invert_dream_texture_style_fool(tmp_path, capsys):
    inv = tmp_path / "i.png"
    code, text, _ = run(["invert", "sample:chelsea", "--layer", "blocks.1.0", "--layer", "blocks.4.0", "--steps", "3",
                         "--size", "32", "-o", str(inv)], capsys)
    assert code == 0 and "blocks.4.0" in text and "pixel RMSE" in text and Image.open(inv).size[0] > 3 * 32
    for argv in (["dream", "sample:coffee", "--octaves", "1", "--steps", "2", "--size", "32"],
                 ["texture", "sample:brick", "--steps", "3", "--size", "32"],
                 ["style", "sample:chelsea", "sample:brick", "sample:grass", "--style-weights", "1", "2", "--steps", "3", "--size", "32"],
                 ["fool", "385", "--steps", "2", "--size", "32"]):
        out = tmp_path / f"{argv[0]}.png"
        code, text, err = run(argv + ["-o", str(out)], capsys)
        assert code == 0, err
        assert out.exists() and text.strip()


def test_style_weights_must_match_the_styles(capsys):
    code, _, err = run(["style", "sample:chelsea", "sample:brick", "--style-weights", "1", "2", "--steps", "1", "--size", "32"], capsys)
    assert code == 2 and "one non-negative weight per style image" in err


def test_subprocess_syntax_error_exits_2_and_points_at_the_column(tmp_path):
    p = subprocess.run([sys.executable, "-m", "convscope", "visualize", "blocks.3.0:@", "--steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("convscope: error:") and "^" in p.stderr


def test_style_train_then_stylize(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("coffee", "horse"):
        cs.sample_image(name).resize((48, 40)).save(data / f"{name}.png")
    net = tmp_path / "net.pt"
    code, text, err = run(["style-train", "sample:brick", str(data), "--steps", "4", "--size", "32", "--batch-size", "2",
                           "--width", "4", "--blocks", "1", "--checkpoint-every", "2", "-o", str(net)], capsys)
    assert code == 0 and "trained 4 steps" in text and err.count(f"wrote {net}") == 2 and net.exists()
    out = tmp_path / "s.png"
    code, _, err = run(["stylize", "sample:chelsea", "--net", str(net), "--size", "36", "-o", str(out)], capsys)
    assert code == 0 and min(Image.open(out).size) == 36
    code, _, err = run(["stylize", "sample:chelsea", "--net", str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "no such file" in err
