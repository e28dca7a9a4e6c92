"""Safe image decoding: every failure becomes a ``DecodeError`` with a reason a person can read.

Readable-but-unusual inputs are normalised to 8-bit RGB: 16-bit and float greyscale are rescaled,
palette / greyscale / CMYK are converted, alpha is composited onto white, and EXIF orientation is
applied so that pixels are upright.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermt2im.core.errors import DecodeError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # H x W x 3, uint8
    mode: str  # Pillow mode as stored in the file
    exif_rotated: bool

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c in b"\t\n\r\x0c" or 32 <= c < 127 or c >= 128 for c in head)


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        grey = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


# Pillow warns between its limit and twice it, and raises above. We check our own limit from the
# header before decoding, so its warning is noise; ignoring it once at import (rather than toggling
# global state per call) keeps decoding thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)


def _too_many_pixels(width: int, height: int, limit: int) -> DecodeError:
    return DecodeError(
        f"too many pixels: {width}x{height} = {width * height:,} exceeds the limit of {limit:,} "
        "(possible decompression bomb)"
    )


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data`` fully into upright 8-bit RGB, or raise ``DecodeError`` saying why not.

    Thread-safe: no global Pillow settings are changed.
    """
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = "text" if _looks_like_text(data) else "unknown binary data"
        raise DecodeError(f"not an image: content is {kind} ({len(data)} bytes)") from None
    except Image.DecompressionBombError as err:  # Pillow refuses above twice its own limit, before we see the size
        found = re.search(r"\((\d+) pixels\)", str(err))
        count = f"{int(found.group(1)):,}" if found else "more than twice Pillow's limit"
        raise DecodeError(f"too many pixels: {count} exceeds the limit (possible decompression bomb)") from None
    except _DECODE_ERRORS as err:
        raise DecodeError(f"truncated or corrupt image header: {err}") from None
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise DecodeError(f"animated or multi-page {img.format or 'image'} ({frames} frames): which frame shows the "
                          "lesion is unclear; save that frame as an image of its own")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, max_pixels)
    mode = img.mode
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise DecodeError(f"too many pixels (possible decompression bomb): {err}") from None
    except _DECODE_ERRORS as err:
        raise DecodeError(f"truncated or corrupt {img.format or 'image'} data: {err}") from None
    try:
        orientation = img.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        orientation = 1  # unreadable EXIF: keep the pixels as stored
    rotated = orientation not in (None, 1)
    try:
        if rotated:
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
    except _DECODE_ERRORS as err:
        raise DecodeError(f"cannot convert {mode} image to RGB: {err}") from None
    return DecodedImage(rgb=np.ascontiguousarray(rgb), mode=mode, exif_rotated=rotated)


def encode_png(rgb: np.ndarray, text: dict[str, str] | None = None, compress_level: int = 6) -> bytes:
    """Encode RGB pixels as PNG, optionally with tEXt chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()
