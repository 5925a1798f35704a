"""Class names that ship with the libraries (no download)."""

from __future__ import annotations

from functools import cache


@cache
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in standard index order (torchvision's metadata)."""
    # heavy (torchvision): loaded on first use. A private module, but the only offline copy of the names
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def default_labels(num_classes: int) -> list[str]:
    """ImageNet names for 1000 classes, otherwise ``class 0``, ``class 1``, ..."""
    return imagenet_labels() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]
