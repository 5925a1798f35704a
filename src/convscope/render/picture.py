"""What results with a picture share: the picture computed once, shown by Jupyter."""

from __future__ import annotations

from PIL import Image

from .core import png_bytes


class Pictured:
    """Mixin for a result with ``to_image()``: a cached ``.image`` and ``_repr_png_`` for Jupyter.

    The dataclass using it declares ``_image: Image.Image | None = field(default=None, repr=False)``.
    """

    _image: Image.Image | None

    def to_image(self) -> Image.Image:  # pragma: no cover - every result defines it
        raise NotImplementedError

    @property
    def image(self) -> Image.Image:
        """:meth:`to_image` with the result's default settings (computed once)."""
        if self._image is None:
            self._image = self.to_image()
        return self._image

    def _repr_png_(self) -> bytes:
        return png_bytes(self.image)
