"""Synthesis results in Jupyter: a picture (``_repr_png_``) and a one-line ``repr`` without tensor values."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from convscope.synthesis import (
    adversarial,
    dream,
    fooling_image,
    invert,
    perturbation_study,
    style_transfer,
    texture,
    train_fast_style,
    visualize,
)


def _is_png(data: bytes, size: tuple[int, int] | None = None) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    if size is not None:
        assert img.size == size


def _short(text: str, name: str) -> None:
    assert text.startswith(name + "(") and "\n" not in text and len(text) < 400
    assert "tensor([" not in text and "tensor(1x3x" in text


@pytest.fixture(scope="module")
def results(tiny):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(progress=False)
    return {
        "Rendering": visualize(tiny, "conv2:1", steps=2, size=32, **kw),
        "Dream": dream(tiny, x, "conv2", octaves=1, steps=1, size=32, **kw),
        "Inversion": invert(tiny, x, "conv1", steps=2, **kw),
        "StyleResult": style_transfer(tiny, x, x, steps=2, size=32, style_layers=["conv1"], content_layers=["conv2"], **kw),
        "AdversarialResult": adversarial(tiny, x, target=1, steps=1, **kw),
    }


@pytest.mark.parametrize("name", ["Rendering", "Dream", "Inversion", "StyleResult", "AdversarialResult"])
def test_results_show_as_pictures_with_a_short_repr(results, name):
    r = results[name]
    assert type(r).__name__ == name
    _is_png(r._repr_png_(), (32, 32))
    _short(repr(r), name)


def test_texture_fooling_batches_and_studies_show_as_pictures(tiny):
    r = texture(tiny, torch.rand(1, 3, 32, 32), steps=1, size=32, style_layers=["conv1"], progress=False)
    _is_png(r._repr_png_(), (32, 32))
    f = fooling_image(tiny, 3, steps=1, size=32, progress=False)
    _is_png(f._repr_png_(), (32, 32))
    batch = visualize(tiny, "conv2:1", steps=1, size=32, batch=3, progress=False)
    _is_png(batch._repr_png_())  # a grid of the three
    study = perturbation_study(tiny, torch.rand(1, 3, 32, 32), "conv1", steps=1, progress=False)
    _is_png(study._repr_png_())
    assert repr(study).startswith("PerturbationStudy(layer='conv1'") and "tensor(" not in repr(study)


def test_fast_style_result_repr_is_short(tiny, tmp_path):
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "a.png")
    r = train_fast_style(tiny, torch.rand(1, 3, 32, 32), tmp_path, steps=1, batch_size=1, size=32, width=2, blocks=0,
                         style_layers=["conv1"], content_layers=["conv2"], progress=False)
    text = repr(r)
    assert text.startswith("FastStyleResult(net=<TransformNet>") and "\n" not in text and "tensor(" not in text
