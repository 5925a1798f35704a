"""Inversion by a trained up-convolutional network (Dosovitskiy & Brox 2016) and DGN-AM (Nguyen et al. 2016)
on a tiny CNN and shape images made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import convscope as cs
from convscope.synthesis.upconv import (
    UpconvError,
    dgn_am,
    invert_upconv,
    load_upconv,
    train_upconv,
    upconv_perturbation,
)
from testkit import Tiny, run_cli

SIZE = 16


def shapes(n: int, seed: int) -> list[Image.Image]:
    """Coloured rectangles and ellipses on coloured backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(2):
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - 4, 2))
            w, h = (int(v) for v in rng.integers(4, 9, 2))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out.append(im)
    return out


def pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1) for i in images])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cs.load_model(Tiny(), input_size=SIZE, labels=[str(i) for i in range(10)])


@pytest.fixture(scope="module")
def data():
    return shapes(64, 0), shapes(12, 1)


@pytest.fixture(scope="module")
def nets(model, data):
    train, _ = data
    return {layer: train_upconv(model, train, layer, steps=150, width=16, held_out=0.1, save_every=50, progress=False)
            for layer in ("relu1", "fc")}


def test_reconstructions_beat_the_mean_image_and_shallow_keeps_more(model, data, nets):
    train, test = data
    baseline = float(((pixels(test) - pixels(train).mean(0)) ** 2).mean())
    shallow = np.mean([invert_upconv(model, im, nets["relu1"]).extras["mse"] for im in test])
    deep = np.mean([invert_upconv(model, im, nets["fc"]).extras["mse"] for im in test])
    assert shallow < 0.5 * baseline          # a clear margin over the mean training image
    assert shallow < deep                    # more structure from a shallow layer than from the logits
    assert len(nets["relu1"].held_out) >= 3  # held-out error recorded at every save


def test_saved_decoder_resumes_and_refuses_another_run(model, data, tmp_path):
    train, test = data
    path = tmp_path / "dec.pt"
    first = train_upconv(model, train, "relu2", output=path, steps=10, width=16, progress=False)
    again = train_upconv(model, train, "relu2", output=path, steps=25, width=16, progress=False)
    assert first.step == 10 and again.step == 25 and len(again.history) == 25
    loaded = load_upconv(path)
    assert loaded.step == 25 and loaded.layer == "relu2"
    assert torch.allclose(invert_upconv(model, test[0], loaded).pixels, invert_upconv(model, test[0], again).pixels)
    with pytest.raises(UpconvError, match="layer 'relu2'"):
        train_upconv(model, train, "relu1", output=path, steps=5, width=16, progress=False)
    (tmp_path / "junk.pt").write_text("hi")
    with pytest.raises(UpconvError, match="not a convscope decoder"):
        load_upconv(tmp_path / "junk.pt")


def test_perturbation_study_decodes_three_versions(model, data, nets):
    r = upconv_perturbation(model, data[1][0], nets["relu1"])
    assert r.pixels.shape[0] == 4 and list(r.extras["mse"]) == ["features", "binarised", "dropout 50%"]
    assert not torch.allclose(r.pixels[1], r.pixels[2])
    assert r.picture().size[0] * r.picture().size[1] >= 4 * SIZE * SIZE


def test_dgn_am_raises_the_objective_within_the_code_range(model, nets):
    net = nets["relu1"]
    g = dgn_am(model, "logit:3", net, steps=30, lr=0.1, progress=False)
    assert g.objective == pytest.approx(max(g.history)) and g.objective > g.history[0]
    lo, hi = net.code_min.view(1, -1, 1, 1), net.code_max.view(1, -1, 1, 1)
    assert (g.code >= lo - 1e-5).all() and (g.code <= hi + 1e-5).all()
    assert float(g.pixels.min()) >= 0 and float(g.pixels.max()) <= 1
    other = cs.load_model(Tiny(), input_size=SIZE)
    with pytest.raises(UpconvError, match="another model"):
        dgn_am(other, "logit:3", net, steps=2, progress=False)


def test_cli_trains_resumes_and_refuses_bad_output(model, data, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(data[0][:16]):
        im.save(folder / f"{i:02d}.png")
    monkeypatch.setattr("convscope.cli.cmd_upconv.load_model_from_args", lambda args: model)
    net = tmp_path / "net.pt"
    code, _, err = run_cli(capsys, "upconv-train", str(folder), "--layer", "relu1", "-o", str(net), "--steps", "6",
                           "--width", "8", "--no-progress")
    assert code == 0 and "step 6" in err and load_upconv(net).step == 6
    code, _, err = run_cli(capsys, "upconv-train", str(folder), "--layer", "relu1", "-o", str(net), "--steps", "9",
                           "--width", "8", "--no-progress")
    assert code == 0 and load_upconv(net).step == 9
    code, _, err = run_cli(capsys, "upconv-train", str(folder), "--layer", "relu1", "-o", str(tmp_path / "n.xyz"))
    assert code == 2 and "n.xyz" in err and not (tmp_path / "n.xyz").exists()


def test_cli_invert_upconv_and_visualize_generator(model, data, nets, tmp_path, capsys, monkeypatch):
    path = tmp_path / "dec.pt"
    nets["relu1"].save(path)
    image = tmp_path / "shape.png"
    data[1][0].save(image)
    monkeypatch.setattr("convscope.cli.cmd_synthesis.load_model_from_args", lambda args: model)
    out = tmp_path / "inv.png"
    code, stdout, _ = run_cli(capsys, "invert", str(image), "--method", "upconv", "--net", str(path), "-o", str(out))
    assert code == 0 and "one pass" in stdout and Image.open(out).size[0] >= 2 * SIZE
    code, stdout, _ = run_cli(capsys, "invert", str(image), "--method", "upconv", "--net", str(path), "--perturb", "-o", str(out))
    assert code == 0 and "binarised" in stdout
    code, _, err = run_cli(capsys, "invert", str(image), "--method", "upconv", "-o", str(out))
    assert code == 2 and "--net" in err
    code, _, err = run_cli(capsys, "invert", str(image), "--method", "upconv", "--net", str(path), "--layer", "fc", "-o", str(out))
    assert code == 2 and "relu1" in err
    gen = tmp_path / "gen.png"
    code, stdout, _ = run_cli(capsys, "visualize", "logit:3", "--generator", str(path), "--steps", "5", "--no-progress", "-o", str(gen))
    assert code == 0 and "through the generator" in stdout and Image.open(gen).size == (SIZE, SIZE)


def test_report_row_with_a_trained_decoder(model, data, nets, tmp_path, capsys, monkeypatch):
    """Issue 12: the report's synthesis section shows the decoder's reconstruction and DGN-AM when given one."""
    from convscope.report.sec_synthesis import _upconv_row
    from convscope.report.sections import ReportContext

    path = tmp_path / "dec.pt"
    nets["relu1"].save(path)
    picture = data[1][0]
    ctx = ReportContext(model=model, image=picture, image_name="shape", x=model.preprocess(picture),
                        options={"upconv_net": str(path)}, progress=False)
    row = _upconv_row(ctx, 3, 5)
    assert "decoded from relu1" not in row  # the labels are in the picture; the caption names the method
    assert "Dosovitskiy" in row and "DGN-AM" in row and "<img" in row
    hint = _upconv_row(ReportContext(model=model, image=picture, image_name="shape", x=None, progress=False), 3, 5)
    assert "upconv-train" in hint and "<img" not in hint
    monkeypatch.setattr("convscope.cli.cmd_report.load_model_from_args", lambda args: model)
    code, _, err = run_cli(capsys, "report", "sample:chelsea", "--upconv-net", str(tmp_path / "none.pt"),
                           "-o", str(tmp_path / "r.html"))
    assert code == 2 and "no such decoder file" in err
