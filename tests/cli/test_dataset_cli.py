"""Bad input to the dataset commands (topk, embed, dissect, bias, evolution): one line, exit 2, nothing written.

Every case runs the real parser; the model is the tiny test CNN wherever a command gets as far as loading one.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.cli import cmd_embed, cmd_topk
from convscope.cli.main import build_parser
from convscope.dataset.dissect import dissect, make_synthetic_broden
from convscope.dataset.embed import embed
from convscope.dataset.folder import SkippedImagesWarning, StateMismatchError, UnreadableImagesError
from convscope.dataset.topk import top_activations
from testkit import run_cli

COMMANDS = ("topk", "embed", "dissect", "bias", "evolution")
#: The fewest arguments that get each command past its positional arguments.
MINIMAL = {"topk": ["FOLDER"], "embed": ["FOLDER"], "dissect": ["BRODEN"], "bias": [], "evolution": ["A.pt", "B.pt"]}
SIZE = 16


def tiny() -> cs.Model:
    torch.manual_seed(0)
    module = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(),
                                       pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 3)))
    return cs.Model(module, input_size=(SIZE, SIZE), mean=(0, 0, 0), std=(1, 1, 1), labels=["a", "b", "c"], resize_size=SIZE)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(root / f"img_{i}.png")
    return root


@pytest.fixture
def model(monkeypatch):
    m = tiny()
    for module in (cmd_topk, cmd_embed):
        monkeypatch.setattr(module, "load_model_from_args", lambda args: m)
    return m


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def files_in(path) -> list[str]:
    return sorted(p.name for p in path.rglob("*") if p.is_file())


# ============================================================================ help and bounds


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command):
    missing = [a.option_strings or a.dest for a in subparser(command)._actions if not a.help]
    assert not missing, f"{command}: options without help: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("value", ["0", "-1", "1000000000", "x"])
def test_batch_size_out_of_range_is_one_line(capsys, command, value):
    code, out, err = run_cli(capsys, command, *MINIMAL[command], "--batch-size", value)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "--batch-size" in err and "1..4096" in err


@pytest.mark.parametrize("argv, name", [
    (["topk", "F", "--k", "1000000000"], "--k"), (["topk", "F", "--k", "0"], "--k"),
    (["topk", "F", "--rows", "-1"], "--rows"), (["topk", "F", "--save-every", "0"], "--save-every"),
    (["topk", "F", "--project-batch-size", "0"], "--project-batch-size"),
    (["embed", "F", "--size", "1000000"], "--size"), (["embed", "F", "--size", "0"], "--size"),
    (["embed", "F", "--thumb", "-3"], "--thumb"), (["embed", "F", "--k", "-1"], "--k"),
    (["embed", "F", "--iterations", "0"], "--iterations"), (["embed", "F", "--perplexity", "nan"], "--perplexity"),
    (["embed", "F", "--seed", "-1"], "--seed"), (["embed", "F", "--seed", "99999999999999999999999"], "--seed"),
    (["dissect", "B", "--max-images", "-1"], "--max-images"), (["dissect", "B", "--top-k", "0"], "--top-k"),
    (["dissect", "B", "--synthetic-images", "0"], "--synthetic-images"), (["dissect", "B", "--quantile", "1"], "quantile"),
    (["evolution", "a", "b", "--max-images", "1"], "--max-images"), (["evolution", "a", "b", "--max-filters", "0"], "--max-filters"),
])
def test_counts_and_sizes_out_of_range_name_the_option(capsys, argv, name):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1
    assert name in err or name.lstrip("-") in err


def test_api_bounds_are_the_same(folder):
    m = tiny()
    with pytest.raises(cs.ConvscopeError, match="'k' must be an int in 1..100000"):
        top_activations(m, folder, "conv1", k=10**9, progress=False)
    with pytest.raises(cs.ConvscopeError, match="'batch_size' must be an int in 1..4096"):
        embed(m, folder, "conv1", batch_size=0, progress=False)
    with pytest.raises(cs.ConvscopeError, match="'size' must be an int in 64..8192"):
        embed(m, folder, "conv1", progress=False).map_image(size=10**6)


# ============================================================================ unreadable inputs


def test_topk_over_only_unreadable_images_fails(capsys, model, folder, tmp_path):
    for p in folder.iterdir():
        p.write_bytes(b"\x89PNG broken")
    with pytest.raises(UnreadableImagesError, match="none of the 4 image"), pytest.warns(SkippedImagesWarning):
        top_activations(model, folder, "conv1", progress=False)
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "topk", str(folder), "--layer", "conv1", "-o", str(out), "--no-progress")
    assert code == 2 and "none of the 4 image(s) could be read" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_embed_unreadable_neighbour_leaves_no_file(capsys, model, folder, tmp_path):
    outputs = tmp_path / "out"
    outputs.mkdir()
    code, _, err = run_cli(capsys, "embed", str(folder), "--layer", "conv1", "--method", "pca",
                           "-o", str(outputs / "map.png"), "--save", str(outputs / "f.pt"),
                           "--neighbours", str(tmp_path / "missing.jpg"), "--no-progress")
    assert code == 2 and "missing.jpg" in err and len(err.strip().splitlines()) == 1
    assert files_in(outputs) == []


def test_evolution_bad_filter_layer_leaves_no_file(capsys, tmp_path):
    torch.manual_seed(0)
    net = cs.load_model("resnet18", weights=None, num_classes=3, device="cpu").module
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(net.state_dict(), a)
    torch.save(net.state_dict(), b)
    outputs = tmp_path / "out"
    outputs.mkdir()
    common = [str(a), str(b), "--arch", "resnet18", "--num-classes", "3", "--images", "sample:chelsea",
              "--images", "sample:coffee", "--no-progress", "-o", str(outputs / "curves.png"),
              "--filters-out", str(outputs / "filters.png")]
    code, _, err = run_cli(capsys, "evolution", *common, "--layers", "conv1", "--filter-layer", "nope")
    assert code == 2 and "nope" in err and files_in(outputs) == []  # refused before any checkpoint loads
    code, _, err = run_cli(capsys, "evolution", *common, "--layers", "conv1,layer1.0.conv1", "--filter-layer", "fc")
    assert code == 2 and "'fc'" in err and files_in(outputs) == []


# ============================================================================ output and state paths


@pytest.mark.parametrize("bad", ["suffix", "directory", "parent_is_file"])
def test_bad_output_path_is_one_line_and_nothing_is_written(capsys, model, folder, tmp_path, bad):
    target = {"suffix": tmp_path / "out.xyz", "directory": tmp_path, "parent_is_file": folder / "img_0.png" / "g.png"}[bad]
    before = files_in(tmp_path)
    code, out, err = run_cli(capsys, "topk", str(folder), "--layer", "conv1", "-o", str(target), "--no-progress")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1 and "internal error" not in err
    assert files_in(tmp_path) == before


def test_state_in_a_folder_that_cannot_be_written(capsys, model, folder, tmp_path):
    state = folder / "img_0.png" / "run.topk"  # its "folder" is a regular file
    code, out, err = run_cli(capsys, "topk", str(folder), "--layer", "conv1", "--state", str(state),
                             "-o", str(tmp_path / "g.png"), "--no-progress")
    assert code == 2 and "run.topk" in err and "not a folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()
    code, _, err = run_cli(capsys, "dissect", str(tmp_path), "--state", str(state), "--no-progress")
    assert code == 2 and "run.topk" in err and len(err.strip().splitlines()) == 1


def test_state_that_is_not_a_state_is_one_line(capsys, model, folder, tmp_path):
    state = tmp_path / "run.topk"
    state.write_text("hello\n")
    code, _, err = run_cli(capsys, "topk", str(folder), "--layer", "conv1", "--state", str(state),
                           "-o", str(tmp_path / "g.png"), "--no-progress")
    assert code == 2 and "not a convscope top-k state file" in err
    assert len(err.strip().splitlines()) == 1 and "weights_only" not in err
    assert state.read_text() == "hello\n"  # left as it was


def test_resuming_another_analysis_state_is_a_mismatch(model, folder, tmp_path):
    """topk and dissect share one error class for a state of another run (here: a dissection's state)."""
    broden = make_synthetic_broden(tmp_path / "broden", 4, size=16)
    state = tmp_path / "run.state"
    dissect(model, broden, "conv1", state=state, progress=False)
    with pytest.raises(StateMismatchError, match="not a top-k state"):
        top_activations(model, folder, "conv1", state=state, progress=False)


def test_synthetic_broden_into_a_path_that_cannot_be_a_folder(capsys, folder):
    code, _, err = run_cli(capsys, "dissect", "--synthetic", str(folder / "img_0.png" / "broden"))
    assert code == 2 and "img_0.png" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "dissect", "--synthetic", str(folder / "img_0.png"))
    assert code == 2 and "not a folder" in err
