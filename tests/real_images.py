"""The 130 real ISIC images of ../shared/data, prepared as the factory prepares seeds (short side
resized, centre-cropped, no hair removal), decoded once per test process. Tests take the
``real_dermoscopy`` fixture first, so they skip cleanly when ../shared is absent."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd


@functools.cache
def real_images(root: Path, size: int = 512, crop: bool = True) -> tuple[pd.DataFrame, tuple[np.ndarray, ...]]:
    """(labels.csv rows, RGB images) in the CSV's order; ``crop=False`` keeps the short side at ``size``."""
    from dermt2im.preprocess.resize import center_crop, decode_at_least, resize_short_side

    rows = pd.read_csv(root / "labels.csv", keep_default_na=False)
    images = []
    for f in rows["file"]:
        rgb = resize_short_side(decode_at_least((root / "images" / f).read_bytes(), size), size)
        images.append(np.ascontiguousarray(center_crop(rgb, size)) if crop else rgb)
    return rows, tuple(images)
