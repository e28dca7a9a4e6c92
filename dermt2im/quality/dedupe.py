"""Duplicates among generated images: identical pixels, and near-duplicates; the earliest sample
(lowest index) is kept.

A near-duplicate is found in two steps. The 64-bit DCT perceptual hash proposes pairs within
``near_duplicate_hamming`` bits: cheap, but smooth "dark blob on skin" images of one shape collide
although they are clearly different lesions. Each proposed pair is then confirmed by a finer
comparison, ``thumbnail_distance`` of two 64 px CIELAB thumbnails, before a row is rejected.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from dermt2im.quality.checks import to_grey

THUMB_SIDE = 64


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash (pHash): low 8x8 DCT of a 32x32 grey thumbnail vs its median."""
    small = cv2.resize(to_grey(rgb).astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    block = cv2.dct(small)[:8, :8].ravel()
    bits = block > np.median(block[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_hex(value: int) -> str:
    return f"{value:016x}"


def hamming_matrix(hashes: list[int]) -> np.ndarray:
    """Pairwise Hamming distances between 64-bit hashes (a matrix product over bit vectors)."""
    raw = np.array(hashes, dtype=np.uint64).reshape(-1, 1).view(np.uint8)
    bits = np.unpackbits(raw, axis=1).astype(np.float32)  # bit order does not matter for distances
    ones = bits.sum(1)
    return (ones[:, None] + ones[None, :] - 2 * bits @ bits.T).round().astype(np.int32)


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The 64 px colour thumbnail (uint8) that ``thumbnail_distance`` compares."""
    return cv2.resize(np.ascontiguousarray(rgb[..., :3]), (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA)


def colour_thumbnail(thumb: np.ndarray) -> np.ndarray:
    """A ``thumbnail`` in CIELAB, blurred (sigma 1 px: JPEG blocks and shifts of a few pixels fade),
    each channel's mean removed (a global colour or brightness change is not a different picture),
    a* and b* weighted x2 (pHash sees only grey; smooth lesions of one shape differ mainly in colour)."""
    t = cv2.GaussianBlur(thumb.astype(np.float32) / 255.0, (0, 0), 1.0)
    lab = cv2.cvtColor(t, cv2.COLOR_RGB2Lab)
    lab -= lab.reshape(-1, 3).mean(0)
    lab[..., 1:] *= 2.0
    return lab


def thumbnail_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Relative difference of two ``thumbnail``s: ||A - B|| / sqrt(||A|| ||B||) of their
    ``colour_thumbnail``s. The same picture re-encoded at JPEG q=60, resized, blurred, re-coloured or
    shifted by 4 px stays at or below 0.24; different smooth lesions whose pHashes collide are 0.33+
    apart, different real lesions ~0.7."""
    ta, tb = colour_thumbnail(a), colour_thumbnail(b)
    return float(np.linalg.norm(ta - tb) / (math.sqrt(np.linalg.norm(ta) * np.linalg.norm(tb)) + 1e-6))


def mark_duplicates(measured: list[dict], order: list[int], max_hamming: int,
                    max_distance: float = 0.3) -> dict[int, tuple[str, int]]:
    """Among images at positions ``order`` (earliest first), those that repeat an earlier one:
    position -> (reason, position of the image kept). Identical pixels first, then near-duplicates:
    a pHash within ``max_hamming`` bits confirmed by a ``thumbnail_distance`` of at most
    ``max_distance`` (each measure holds ``pixels``, ``phash`` and ``thumb``)."""
    found: dict[int, tuple[str, int]] = {}
    first_by_pixels: dict[str, int] = {}
    for i in order:
        px = measured[i]["pixels"]
        if px in first_by_pixels:
            found[i] = ("duplicate: identical pixels to {}", first_by_pixels[px])
        else:
            first_by_pixels[px] = i
    rest = [i for i in order if i not in found]
    if len(rest) > 1:
        ham = hamming_matrix([measured[i]["phash"] for i in rest])
        kept = np.zeros(len(rest), bool)
        for a, i in enumerate(rest):
            for b in np.flatnonzero(kept & (ham[a] <= max_hamming)):
                d = thumbnail_distance(measured[i]["thumb"], measured[rest[b]]["thumb"])
                if d <= max_distance:
                    found[i] = (f"near-duplicate: perceptual hash within {int(ham[a, b])} bits and colour "
                                f"thumbnail distance {d:.2f} <= {max_distance:g} of {{}}", rest[int(b)])
                    break
            else:
                kept[a] = True
    return found
