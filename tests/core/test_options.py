"""Option: one declaration of type, default, choices and bounds, checked the same way by every front end."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from convscope.errors import ConvscopeError
from convscope.options import INT_LIMIT, Option, OptionError, bounded, check_range

STEPS = Option(int, 32, "integration steps", minimum=1, maximum=4096)
NOISE = Option(float, 0.1, "noise level", minimum=0.0, maximum=1.0)
MODE = Option(str, "abs", "how to combine", choices=("abs", "signed"))
FLAG = Option(bool, False, "a switch")
SEED = Option(int, 0, "random seed", minimum=0)
EITHER = Option((int, float), 1, "int or float", minimum=0)


def test_option_error_is_a_user_error():
    assert issubclass(OptionError, ConvscopeError) and issubclass(OptionError, ValueError)


@pytest.mark.parametrize("value", [1, 32, 4096])
def test_values_inside_the_bounds_pass_unchanged(value):
    assert STEPS.check("steps", value, "integrated_gradients") == value


@pytest.mark.parametrize("value", [0, -1, 4097, 10**30])
def test_values_outside_the_bounds_name_the_option_owner_and_range(value):
    with pytest.raises(OptionError) as info:
        STEPS.check("steps", value, "integrated_gradients")
    text = str(info.value)
    assert "'steps'" in text and "'integrated_gradients'" in text and "1..4096" in text and str(value) in text
    assert "\n" not in text


def test_inclusive_float_bounds():
    assert NOISE.check("noise", 0.0) == 0.0 and NOISE.check("noise", 1.0) == 1.0
    for bad in (-1e-9, 1.5):
        with pytest.raises(OptionError, match=r"'noise'.*0\.\.1"):
            NOISE.check("noise", bad)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused(value):
    with pytest.raises(OptionError, match="finite"):
        NOISE.check("noise", value)


def test_non_finite_allowed_when_declared():
    loose = Option(float, 0.0, "anything", finite=False)
    assert math.isnan(loose.check("x", math.nan)) and loose.check("x", math.inf) == math.inf


def test_huge_ints_are_refused_without_a_declared_maximum():
    assert SEED.check("seed", INT_LIMIT) == INT_LIMIT
    with pytest.raises(OptionError, match="'seed'"):
        SEED.check("seed", 99999999999999999999999)
    with pytest.raises(OptionError):
        SEED.parse("seed", "99999999999999999999999")


def test_wrong_types_are_refused_with_the_expected_type():
    with pytest.raises(OptionError, match="an int"):
        STEPS.check("steps", 2.5)
    with pytest.raises(OptionError, match="an int"):
        STEPS.check("steps", "10")
    with pytest.raises(OptionError):
        STEPS.check("steps", True)  # a bool is not a count
    assert NOISE.check("noise", 1) == 1  # an int is a fine float
    assert EITHER.check("x", 2) == 2 and EITHER.check("x", 2.5) == 2.5


def test_none_and_tensors_pass_through():
    assert STEPS.check("steps", None) is None
    t = torch.zeros(2)
    assert NOISE.check("noise", t) is t


def test_choices():
    assert MODE.check("mode", "signed") == "signed"
    with pytest.raises(OptionError, match="one of abs, signed") as info:
        MODE.check("mode", "both", "gradient")
    assert "'mode'" in str(info.value) and "'gradient'" in str(info.value)


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                         ("0", False), ("false", False), ("NO", False), ("off", False)])
def test_bool_parsing(text, value):
    assert FLAG.parse("flag", text) is value


def test_bool_parsing_refuses_other_words():
    with pytest.raises(OptionError, match="'flag'.*a bool"):
        FLAG.parse("flag", "maybe")


def test_parse_converts_and_checks():
    assert STEPS.parse("steps", " 64 ") == 64
    assert NOISE.parse("noise", "0.25") == 0.25
    assert EITHER.parse("x", "3") == 3 and isinstance(EITHER.parse("x", "3"), int)
    assert EITHER.parse("x", "3.5") == 3.5
    for bad in ("0", "abc", "1e9", "nan"):
        with pytest.raises(OptionError, match="'steps'"):
            STEPS.parse("steps", bad)
    with pytest.raises(OptionError, match="finite"):
        NOISE.parse("noise", "nan")
    with pytest.raises(OptionError, match="one of"):
        MODE.parse("mode", "both")


def test_argtype_gives_argparse_one_line_errors_with_the_range(capsys):
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--steps", type=STEPS.argtype("--steps"))
    assert parser.parse_args(["--steps", "7"]).steps == 7
    for bad in ("0", "-1", "100000", "nan", "ten"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["--steps", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--steps" in err and "1..4096" in err


def test_bounded_and_check_range():
    size = bounded(int, 1, 4096, name="--size")
    assert size("224") == 224
    for bad in ("0", "-1", "30000", "1e3"):
        with pytest.raises(argparse.ArgumentTypeError, match="1..4096"):
            size(bad)
    alpha = bounded(float, 0, 1, name="--alpha")
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        alpha("nan")
    assert check_range("k", 3, int, 1, 10) == 3
    with pytest.raises(OptionError, match="'k'.*1..10"):
        check_range("k", 11, int, 1, 10)


def test_range_text():
    assert STEPS.range_text() == "an int in 1..4096"
    assert SEED.range_text() == "an int >= 0"
    assert Option(float, 0.0, "", maximum=2.5).range_text() == "a float <= 2.5"
    assert MODE.range_text() == "one of abs, signed"
    assert FLAG.range_text() == "a bool"


def test_to_json_describes_the_option():
    d = STEPS.to_json()
    assert d == {"type": ["int"], "default": 32, "help": "integration steps", "choices": None,
                 "minimum": 1, "maximum": 4096, "range": "an int in 1..4096"}
    assert MODE.to_json()["choices"] == ["abs", "signed"]
    assert Option(object, object(), "x").to_json()["default"].startswith("<object")
