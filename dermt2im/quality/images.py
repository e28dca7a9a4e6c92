"""Reading an image for the gate, a local file or an object on an image store, and how many threads
measure images in one process. What the gate keeps from each image is in ``measures``."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from dermt2im.core import storage


def load_rgb(path: str | Path) -> np.ndarray:
    """RGB pixels of a local image or one on an fsspec URL (``storage.images``)."""
    from PIL import Image

    src = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def workers() -> int:
    """Threads for measuring images (OpenCV and onnxruntime release the GIL)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
