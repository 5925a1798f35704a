"""The CLI contract, checked over the CLI's own command table (so a new command is covered by default).

(a) every option of every command has a help text;
(b) every command that writes a file (``-o``), given an unknown suffix, an existing directory or a path under a
    regular file, exits 2 with one line on stderr before any work (the model is never loaded) and writes nothing;
(c) every numeric option declares its bounds, and a value outside them (0, -1, huge, NaN) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import math
import os

import pytest
from PIL import Image

from convscope.cli import common
from convscope.cli.main import build_parser
from convscope.models import loaders
from convscope.options import INT_LIMIT
from testkit import run_cli


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every command, nested ones (``atlas build``) by their words joined with a space."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        nested = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if nested is None:
            out[name] = p
        else:
            out.update({f"{name} {n}": q for n, q in nested.choices.items()})
    return out


COMMANDS = _commands()

#: Who fixes a command that breaks the contract (for the xfail marks below).
OWNERS = {
    **dict.fromkeys(("summary", "predict", "filters", "activations", "channels", "diagnose"), "helper D"),
    **dict.fromkeys(("explain", "report", "serve"), "helper A"),
    **dict.fromkeys(("topk", "embed", "dissect", "bias", "evolution"), "helper B"),
    **dict.fromkeys(("visualize", "dream", "invert", "texture", "style", "style-train", "stylize", "adversarial", "fool"),
                    "helper C"),
}

#: Cases known to fail only because the command's owner has not fixed it yet: (command, case) -> owner.
#: The lead removes entries as the owners' fixes land.
PENDING: dict[tuple[str, str], str] = {}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _case(command: str, case: str, *values: object) -> object:
    owner = PENDING.get((command, case))
    marks = [pytest.mark.xfail(strict=False, reason=f"owner: {owner}")] if owner else []
    return pytest.param(command, *values, id=f"{command}-{case}", marks=marks)


# ---------------------------------------------------------------- (a) help texts
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command):
    parser = COMMANDS[command]
    assert parser.description or parser.format_usage(), command
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in _options(parser)
               if not a.help or (a.help != argparse.SUPPRESS and not a.help.strip())]
    assert not missing, f"{command}: options without help: {', '.join(missing)}"


# ---------------------------------------------------------------- (b) output paths checked up front
def _output_action(parser: argparse.ArgumentParser) -> argparse.Action | None:
    return next((a for a in _options(parser) if "-o" in a.option_strings), None)


WRITERS = sorted(c for c, p in COMMANDS.items() if _output_action(p) is not None)


def _suffix(parser: argparse.ArgumentParser) -> str:
    """The suffix the command's output normally has (its default name, else its metavar), else .png."""
    action = _output_action(parser)
    for text in (() if action is None else (action.default, action.metavar)):
        if isinstance(text, str) and os.path.splitext(text)[1]:
            return os.path.splitext(text)[1]
    return ".png"


@pytest.fixture
def inputs(tmp_path_factory):
    """Valid-looking inputs in their own folder (so the output folder stays empty): an image folder, a file."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(folder / "a.png")
    some_file = root / "file.pt"
    some_file.write_bytes(b"not read: the output check comes first")
    return {"folder": str(folder), "file": str(some_file)}


#: Sample values for positional arguments and required options, by ``dest`` (add one for a new argument name).
def _sample_value(dest: str, inputs: dict[str, str]) -> str:
    values = {
        "image": "sample:chelsea", "content": "sample:chelsea", "styles": "sample:chelsea", "style": "sample:chelsea",
        "objective": "conv1:1", "target": "1", "layer": "conv1",
        "folder": inputs["folder"], "images": inputs["folder"], "data": inputs["folder"], "broden": inputs["folder"],
        "checkpoints": inputs["file"], "net": inputs["file"], "atlas": inputs["folder"], "layers": "conv1",
        "static": os.path.join(os.path.dirname(inputs["folder"]), "site"),
    }
    if dest not in values:
        pytest.fail(f"no sample value for the argument {dest!r}: add one to _sample_value in {__file__}")
    return values[dest]


def _argv(command: str, output: str, inputs: dict[str, str]) -> list[str]:
    argv = command.split()
    for a in _options(COMMANDS[command]):
        if not a.option_strings and a.nargs != "*":
            argv.append(_sample_value(a.dest, inputs))
        elif a.option_strings and a.required and "-o" not in a.option_strings:
            argv += [a.option_strings[-1], _sample_value(a.dest, inputs)]
    return argv + (["-o", output] if _output_action(COMMANDS[command]) is not None else [])


class _ModelLoaded(Exception):
    """Raised instead of loading a model: the output must be checked before that."""


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise _ModelLoaded("the model was loaded before the output path was checked")

    monkeypatch.setattr(common, "load_model", refuse)
    monkeypatch.setattr(loaders, "load_model", refuse)
    monkeypatch.setattr(loaders, "_from_file", refuse)


BAD_OUTPUTS = ("unknown-suffix", "existing-directory", "under-a-file")
#: Outputs that are folders (an atlas, a static site): bad when a regular file is in the way.
FOLDER_METAVARS = {"ATLAS", "OUT"}
BAD_FOLDERS = ("a-file", "under-a-file")


def _cases(action: argparse.Action | None, cases: tuple[str, ...] = BAD_OUTPUTS) -> tuple[str, ...]:
    return BAD_FOLDERS if action is not None and action.metavar in FOLDER_METAVARS else cases


def _bad_output(case: str, folder, suffix: str) -> str:
    if case == "a-file":
        (folder / "a-file").write_text("x")
        return str(folder / "a-file")
    if case == "unknown-suffix":
        return str(folder / "out.xyz")
    if case == "existing-directory":
        (folder / f"taken{suffix}").mkdir()
        return str(folder / f"taken{suffix}")
    (folder / "plain-file").write_text("x")
    return str(folder / "plain-file" / f"out{suffix}")


@pytest.mark.parametrize("command, case", [_case(c, case, case) for c in WRITERS
                                           for case in _cases(_output_action(COMMANDS[c]))])
def test_bad_output_path_is_one_line_exit_2_before_any_work(command, case, tmp_path, inputs, no_model, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = _bad_output(case, out_dir, _suffix(COMMANDS[command]))
    before = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*"))
    code, _, err = run_cli(capsys, *_argv(command, output, inputs))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    assert lines[0].startswith("convscope: error:") and output in lines[0], lines[0]
    assert sorted(p.relative_to(out_dir) for p in out_dir.rglob("*")) == before  # nothing written or left behind
    assert sorted(os.listdir(inputs["folder"])) == ["a.png"]


# Other files a command writes: options named like outputs (``--state``, ``--save``, ``--*-out``), checked the
# same way (no suffix rule: a state file may have any name).
def _is_extra_output(action: argparse.Action) -> bool:
    return "-o" not in action.option_strings and bool(action.option_strings) and (
        action.dest.endswith("_out") or action.dest in ("state", "save", "static"))


EXTRA_WRITERS = sorted((c, a.option_strings[-1]) for c, p in COMMANDS.items() for a in _options(p) if _is_extra_output(a))

#: Options that only write when another option is given.
NEEDS = {"--neighbours-out": ["--neighbours", "sample:chelsea"]}


@pytest.mark.parametrize("command, option, case", [
    _case(c, f"{o}-{case}", o, case) for c, o in EXTRA_WRITERS
    for case in _cases(next(a for a in _options(COMMANDS[c]) if o in a.option_strings), BAD_OUTPUTS[1:])])
def test_other_bad_output_paths_too(command, option, case, tmp_path, inputs, no_model, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    action = next(a for a in _options(COMMANDS[command]) if option in a.option_strings)
    suffix = os.path.splitext(str(action.metavar or ""))[1] or ".png"
    bad = _bad_output(case, out_dir, suffix)
    good = str(tmp_path / f"fine{_suffix(COMMANDS[command])}")
    argv = _argv(command, good, inputs) + [option, bad, *NEEDS.get(option, [])]
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    assert bad in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert len(list(out_dir.rglob("*"))) == 1  # only what the test made


def test_every_writer_is_covered():
    assert {"filters", "activations", "channels", "diagnose"} <= set(WRITERS)
    assert len(WRITERS) >= 10
    assert ("topk", "--state") in EXTRA_WRITERS and ("embed", "--save") in EXTRA_WRITERS


# ---------------------------------------------------------------- (c) numeric options declare and enforce bounds
#: Option types that parse lists or names, not one number (checked by their own commands' tests).
NOT_NUMBERS = {"_channels", "parse_channels", "_categories"}


def _numeric_options() -> list[tuple[str, str, argparse.Action]]:
    found = []
    for command, parser in sorted(COMMANDS.items()):
        for a in _options(parser):
            if a.option_strings and a.type is not None and getattr(a.type, "__name__", "") not in NOT_NUMBERS:
                found.append((command, a.option_strings[-1], a))
    return found


NUMERIC = _numeric_options()
HUGE = "1" + "0" * 30


def _absurd_values(action: argparse.Action) -> list[str]:
    """Values outside the option's declared range: below the minimum (and 0 when the minimum is positive),
    above the maximum, beyond any int, NaN for floats."""
    option = getattr(action.type, "option", None)
    if option is None:  # a custom parser: it must refuse the usual absurdities itself
        return ["-1", HUGE, "nan"]
    values = []
    is_int = int in option.types and float not in option.types
    if option.minimum is not None:
        values.append(str(int(option.minimum) - 1) if is_int else str(option.minimum - 1))
        if option.minimum > 0 and option.minimum != 1:
            values.append("0")
    if option.maximum is not None:
        values.append(str(int(option.maximum) + 1) if is_int else str(option.maximum * 2 + 1))
    if is_int or option.maximum is not None:
        values.append(HUGE if is_int or option.maximum < float(HUGE) else "inf")
    if float in option.types and option.finite:
        values.append("nan")
    return values


@pytest.mark.parametrize("command, name, action", [_case(c, f"bounds{n}", n, a) for c, n, a in NUMERIC])
def test_numeric_options_declare_bounds(command, name, action):
    assert action.type not in (int, float), f"{command} {name}: declare its range (type=bounded(...) or Option(...).argtype)"
    option = getattr(action.type, "option", None)
    if option is not None:
        assert option.minimum is not None or option.maximum is not None, f"{command} {name}: no bounds declared"


@pytest.mark.parametrize("command, name, action", [_case(c, f"absurd{n}", n, a) for c, n, a in NUMERIC])
def test_absurd_numeric_values_exit_2_with_one_line(command, name, action, capsys):
    if action.type in (int, float):
        pytest.fail(f"{command} {name}: declare its range")
    for value in _absurd_values(action):
        code, _, err = run_cli(capsys, *command.split(), f"{name}={value}")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, f"{command} {name}={value}: exit {code}, stderr:\n{err}"
        assert name in lines[0], lines[0]


def test_absurd_values_cover_the_range():
    option = common.positive_int.option
    assert option.minimum == 1
    fake = argparse.Action(["--n"], "n", type=common.positive_int)
    assert _absurd_values(fake) == ["0", HUGE]
    assert int(HUGE) > INT_LIMIT and not math.isnan(float(HUGE))


def test_the_model_guard_catches_a_command_that_loads_the_model(no_model, capsys):
    code, _, err = run_cli(capsys, "predict", "sample:chelsea")
    assert code == 1 and "_ModelLoaded" in err  # so a writer that loaded the model before checking -o would fail above
