"""Objectives: the string syntax, the Python algebra, their values and their errors."""

from __future__ import annotations

import pytest
import torch

from convscope.errors import LayerNotFoundError, TargetError
from convscope.synthesis import (
    ObjectiveSyntaxError,
    channel,
    direction,
    diversity,
    layer,
    logit,
    neuron,
    parse_objective,
)
from convscope.synthesis.objectives import LOGITS


@pytest.fixture
def acts():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(2, 4, 5, 6, generator=g), "b": torch.randn(2, 3, 2, 2, generator=g),
            LOGITS: torch.randn(2, 10, generator=g)}


def test_channel_is_the_spatial_mean_of_one_channel(acts):
    assert torch.allclose(parse_objective("a:2")(acts), acts["a"][:, 2].mean(dim=(1, 2)))


def test_neuron_reads_one_position_and_defaults_to_the_centre(acts):
    assert torch.equal(parse_objective("a:1@3,4")(acts), acts["a"][:, 1, 3, 4])
    assert torch.equal(neuron("a", 1)(acts), acts["a"][:, 1, 2, 3])


def test_layer_is_the_mean_of_squares(acts):
    assert torch.allclose(parse_objective("b")(acts), acts["b"].pow(2).mean(dim=(1, 2, 3)))


def test_logit_reads_the_class_score(acts):
    assert torch.equal(parse_objective("logit:7")(acts), acts[LOGITS][:, 7])
    assert parse_objective("logit:7").needs_logits and not parse_objective("a:1").needs_logits


def test_weighted_sums_parse_like_the_python_algebra(acts):
    text = parse_objective("0.5*a:1 - b:2 + 2 * logit:3 - -a")(acts)
    api = 0.5 * channel("a", 1) - channel("b", 2) + 2 * logit(3) + layer("a")
    manual = (0.5 * acts["a"][:, 1].mean((1, 2)) - acts["b"][:, 2].mean((1, 2)) + 2 * acts[LOGITS][:, 3]
              + acts["a"].pow(2).mean((1, 2, 3)))
    assert torch.allclose(text, manual) and torch.allclose(api(acts), manual)
    assert torch.allclose(parse_objective("a:1*3")(acts), 3 * acts["a"][:, 1].mean((1, 2)))
    assert parse_objective("0.5*a:1 - b:2").layers == ("a", "b")


def test_one_channel_per_image_for_batched_rendering(acts):
    v = channel("a", [3, 0])(acts)
    assert torch.allclose(v, torch.stack([acts["a"][0, 3].mean(), acts["a"][1, 0].mean()]))


def test_direction_projects_on_a_unit_vector(acts):
    vec = torch.tensor([1.0, 0.0, 0.0, 1.0])
    expected = (acts["a"][:, 0] + acts["a"][:, 3]).mean((1, 2)) / 2**0.5
    assert torch.allclose(direction("a", vec)(acts), expected, atol=1e-6)


def test_diversity_is_minus_mean_gram_cosine_to_the_others():
    a = torch.randn(3, 2, 4, 4)
    grams = [(x.flatten(1) @ x.flatten(1).T).flatten() for x in a]
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    expected = [-(cos(grams[i], grams[(i + 1) % 3]) + cos(grams[i], grams[(i + 2) % 3])) / 2 for i in range(3)]
    assert torch.allclose(diversity("l")({"l": a}), torch.tensor(expected), atol=1e-5)
    same = a[:1].expand(3, -1, -1, -1)
    assert torch.allclose(diversity("l")({"l": same}), torch.full((3,), -1.0), atol=1e-5)


@pytest.mark.parametrize(("text", "column"), [
    ("a:x", 2), ("a:1 +", 5), ("a:1 b:2", 4), ("a:1@2", 5), ("", 0), ("2*", 2), ("a:1 $", 4),
])
def test_syntax_errors_point_at_the_column(text, column):
    with pytest.raises(ObjectiveSyntaxError) as e:
        parse_objective(text)
    assert e.value.position == column
    lines = str(e.value).splitlines()
    assert f"column {column + 1}" in lines[0]
    assert lines[1].strip() == text.strip() and lines[2].index("^") - 2 == column


def test_unknown_layer_suggests_close_names(model):
    with pytest.raises(LayerNotFoundError, match="did you mean bn2"):
        parse_objective("bn3:1", model)


def test_class_names_resolve_and_bad_classes_fail(model, acts):
    assert parse_objective("logit:'tiger cat'", model).name == "logit:282"
    assert parse_objective("logit:espresso", model).name == "logit:967"
    with pytest.raises(TargetError, match="out of range"):
        parse_objective("logit:1000", model)
    with pytest.raises(TargetError, match="out of range"):
        parse_objective("logit:11")(acts)


def test_channel_out_of_range_is_a_clear_error(acts):
    with pytest.raises(TargetError, match="channel 4 is out of range: layer 'a' has 4 channels"):
        parse_objective("a:4")(acts)
    with pytest.raises(TargetError, match="outside"):
        parse_objective("a:1@9,0")(acts)
