"""Net2Vec (Fong & Vedaldi 2018): a concept that only two channels encode jointly is found by the learned
combination with a higher held-out set IoU than any single unit; classification AP; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score
from torch import nn

import convscope as cs
from convscope.cli.main import main
from convscope.dataset import DissectError, average_precision, make_synthetic_broden, net2vec
from testkit import run_cli


class Planted(nn.Module):
    """At the mask resolution: channel 0 = red pixels on even rows, channel 1 = red pixels on odd rows (only
    together do they cover the red square), channel 2 = blue (the disk), channel 3 = dark background."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = ((x[:, 0] > 0.6) & (x[:, 2] < 0.3)).float()[:, None]
        blue = (x[:, 2] > 0.6).float()[:, None]
        dark = (x.mean(1, keepdim=True) < 0.3).float()
        red, blue, dark = (F.avg_pool2d(t, 2) for t in (red, blue, dark))
        even = torch.zeros_like(red)
        even[..., ::2, :] = 1
        return self.fc(self.features(torch.cat([red * even, red * (1 - even), blue, dark], 1)).mean((2, 3)))


@pytest.fixture(scope="module")
def broden(tmp_path_factory):
    return make_synthetic_broden(tmp_path_factory.mktemp("n2v") / "syn", 60, size=32, square_every=2)


@pytest.fixture(scope="module")
def planted():
    return cs.load_model(Planted(), input_size=32, mean=(0, 0, 0), std=(1, 1, 1), labels=["a", "b", "c"])


HALF = torch.full((4,), 0.5)


def test_a_jointly_encoded_concept_beats_every_single_unit(broden, planted):
    r = net2vec(planted, broden, "features", thresholds=HALF, categories=["object"], progress=False)
    square = r.concept("square")
    assert square.single_unit in (0, 1) and square.single_score < 0.6  # one unit covers half the square
    assert square.score > 0.95 and square.score > square.single_score + 0.3
    assert sorted(square.top_units()) == [0, 1]  # the weight sits on the two halves
    assert [c.name for c in r.needs_several()][0] == "square"
    assert set(r.train).isdisjoint(r.val) and len(r.train) + len(r.val) == 60


def test_thresholds_from_a_dissection_and_picture(broden, planted):
    d = cs.dataset.dissect(planted, broden, "features", categories=["object"], progress=False)
    r = net2vec(planted, broden, "features", thresholds=d, categories=["object"], epochs=5, progress=False)
    assert torch.equal(r.thresholds, d.thresholds)
    assert r.picture().size[0] > 300 and r._repr_png_().startswith(b"\x89PNG")
    assert "square" in r.table() and json.loads(json.dumps(r.to_dict()))["layer"] == "features"


def test_classification_mode_scores_average_precision(broden, planted):
    r = net2vec(planted, broden, "features", mode="classification", thresholds=HALF, categories=["object"], progress=False)
    square = r.concept("square")  # in every second image: pooled red channels rank them perfectly
    assert square.score == pytest.approx(1.0) and square.single_score == pytest.approx(1.0)


def test_average_precision_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(50, generator=g), torch.rand(50, generator=g) > 0.6
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels.numpy(), scores.numpy()))


def test_bad_options_are_clear_errors(broden, planted):
    with pytest.raises(DissectError, match="mode"):
        net2vec(planted, broden, "features", mode="nope", progress=False)
    with pytest.raises(DissectError, match="thresholds given"):
        net2vec(planted, broden, "features", thresholds=[0.5], progress=False)
    with pytest.raises(DissectError, match="not found"):
        net2vec(planted, broden, "features", thresholds=HALF, concepts=["unicorn"], progress=False)
    with pytest.raises(cs.ConvscopeError, match="epochs"):
        net2vec(planted, broden, "features", epochs=0, progress=False)


def test_cli_net2vec(broden, planted, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("convscope.cli.cmd_dissect.load_model_from_args", lambda args: planted)
    out = tmp_path / "d.png"
    assert main(["dissect", str(broden), "--layer", "features", "--categories", "object", "--net2vec",
                 "--net2vec-epochs", "20", "--json", "--no-progress", "-o", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "square" in data["net2vec"]["needs_several"]
    assert Image.open(tmp_path / "d-net2vec.png").size[0] > 300
    code, _, err = run_cli(capsys, "dissect", str(broden), "--layer", "features", "--net2vec-epochs", "0")
    assert code == 2 and "--net2vec-epochs" in err and "1..10000" in err
