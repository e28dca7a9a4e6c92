"""Builders for small image files, good and bad, and for dataset layouts, used by test_ingest."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def _noise(seed: int, size: tuple[int, int] = (16, 12), channels: int = 3) -> np.ndarray:
    w, h = size
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (16, 12), **kw) -> bytes:
    """A small RGB JPEG whose bytes differ for every seed."""
    return _encode(Image.fromarray(_noise(seed, size)), "JPEG", **kw)


def png(seed: int, size: tuple[int, int] = (16, 12)) -> bytes:
    return _encode(Image.fromarray(_noise(seed, size)), "PNG")


def grey_png(seed: int) -> bytes:
    return _encode(Image.fromarray(_noise(seed, channels=1)), "PNG")


def rgba_png(seed: int) -> bytes:
    return _encode(Image.fromarray(_noise(seed, channels=4), "RGBA"), "PNG")


def png16(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 65536, (12, 16)).astype(np.uint16)
    return _encode(Image.fromarray(arr), "PNG")


def cmyk_jpeg(seed: int) -> bytes:
    return _encode(Image.fromarray(_noise(seed)).convert("CMYK"), "JPEG")


def exif_rotated_jpeg(seed: int, orientation: int, size: tuple[int, int] = (20, 10)) -> bytes:
    """A ``size`` JPEG whose EXIF says to rotate it (6: 90° clockwise, 8: 90° counter-clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(seed, size, exif=exif.tobytes())


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` RGB pixels (valid CRCs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


TEXT_AS_JPEG = b"This is not a picture, it is a note that someone saved as .jpg\n" * 3


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def class_folders(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """benign/ and malignant/ with ``per_class`` distinct JPEGs each."""
    for k, label in enumerate(("benign", "malignant")):
        for i in range(per_class):
            put(root / label / f"{label}-{i}.jpg", jpeg(seed + 100 * k + i))
    return root


def phantom_like(root: Path, per_class: int = 3) -> Path:
    """What the phantom generator writes: class folders plus labels.csv (file,label,diagnosis,lesion_id)."""
    rows = []
    for k, (label, diagnosis) in enumerate((("benign", "nevus"), ("malignant", "melanoma"))):
        for i in range(per_class):
            rel = f"{label}/ph-{label}-{i}.png"
            put(root / rel, png(500 + 10 * k + i))
            rows.append((rel, label, diagnosis, f"ph-{label}-{i}"))
    write_csv(root / "labels.csv", ("file", "label", "diagnosis", "lesion_id"), rows)
    return root
