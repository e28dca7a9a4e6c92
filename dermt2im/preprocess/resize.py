"""Decoding at the working size, resizing the short side and centre-cropping, and the whole
per-image pipeline (``preprocess_image``).

Order of operations, and why: decode -> resize so the short side is ``cfg.size`` -> hair removal ->
centre-crop. Real dermoscopy is up to 3072 x 2304 px while the output is 512 px, so removing hair
at full resolution spends ~30x the work on pixels that are averaged away a moment later; at the
working resolution a hair is still 2-6 px wide, which is what DullRazor's structuring element is
sized for (``hair_kernel_size`` is given at 512 px and scaled with the working short side). Hair is
removed before the crop so that inpainting near the crop edge still sees the pixels beyond it.
Large JPEGs are decoded straight at a reduced scale (libjpeg DCT scaling), never below the
working size.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps

from dermt2im.core.errors import DecodeError
from dermt2im.core.imaging import DEFAULT_MAX_PIXELS, decode_image
from dermt2im.core.specs import PreprocessConfig
from dermt2im.preprocess.hair import changed_fraction, remove_hair

# A resize may produce at most this many pixels (or 64 x size^2 when that is more): a strip of
# 1 x 100000 pixels would otherwise ask for gigabytes before anything else could refuse it.
RESIZE_BUDGET = 1 << 26


def resize_short_side(rgb: np.ndarray, size: int) -> np.ndarray:
    """Scale so that the short side is ``size`` (area averaging down, bicubic up), keeping aspect.
    Raises ``DecodeError`` before allocating when the result would exceed the pixel budget."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    budget = max(RESIZE_BUDGET, 64 * size * size)
    if new_w * new_h > budget:
        raise DecodeError(f"image too elongated: resizing {w}x{h} to a short side of {size} px would make "
                          f"{new_w}x{new_h} pixels (more than {budget:,})")
    if (new_w, new_h) == (w, h):
        return rgb
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window of an image whose sides are both at least ``size``."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {w}x{h}")
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size``, then take the central square: size x size x 3."""
    return np.ascontiguousarray(center_crop(resize_short_side(rgb, size), size))


def decode_at_least(data: bytes, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to upright RGB, letting libjpeg downscale a large JPEG by 1/2, 1/4 or 1/8 on the way,
    but never below ``short_side``. Anything else, and every failure, goes through ``decode_image``,
    which raises ``DecodeError`` with the reason."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if img.format == "JPEG" and 0 < w * h <= max_pixels and min(w, h) >= 2 * short_side:
                img.draft(img.mode, (short_side, short_side))  # keeps both sides >= short_side
                img.load()
                img = ImageOps.exif_transpose(img)
                return np.ascontiguousarray(np.asarray(img.convert("RGB")))
        except Exception:  # noqa: BLE001 - decode_image below names the problem
            pass
    try:
        return decode_image(data, max_pixels).rgb
    except DecodeError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # e.g. a header cut short inside EXIF
        raise DecodeError(f"truncated or corrupt image data: {err}") from None


def preprocess_image(
    data: bytes, cfg: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, float]:
    """Encoded image bytes -> (cfg.size x cfg.size x 3 uint8 RGB, fraction of output pixels that were hair).

    Raises ``DecodeError`` when the bytes are not a usable image.
    """
    rgb, fraction, _ = preprocess_with_change(data, cfg, max_pixels=max_pixels)
    return rgb, fraction


def preprocess_with_change(
    data: bytes, cfg: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, float, float]:
    """``preprocess_image`` plus the share of output pixels whose grey level hair removal moved by
    more than 10 (what the preprocess report compares between the classes)."""
    rgb = resize_short_side(decode_at_least(data, cfg.size, max_pixels), cfg.size)
    if not cfg.hair_removal:
        return np.ascontiguousarray(center_crop(rgb, cfg.size)), 0.0, 0.0
    restored, mask = remove_hair(rgb, cfg)
    before, after = center_crop(rgb, cfg.size), np.ascontiguousarray(center_crop(restored, cfg.size))
    return after, float(center_crop(mask, cfg.size).mean()), changed_fraction(before, after)
