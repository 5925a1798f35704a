"""Progress bars: tqdm, as widgets in Jupyter when ipywidgets is installed, as text everywhere else.

Every long loop in convscope takes a ``progress=`` flag and draws its bar with :data:`tqdm` from here.
``tqdm.auto`` alone prints "IProgress not found" in a notebook without ipywidgets; this module picks the
widget bar only when it can work (``pip install convscope[notebook]``), the text bar otherwise.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:  # no widgets: the plain text bar, also inside Jupyter (no warning)
    from tqdm.std import tqdm

__all__ = ["tqdm"]
