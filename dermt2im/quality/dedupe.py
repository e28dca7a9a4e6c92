"""Duplicates among generated images: identical pixels, and near-duplicates by a 64-bit DCT
perceptual hash; the earliest sample (lowest index) is kept."""

from __future__ import annotations

import cv2
import numpy as np

from dermt2im.quality.checks import to_grey


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


def mark_duplicates(measured: list[dict], order: list[int], max_hamming: int) -> dict[int, tuple[str, int]]:
    """Among images at positions ``order`` (earliest first), those that repeat an earlier one:
    position -> (reason, position of the image kept). Identical pixels first, then near-duplicates."""
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
            close = np.flatnonzero(kept & (ham[a] <= max_hamming))
            if close.size:
                b = int(close[0])
                found[i] = (f"near-duplicate: perceptual hash within {int(ham[a, b])} bits of {{}}", rest[b])
            else:
                kept[a] = True
    return found
