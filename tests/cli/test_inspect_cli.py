"""The inspection commands: summary, predict, filters, activations, channels; and their bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from PIL import Image
from torch import nn

from convscope.cli import cmd_inspect
from testkit import run_cli as run


@pytest.fixture(autouse=True)
def fast_model(monkeypatch, builtin):
    """Reuse the session's built-in model when the command asks for it; other sources load for real."""
    real = cmd_inspect.load_model_from_args

    def load(args):
        if args.model is None and args.device is None:
            return builtin
        return real(args)

    monkeypatch.setattr(cmd_inspect, "load_model_from_args", load)




def test_summary_prints_the_table_and_totals(capsys, builtin):
    code, out, _ = run(capsys, "summary", "--depth", "1")
    assert code == 0
    total = sum(p.numel() for p in builtin.module.parameters())
    assert f"Total params: {total:,}" in out
    lines = out.splitlines()
    assert lines[2].split() == ["Layer", "Type", "Output", "shape", "Params", "Trainable", "Receptive", "field"]
    assert [line.split()[0] for line in lines[4:11]] == ["conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"]


def test_summary_json_and_leaves(capsys, builtin):
    code, out, _ = run(capsys, "summary", "--leaves", "--json")
    data = json.loads(out)
    assert code == 0 and data["total_params"] == sum(p.numel() for p in builtin.module.parameters())
    assert all(row["leaf"] for row in data["layers"])
    stem = data["layers"][0]
    assert stem["name"] == "conv_stem" and stem["receptive_field"] == [3, 3] and stem["stride"] == [2, 2]


def test_predict_prints_a_table_of_top_classes(capsys):
    code, out, _ = run(capsys, "predict", "sample:chelsea", "--top", "3")
    assert code == 0
    rows = out.splitlines()[2:]
    assert len(rows) == 3
    assert rows[0].split()[1:3] == ["tiger", "cat"] and "282" in rows[0]


def test_predict_json_matches_the_api(capsys, builtin):
    code, out, _ = run(capsys, "predict", "sample:coffee", "--json")
    data = json.loads(out)
    api = builtin.predict(builtin.preprocess("sample:coffee"), top=5)[0]
    assert code == 0 and [p["index"] for p in data["predictions"]] == api.indices
    assert data["predictions"][0]["label"] == "espresso"
    assert [p["probability"] for p in data["predictions"]] == pytest.approx(api.probabilities)


def test_filters_writes_the_picture_and_reports_norms(capsys, tmp_path, builtin):
    out_file = tmp_path / "f.png"
    code, out, err = run(capsys, "filters", "-o", str(out_file))
    assert code == 0
    from convscope.inspect import filters

    fs = filters(builtin)
    assert Image.open(out_file).size == fs.image.size
    assert out.startswith("conv_stem (Conv2dSame): 32 filters of 3x3x3")
    assert f"dead filters: {len(fs.dead)}" in out
    assert str(out_file) in err


def test_default_output_names_are_announced(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "filters", "blocks.0.0.conv_dw", "--max-filters", "8")
    assert code == 0 and (tmp_path / "filters-blocks.0.0.conv_dw.png").is_file()
    assert "filters-blocks.0.0.conv_dw.png" in err
    code, _, err = run(capsys, "channels", "sample:chelsea", "--top", "2")
    assert code == 0 and (tmp_path / "channels-chelsea-bn2.png").is_file()


def test_activations_grid_for_a_layer(capsys, tmp_path):
    out_file = tmp_path / "a.png"
    code, out, err = run(capsys, "activations", "sample:chelsea", "--layer", "blocks.2", "--max-channels", "16", "--sort", "mean", "-o", str(out_file))
    assert code == 0
    assert out.startswith("blocks.2: 40 channels of 28x28")
    w, h = Image.open(out_file).size
    assert w == 8 * (48 + 4) + 4  # 16 maps of 28x28 in 48 px cells, 8 columns
    assert "feature maps written to" in err


def test_channels_lists_the_top_channels_of_the_api(capsys, tmp_path, builtin):
    code, out, _ = run(capsys, "channels", "sample:chelsea", "--layer", "bn2", "--top", "3", "-o", str(tmp_path / "c.png"))
    assert code == 0
    from convscope.inspect import channel_means

    top = channel_means(builtin, builtin.preprocess("sample:chelsea"), "bn2").top(3)
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [int(r[1]) for r in rows] == [c for c, _ in top]
    assert [float(r[2]) for r in rows] == pytest.approx([v for _, v in top], rel=1e-3)
    assert Image.open(tmp_path / "c.png").size == (900, 320)
    code, out, _ = run(capsys, "channels", "sample:chelsea", "--json", "-o", str(tmp_path / "c.png"))
    data = json.loads(out)
    assert len(data["means"]) == 1280 and data["top"][0]["channel"] == top[0][0]


# ---------------------------------------------------------------------------------------- bad input


def tiny_module() -> nn.Module:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 2)))


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    weights = tmp_path / "weights.pt"
    torch.save(tiny_module().state_dict(), weights)
    pickled = tmp_path / "whole.pt"
    torch.save(tiny_module(), pickled)
    text = tmp_path / "x.pt"
    text.write_text("hi\n")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(pickled.read_bytes()[:-200])  # a torch.save archive cut short
    folder = tmp_path / "taken.png"
    folder.mkdir()
    return {"missing": str(tmp_path / "nope.jpg"), "corrupt": str(corrupt), "weights": str(weights), "pickled": str(pickled),
            "text": str(text), "broken": str(broken), "folder": str(folder)}


BAD = {
    "missing image": (["predict", "{missing}"], "nope.jpg: no such file"),
    "corrupt image": (["activations", "{corrupt}", "--layer", "bn2"], "corrupt.png"),
    "unknown layer": (["activations", "sample:chelsea", "--layer", "blocks.9"], "did you mean"),
    "unknown channel layer": (["channels", "sample:chelsea", "--layer", "bn3"], "unknown layer 'bn3'"),
    "top 0": (["predict", "sample:chelsea", "--top", "0"], "must be at least 1"),
    "channels top 0": (["channels", "sample:chelsea", "--top", "0"], "must be at least 1"),
    "unknown model": (["summary", "--model", "resnet5000", "--weights", "none"], "resnet5000"),
    "state_dict without arch": (["summary", "--model", "{weights}"], "--arch"),
    "pickle without trust": (["summary", "--model", "{pickled}"], "--trust-pickle"),
    "non-conv filters layer": (["filters", "bn1"], "not a Conv2d"),
    "unknown sample": (["predict", "sample:kitten"], "unknown sample image 'kitten'"),
    "non-spatial activations": (["activations", "sample:chelsea", "--layer", "classifier"], "not feature maps"),
    "bad output type": (["filters", "-o", "out.txt"], "unsupported output type"),
    "output is a directory": (["filters", "-o", "{folder}"], "is a directory"),
    "num-classes 0": (["summary", "--num-classes", "0"], "1..1000000"),
    "num-classes -3": (["summary", "--num-classes", "-3"], "1..1000000"),
    "not a model file": (["summary", "--model", "{text}"], "not a PyTorch, safetensors, TorchScript or ONNX model file"),
    "trust-pickle on a text file": (["summary", "--model", "{text}", "--trust-pickle"], "not a PyTorch"),
    "trust-pickle on a cut-short file": (["summary", "--model", "{broken}", "--trust-pickle"], "broken.pt: corrupt or cut-short"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, capsys, bad_files):
    argv, needle = BAD[case]
    code, out, err = run(capsys, *[a.format(**bad_files) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convscope: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_unknown_layer_suggests_close_names(capsys):
    code, _, err = run(capsys, "filters", "conv_stm")
    assert code == 2 and "did you mean conv_stem" in err


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "convscope", *argv], capture_output=True, text=True, timeout=120, env=env)


def test_subprocess_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "missing.png")
    plain = _cli("predict", missing)
    assert plain.returncode == 2
    assert plain.stderr.strip() == f"convscope: error: {missing}: no such file"
    debug = _cli("predict", missing, "--debug")
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "ImageError" in debug.stderr


def test_subprocess_summary_runs_end_to_end():
    done = _cli("summary", "--depth", "1")
    assert done.returncode == 0, done.stderr
    assert "Total params: 4,652,008" in done.stdout
