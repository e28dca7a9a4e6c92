"""Planted near-copies: what a memorised generated image can look like (audit tests and bench/audit.py)."""

from __future__ import annotations

import cv2
import numpy as np


def crop(rgb: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A window whose sides are (1 - fraction) of the image's, at a random position."""
    h, w = rgb.shape[:2]
    ch, cw = round(h * (1 - fraction)), round(w * (1 - fraction))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return rgb[top : top + ch, left : left + cw]


def dihedral_op(rgb: np.ndarray, k: int) -> np.ndarray:
    """k in 0..7: k % 4 quarter turns, then a left-right flip when k >= 4."""
    out = np.rot90(rgb, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Brightness, contrast, saturation and per-channel gain changes, as colour augmentation does."""
    x = rgb.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)  # saturation
    x = x * rng.uniform(1 - 0.1 * strength, 1 + 0.1 * strength, 3)  # white balance
    m = x.mean()
    x = m + (x - m) * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength)  # contrast
    x = x + rng.uniform(-25, 25) * strength  # brightness
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def resize(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def near_copy(rgb: np.ndarray, rng: np.random.Generator, *, crop_range: tuple[float, float] = (0.02, 0.10),
              side: int | None = None, k: int | None = None, quality_range: tuple[int, int] = (60, 90)) -> np.ndarray:
    """Crop 2-10 %, resize (to ``side``, else the seed's side), a flip / quarter turn, jitter, JPEG."""
    out = crop(rgb, float(rng.uniform(*crop_range)), rng)
    out = resize(out, side or min(rgb.shape[:2]))
    out = dihedral_op(out, int(rng.integers(0, 8)) if k is None else k)
    return jpeg(jitter(out, rng), int(rng.integers(quality_range[0], quality_range[1] + 1)))
