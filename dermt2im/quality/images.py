"""Reading images for the quality gate: local files or objects on an image store."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dermt2im.core import storage


def load_rgb(path: str | Path) -> np.ndarray:
    """RGB pixels of a local image or one on an fsspec URL (``storage.images``)."""
    from PIL import Image

    src = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))
