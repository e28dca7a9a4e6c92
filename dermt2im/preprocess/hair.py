"""Hair removal that keeps the lesion: DullRazor (Lee et al. 1997) with its shape verification.

The black-hat (closing minus image) finds every dark structure thinner than its structuring element:
hairs, but also dots, globules, streaks and the pigment network, which are the lesion's diagnostic
detail, and more of it in melanoma, so removing them is a class-dependent change a classifier can
learn. DullRazor keeps only thin, long, line-like candidates; so does this, in two steps:

1. Line evidence (``line_evidence``): the black-hat opened with a straight segment
   (``hair_line_length`` at 512 px) in 12 orientations, maximum kept. An opening keeps only what
   contains such a segment: a hair does along its axis; dots, globules and the network's meshes,
   whose straight runs are shorter, vanish.
2. Shape (``hair_like``): connected components of line evidence above ``hair_line_threshold`` are
   kept when long (``hair_min_length``; half that for one leaving the picture) and thin (length over
   mean width at least ``hair_min_elongation``).

Kept hairs are continued along fainter line evidence (a hair over the dark lesion has less
contrast), grown into the candidates (black-hat above ``hair_threshold``: the hair's full width, its
ends, gaps at crossings) and by one pixel into its soft rim, then filled (Telea or Navier-Stokes) at
full resolution. Sizes are given at 512 px and scaled with the image's short side; pure functions on
H x W x 3 uint8 arrays.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from dermt2im.core.specs import PreprocessConfig

REFERENCE_SIDE = 512  # the resolution at which sizes are specified
ORIENTATIONS = 12
WEAK_LINE_THRESHOLD = 10  # line evidence that continues a verified hair
GROW = 6  # px at 512: how far the mask may extend from the line evidence into the candidates
RIM_THRESHOLD = 4  # black-hat grey levels at a hair's soft edge
DEFAULT = PreprocessConfig()


def scaled(px: float, side: int, *, odd: bool = False, minimum: int = 1) -> int:
    """``px`` (given at 512 px) for an image whose short side is ``side``."""
    n = max(minimum, int(round(px * side / REFERENCE_SIDE)))
    return n + 1 - n % 2 if odd else n


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)


def blackhat(rgb: np.ndarray, cfg: PreprocessConfig = DEFAULT) -> np.ndarray:
    """Dark detail thinner than ``hair_kernel_size``, in grey levels (uint8)."""
    g = cv2.GaussianBlur(grey(rgb), (3, 3), 0)  # single noisy pixels and JPEG blocks are no hair
    k = scaled(cfg.hair_kernel_size, min(g.shape), odd=True, minimum=3)
    return cv2.morphologyEx(g, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k)))


def line_kernel(length: int, angle: float) -> np.ndarray:
    """A one-pixel-wide straight segment of ``length`` pixels at ``angle`` radians, centred."""
    k = np.zeros((length, length), np.uint8)
    c = (length - 1) / 2
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    cv2.line(k, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1, 1)
    return k


def line_evidence(bh: np.ndarray, cfg: PreprocessConfig = DEFAULT) -> np.ndarray:
    """Max over orientations of the black-hat opened by a straight segment: high only on lines."""
    length = scaled(cfg.hair_line_length, min(bh.shape), odd=True, minimum=5)
    out = np.zeros_like(bh)
    for i in range(ORIENTATIONS):
        np.maximum(out, cv2.morphologyEx(bh, cv2.MORPH_OPEN, line_kernel(length, math.pi * i / ORIENTATIONS)), out=out)
    return out


def candidate_mask(rgb: np.ndarray, cfg: PreprocessConfig = DEFAULT) -> np.ndarray:
    """DullRazor's candidates: everything dark and thin (hair, dots, globules, network)."""
    return blackhat(rgb, cfg) > cfg.hair_threshold


def hair_like(mask: np.ndarray, cfg: PreprocessConfig = DEFAULT) -> np.ndarray:
    """The connected components of ``mask`` that are long and thin, as one mask. A component touching
    the frame may be a hair leaving the picture: half the length will do."""
    h, w = mask.shape
    min_length = cfg.hair_min_length * min(h, w) / REFERENCE_SIDE
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    for i in range(1, n):
        x, y, bw, bh = stats[i, :4]
        need = min_length / 2 if (x == 0 or y == 0 or x + bw == w or y + bh == h) else min_length
        if max(bw, bh) < need * 0.7:
            continue  # cannot be long enough at any angle: skip the costlier measure
        ys, xs = np.nonzero(labels[y : y + bh, x : x + bw] == i)
        (_, _), (rw, rh), _ = cv2.minAreaRect(np.column_stack([xs, ys]).astype(np.float32))
        length = max(rw, rh)
        keep[i] = length >= need and length * length / stats[i, cv2.CC_STAT_AREA] >= cfg.hair_min_elongation
    return keep[labels]


def connected_to(seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The connected components of ``mask | seeds`` that contain a ``seeds`` pixel."""
    n, labels = cv2.connectedComponents((mask | seeds).astype(np.uint8), connectivity=8)
    hit = np.zeros(n, bool)
    hit[labels[seeds]] = True
    hit[0] = False
    return hit[labels]


def grow_within(seeds: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """``seeds`` grown by up to ``steps`` pixels (8-connected), never outside ``allowed``."""
    out = seeds.astype(np.uint8)
    allowed8 = allowed.astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(steps):
        out = cv2.dilate(out, kernel) & allowed8 | out
    return out > 0


def hair_mask(rgb: np.ndarray, cfg: PreprocessConfig = DEFAULT) -> np.ndarray:
    """Hair pixels (bool): verified line-like components, continued along fainter line evidence and
    grown into the candidates around them."""
    bh = blackhat(rgb, cfg)
    lines = line_evidence(bh, cfg)
    hairs = hair_like(lines > cfg.hair_line_threshold, cfg)
    if not hairs.any():
        return hairs
    hairs = connected_to(hairs, lines > WEAK_LINE_THRESHOLD)
    # the growth fills the hair's width, its ends and the gaps where a crossing or the lesion broke it
    mask = grow_within(hairs, bh > cfg.hair_threshold, scaled(GROW, min(bh.shape)))
    # and the soft rim, only where darker than its surround: a blind dilation fills good pixels too
    return grow_within(mask, bh > RIM_THRESHOLD, 1)


def inpaint(rgb: np.ndarray, mask: np.ndarray, cfg: PreprocessConfig = DEFAULT) -> np.ndarray:
    """Fill the masked pixels from their surroundings; the rest is untouched (a copy when no mask).
    At full resolution: the verified masks are small (a half-resolution fill cost ~0.8 dB)."""
    if not mask.any():
        return rgb.copy()
    method = cv2.INPAINT_TELEA if cfg.inpaint_method == "telea" else cv2.INPAINT_NS
    return cv2.inpaint(np.ascontiguousarray(rgb), mask.astype(np.uint8) * 255, cfg.inpaint_radius, method)


def remove_hair(rgb: np.ndarray, cfg: PreprocessConfig = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """(restored image, boolean hair mask) of an H x W x 3 uint8 image at its working resolution."""
    mask = hair_mask(rgb, cfg)
    return inpaint(rgb, mask, cfg), mask


def changed_fraction(before: np.ndarray, after: np.ndarray, levels: int = 10) -> float:
    """Share of pixels whose grey level moved by more than ``levels``."""
    return float((np.abs(grey(before).astype(np.int16) - grey(after).astype(np.int16)) > levels).mean())
