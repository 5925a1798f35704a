"""Reading images safely: every format PIL reads, made into a validated RGB picture.

``load_image`` is the one door through which pictures enter convscope. It applies EXIF orientation,
turns grayscale, palette, CMYK, 16-bit, float and transparent images into 8-bit RGB (transparency is
composited on white), and refuses unreadable, truncated, gigantic or non-image files with an
:class:`~convscope.errors.ImageError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, suggestion

#: Largest image accepted, in pixels (PIL's own decompression-bomb limit is about 89 million).
MAX_PIXELS = 89_478_485

#: Bundled sample photographs and textures (all from scikit-image), by name.
SAMPLES: dict[str, str] = {
    "chelsea": "Chelsea the cat (photo)",
    "coffee": "a cup of coffee (photo)",
    "rocket": "a rocket on its launch pad (photo)",
    "astronaut": "astronaut Eileen Collins (photo)",
    "motorcycle_left": "a motorcycle, left view of a stereo pair (photo)",
    "horse": "a horse silhouette (binary image)",
    "brick": "brick wall (grayscale texture)",
    "grass": "grass (grayscale texture)",
    "gravel": "gravel (grayscale texture)",
}

#: File suffixes read as images when a folder is listed (compared case-insensitively): every one of them
#: opens with :func:`load_image`. The one list convscope uses everywhere.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

ImageLike = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray | torch.Tensor


def list_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (recursively by default), sorted by their path relative to it, as text.

    Files are chosen by suffix (:data:`IMAGE_SUFFIXES`, any case); hidden files and folders (names
    starting with ``.``) are left out and symbolic links to folders are not followed. The order depends
    only on the names, so it is the same across runs and machines (which is what lets a run resume).
    """
    root = Path(folder)
    if not root.exists():
        raise ImageError(f"{root}: no such folder")
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder")
    found: list[tuple[str, Path]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")] if recursive else []
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(directory) / name
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


def load_image(source: ImageLike, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read ``source`` into a validated 8-bit RGB PIL image.

    ``source`` may be a file path, ``"sample:NAME"`` for a bundled sample, the bytes of an image file
    (an upload), a PIL image, a NumPy array
    (H, W), (H, W, 3) or (H, W, 4) of uint8, uint16, bool or floats in [0, 1], or a tensor (3, H, W) /
    (1, 3, H, W) with values in [0, 1]. Raises :class:`ImageError` with the file's name when it cannot
    be used.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, name="image")
    if isinstance(source, np.ndarray):
        return _from_array(source, "array")
    if isinstance(source, torch.Tensor):
        return _from_tensor(source)
    if isinstance(source, str) and source.startswith("sample:"):
        return sample_image(source.split(":", 1)[1])
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(source)), "uploaded image", max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    return _from_file(Path(source), max_pixels)


def sample_image(name: str) -> Image.Image:
    """A bundled sample picture by name (see :data:`SAMPLES`); ships with scikit-image, no download."""
    if name not in SAMPLES:
        raise ImageError(f"unknown sample image {name!r}{suggestion(name, SAMPLES)} (samples: {', '.join(SAMPLES)})")
    from skimage import data  # heavy (scikit-image): imported only when a sample is asked for

    array = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    return _from_array(np.asarray(array), f"sample:{name}")


def _from_file(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    return _open(path, str(path), max_pixels)


def _open(fp: Path | io.BytesIO, path: str, max_pixels: int) -> Image.Image:
    """Open, check the size before decoding, and convert; every failure is an :class:`ImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"{path}: {w}x{h} is too large ({w * h:,} pixels, limit {max_pixels:,})")
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)  # first frame of animations and multi-page files
                img.load()
                return to_rgb(img, name=str(path))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None


def to_rgb(img: Image.Image, *, name: str = "image") -> Image.Image:
    """Convert any PIL image to 8-bit RGB the way a person would expect to see it.

    EXIF orientation is applied; 16-bit and 32-bit integer images are scaled by their bit depth (not
    clipped); float images are read as [0, 1]; transparent pixels are composited on white; CMYK goes
    through PIL's conversion (with the embedded ICC profile when there is one).
    """
    with contextlib.suppress(Exception):  # a broken EXIF block should not stop us from reading the pixels
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if mode == "I" and array.max(initial=0) > 65535:
            peak = float(2**32 - 1)
        return _from_array((np.clip(array / peak, 0, 1) * 255 + 0.5).astype(np.uint8), name)
    if mode == "F":
        return _from_array(np.asarray(img, dtype=np.float32), name)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if "transparency" in img.info:
        return to_rgb(img.convert("RGBA"), name=name)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert mode {mode} to RGB ({exc})") from None


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    profile = img.info.get("icc_profile")
    if profile:
        try:
            # optional part of Pillow (needs LittleCMS): only for CMYK with a profile
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        except Exception:  # a bad or unsupported profile: fall back to the plain conversion
            pass
    return img.convert("RGB")


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: array of shape {tuple(a.shape)} is not an image (H, W), (H, W, 3) or (H, W, 4)")
    if a.size == 0:
        raise ImageError(f"{name}: empty image")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: image holds NaN or infinite values")
        if a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ImageError(f"{name}: float image values must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise ImageError(f"{name}: integer image values must lie in [0, 255]")
        a = a.astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(a))
    return to_rgb(img, name=name) if img.mode != "RGB" else img


def _from_tensor(t: torch.Tensor) -> Image.Image:
    t = t.detach().float().cpu()
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ImageError(f"tensor batch of {t.shape[0]} images; pass one image")
        t = t[0]
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ImageError(f"tensor of shape {tuple(t.shape)} is not an image (3, H, W)")
    return _from_array(t.permute(1, 2, 0).numpy(), "tensor")
