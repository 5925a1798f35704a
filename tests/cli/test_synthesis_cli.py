"""The synthesis commands: visualize, dream, invert, texture, style, style-train, stylize, adversarial, fool."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from PIL import Image

import convscope as cs
from convscope.cli import cmd_synthesis
from convscope.cli.main import build_parser
from testkit import run_cli

COMMANDS = ["visualize", "dream", "invert", "texture", "style", "style-train", "stylize", "adversarial", "fool"]
#: the positional arguments each command needs, so that only the option under test can be wrong
POSITIONAL = {"visualize": ["blocks.3.0:1"], "dream": ["sample:coffee"], "invert": ["sample:coffee", "--layer", "blocks.1.0"],
              "texture": ["sample:brick"], "style": ["sample:coffee", "sample:brick"], "style-train": ["sample:brick", "."],
              "stylize": ["sample:coffee", "--net", "net.pt"], "adversarial": ["sample:coffee"], "fool": ["1"]}


def run(argv, capsys):
    return run_cli(capsys, *argv)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in COMMANDS}


def test_the_command_table_covers_every_synthesis_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ours = {name for name, p in sub.choices.items()
            if getattr(p.get_default("func"), "__module__", "") == cmd_synthesis.__name__}
    assert ours == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command):
    for action in _subparsers()[command]._actions:
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest} has no help"


def test_style_train_output_is_a_network_file():
    helps = {a.dest: a.help for a in _subparsers()["style-train"]._actions}
    assert "network" in helps["output"] and "image" not in helps["output"]


NUMERIC = [(c, "--size", v) for c in COMMANDS for v in ("0", "-1", "30000", "x")] + [
    (c, "--steps", v) for c in COMMANDS if c != "stylize" for v in ("0", "-5", "10000000")] + [
    (c, "--seed", "-1") for c in COMMANDS if c != "stylize"] + [
    ("visualize", "--lr", "0"), ("visualize", "--lr", "nan"), ("visualize", "--batch", "0"), ("visualize", "--blur", "0"),
    ("visualize", "--diversity", "-1"), ("dream", "--octaves", "0"), ("dream", "--octave-scale", "0.5"),
    ("dream", "--jitter", "-1"), ("dream", "--step-size", "0"), ("invert", "--tv", "-1"), ("invert", "--alpha-weight", "inf"),
    ("style", "--style-weight", "-1"), ("style", "--content-weight", "nan"), ("style-train", "--batch-size", "0"),
    ("style-train", "--lr", "-1"), ("style-train", "--width", "0"), ("style-train", "--checkpoint-every", "0"),
    ("adversarial", "--eps", "0"), ("adversarial", "--eps", "inf"), ("fool", "--confidence", "1"), ("fool", "--confidence", "0")]


@pytest.mark.parametrize(("command", "option", "value"), NUMERIC)
def test_numeric_options_out_of_range_exit_2_with_one_line(command, option, value, capsys):
    code, _, err = run([command, *POSITIONAL[command], f"{option}={value}"], capsys)
    assert code == 2 and err.startswith("convscope: error:") and len(err.strip().splitlines()) == 1
    assert option in err


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_output_paths_exit_2_before_any_work_and_leave_nothing(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    good = ".pt" if command == "style-train" else ".png"
    for out in ("out.xyz", "folder.png", f"file/out{good}"):
        code, _, err = run([command, *POSITIONAL[command], "-o", out, "--model", "no-such-model"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and out.split("/")[0] in err, (out, err)
    if command == "style-train":
        code, _, err = run([command, *POSITIONAL[command], "-o", "net.png"], capsys)
        assert code == 2 and ".pt, .pth" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_visualize_channels_beyond_the_layer_name_the_range(tmp_path, capsys):
    out = tmp_path / "g.png"
    code, _, err = run(["visualize", "blocks.3.0", "--channels", "0,5000", "--steps", "1", "--size", "32", "-o", str(out)], capsys)
    assert code == 2 and "channel 5000 is out of range" in err and "(0.." in err and not out.exists()
    code, _, err = run(["visualize", "blocks.3.0", "--channels", "0-100000", "--steps", "1"], capsys)
    assert code == 2 and "at most 1024 channels" in err


def _interrupt_third_adam_step(monkeypatch):
    step = torch.optim.Adam.step
    calls = {"n": 0}

    def interrupted_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted_step)


def test_ctrl_c_keeps_the_picture_and_exits_130(tmp_path, capsys, monkeypatch):
    _interrupt_third_adam_step(monkeypatch)
    out = tmp_path / "v.png"
    code, text, err = run(["visualize", "blocks.3.0:5", "--steps", "400", "--size", "32", "-o", str(out)], capsys)
    assert code == 130 and "interrupted" in err and f"wrote {out}" in err
    assert "(2 steps" in text and Image.open(out).size == (32, 32)


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


def test_ctrl_c_during_style_training_keeps_the_network_and_exits_130(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    cs.sample_image("coffee").resize((40, 40)).save(data / "coffee.png")
    _interrupt_third_adam_step(monkeypatch)
    net = tmp_path / "net.pt"
    code, text, err = run(["style-train", "sample:brick", str(data), "--steps", "50", "--size", "32", "--batch-size", "1",
                           "--width", "2", "--blocks", "0", "-o", str(net)], capsys)
    assert code == 130 and "trained 2 steps" in text and "(interrupted)" in text and net.exists()
    assert torch.load(net, weights_only=True)["steps"] == 2


def test_texture_accepts_another_loss_network(tmp_path, capsys):
    # issue 11 item 4: Gatys et al. used VGG-19; weights cannot be downloaded here, so random ones
    out = tmp_path / "t.png"
    code, text, err = run(["texture", "sample:brick", "--loss-net", "vgg19:random", "--steps", "2", "--size", "32",
                           "-o", str(out)], capsys)
    assert code == 0, err
    assert out.exists() and "style loss" in text


def test_average_pooling_copy_for_the_loss_network(tmp_path, capsys):
    # Gatys et al. swapped VGG-19's max-pooling for average pooling; a copy, the model itself untouched
    from torch import nn

    import statecheck
    from convscope.synthesis.style import average_pooling

    vgg = cs.load_model("vgg11", weights=None)
    before = statecheck.snapshot(vgg.module)
    avg = average_pooling(vgg)
    statecheck.assert_untouched(vgg.module, before)
    assert not any(isinstance(m, nn.MaxPool2d) for m in avg.module.modules())
    assert sum(isinstance(m, nn.AvgPool2d) for m in avg.module.modules()) == 5
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.module.modules()) == 5
    x = torch.rand(1, 3, 32, 32)
    pooled = avg.module.features[:3](x)  # conv, relu, then the replaced pooling
    assert torch.allclose(pooled, nn.functional.avg_pool2d(vgg.module.features[:2](x), 2))
    out = tmp_path / "t.png"
    code, text, err = run(["texture", "sample:brick", "--loss-net", "vgg11:random", "--avg-pool", "--steps", "2",
                           "--size", "32", "-o", str(out)], capsys)
    assert code == 0, err
    assert out.exists()
