"""cs.load_image: every odd kind of picture becomes the RGB image a person would expect, or a clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import convscope as cs
from convscope.errors import ImageError
from convscope.images import IMAGE_SUFFIXES, list_images


@pytest.mark.parametrize("name", list(cs.SAMPLES))
def test_every_sample_loads_as_rgb(name):
    img = cs.sample_image(name)
    assert img.mode == "RGB" and min(img.size) >= 256
    assert cs.load_image(f"sample:{name}").tobytes() == img.tobytes()


def test_unknown_sample_suggests_names():
    with pytest.raises(ImageError, match="chelsea"):
        cs.sample_image("chelsee")


def test_grayscale_file_becomes_equal_rgb_channels(tmp_path):
    a = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    img = np.asarray(cs.load_image(tmp_path / "g.png"))
    assert img.shape == (64, 64, 3)
    assert (img[..., 0] == a).all() and (img[..., 1] == a).all() and (img[..., 2] == a).all()


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish, half the image transparent
    rgba[:, :4, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = np.asarray(cs.load_image(tmp_path / "a.png"))
    assert (img[:, :4] == [200, 0, 0]).all()
    assert (img[:, 4:] == 255).all()


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    img = np.asarray(cs.load_image(tmp_path / "p.png"))
    assert tuple(img[0, 0]) == (40, 50, 60)
    assert tuple(img[1, 1]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)  # pure cyan ink
    r, g, b = np.asarray(cs.load_image(tmp_path / "c.jpg")).reshape(-1, 3).mean(0)
    assert r < 30 and g > 220 and b > 220


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    img = np.asarray(cs.load_image(tmp_path / "d.png"))
    assert img[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "o.jpg", exif=exif)
    assert cs.load_image(tmp_path / "o.jpg").size == (20, 40)


def test_missing_file_directory_and_non_image(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        cs.load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        cs.load_image(tmp_path)
    (tmp_path / "x.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match=r"x\.png.*not an image"):
        cs.load_image(tmp_path / "x.png")


def test_truncated_file_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"t\.png.*(corrupt|truncated)"):
        cs.load_image(tmp_path / "t.png")


def test_huge_images_are_refused_before_decoding(tmp_path):
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="too large"):
        cs.load_image(tmp_path / "big.png", max_pixels=10_000)


def test_arrays_and_tensors():
    f = np.random.default_rng(0).random((10, 12, 3))
    img = cs.load_image(f)
    assert img.size == (12, 10)
    assert np.abs(np.asarray(img) / 255.0 - f).max() <= 0.5 / 255 + 1e-9
    t = torch.from_numpy(f).permute(2, 0, 1).float()
    assert cs.load_image(t).tobytes() == img.tobytes()
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        cs.load_image(f * 3)
    with pytest.raises(ImageError, match="NaN"):
        cs.load_image(np.full((4, 4), np.nan))
    with pytest.raises(ImageError, match="shape"):
        cs.load_image(np.zeros((2, 3, 4, 5)))


def test_preprocess_then_deprocess_returns_the_picture(builtin, chelsea):
    seen = np.asarray(builtin.transform_image(chelsea), dtype=np.int16)
    x = builtin.preprocess(chelsea)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    back = np.asarray(builtin.deprocess(x), dtype=np.int16)
    assert np.abs(back - seen).max() <= 1  # quantisation only
    # normalisation matches the model's mean and std: (pixel - 0.5) / 0.5
    assert torch.allclose(x[0, :, 0, 0], torch.tensor((seen[0, 0] / 255.0 - 0.5) / 0.5, dtype=torch.float32), atol=1e-6)


def test_transform_image_resizes_short_side_then_centre_crops(builtin):
    img = Image.new("RGB", (512, 256))
    out = builtin.transform_image(img)
    assert out.size == (224, 224)
    big = builtin.preprocess([img, img])
    assert big.shape == (2, 3, 224, 224)


# ---------------------------------------------------------------- bytes (uploads) and folders
def test_bytes_of_an_image_file_load_like_the_file(tmp_path):
    img = Image.new("RGB", (20, 10), (10, 200, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    for source in (data, bytearray(data), memoryview(data)):
        loaded = cs.load_image(source)
        assert loaded.size == (20, 10) and loaded.mode == "RGB" and loaded.tobytes() == img.tobytes()


@pytest.mark.parametrize("data", [b"not an image", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20], ids=["text", "empty", "png-header-only"])
def test_corrupt_bytes_are_an_image_error(data):
    with pytest.raises(ImageError) as info:
        cs.load_image(data)
    assert "uploaded image" in str(info.value) and "\n" not in str(info.value)


def test_truncated_bytes_are_an_image_error():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="uploaded image"):
        cs.load_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_list_images_finds_every_readable_suffix_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("z.PNG", "a.jpg", "b/c.tif", "b/d.gif", "notes.txt", ".secret.png", ".hidden/e.png", "b/f.webp"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.jpg", "b/c.tif", "b/d.gif", "b/f.webp", "z.PNG"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.jpg", "z.PNG"]
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)
    assert {".png", ".jpg", ".jpeg", ".tif", ".gif", ".webp", ".bmp"} <= set(IMAGE_SUFFIXES)


def test_list_images_missing_folder_or_file(tmp_path):
    with pytest.raises(ImageError, match="no such folder"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(ImageError, match="not a folder"):
        list_images(tmp_path / "f.png")


def test_every_listed_suffix_opens_with_load_image(tmp_path):
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    for suffix in IMAGE_SUFFIXES:
        path = tmp_path / f"x{suffix}"
        img.save(path)
        assert cs.load_image(path).size == (8, 8)
