"""Per-image checks of the quality gate, each a measure with a threshold in ``QualityConfig``.

On the grey image (long side at most ``WORK_SIZE``):

* ``blank``: grey-level std below ``min_std`` (blank or washed-out, low contrast);
* ``saturated``: more than ``max_saturated_fraction`` of the pixels clipped to black or white;
* ``noise``: share of spectral energy above half the Nyquist frequency (Hann-windowed FFT) over
  ``max_high_frequency_ratio``: white noise has ~0.80, photographs of skin a few percent;
* ``blur``: variance of the Laplacian below ``min_sharpness``;
* ``no-lesion``: no darker region near the centre (Otsu on the central disc smoothed at 1/16 of
  the side, the component overlapping the central box the most, not a ring), or it covers less than
  ``min_lesion_fraction`` / more than ``max_lesion_fraction`` of the image, or it is darker than
  the skin around it by less than ``min_lesion_contrast`` grey levels.

A rejection's reason starts with the check's name.
"""

from __future__ import annotations

import cv2
import numpy as np

from dermt2im.core.specs import QualityConfig

WORK_SIZE = 256
HF_CUTOFF = 0.25  # cycles / pixel: half the Nyquist frequency


def to_grey(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)


def _work(grey: np.ndarray) -> np.ndarray:
    h, w = grey.shape
    if max(h, w) <= WORK_SIZE:
        return grey
    s = WORK_SIZE / max(h, w)
    return cv2.resize(grey, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def high_frequency_ratio(grey: np.ndarray) -> float:
    """Share of (non-DC) spectral energy above ``HF_CUTOFF`` cycles/pixel, Hann-windowed."""
    g = grey.astype(np.float64)
    g = g - g.mean()
    h, w = g.shape
    if h < 4 or w < 4:
        return 0.0
    g = g * np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2(g)) ** 2
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    r = np.sqrt(fx**2 + fy**2)
    power[0, 0] = 0.0
    total = power.sum()
    return float(power[r > HF_CUTOFF].sum() / total) if total > 0 else 0.0


def sharpness(grey: np.ndarray) -> float:
    return float(cv2.Laplacian(grey.astype(np.float64), cv2.CV_64F).var())


def lesion_region(grey: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(mask, fraction of the image, contrast) of the darker region nearest the centre.

    The grey image is smoothed at 1/16 of its side, so skin texture (pores, fine mottling, noise)
    fades to a few grey levels while a lesion keeps its darkness. Otsu splits the smoothed values
    inside the dermatoscope ring (a disc of 0.92 x the half side, which leaves out dark corners);
    the dark component overlapping the central box (middle half) the most is the lesion, unless it
    is a ring around a brighter centre (illumination fall-off), which is no lesion. Contrast is
    median(skin) - median(lesion) in grey levels on the smoothed image.
    """
    h, w = grey.shape
    smooth = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), max(1.0, min(h, w) / 16))
    yy, xx = np.mgrid[0:h, 0:w]
    ny, nx = (yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2)
    disc = ny**2 + nx**2 <= 0.92**2
    empty = np.zeros((h, w), bool)
    values = smooth[disc]
    if values.size == 0 or values.max() - values.min() < 1:
        return empty, 0.0, 0.0
    thr, _ = cv2.threshold(
        np.clip(values, 0, 255).astype(np.uint8).reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
    )
    dark = ((smooth <= thr) & disc).astype(np.uint8)
    n, labels = cv2.connectedComponents(dark, connectivity=8)
    central = (np.abs(ny) <= 0.5) & (np.abs(nx) <= 0.5)
    overlap = np.bincount(labels[central].ravel(), minlength=n)
    overlap[0] = 0
    best = int(overlap.argmax()) if n > 1 else 0
    if best == 0 or overlap[best] == 0:
        return empty, 0.0, 0.0
    mask = labels == best
    if _is_ring(mask):
        return empty, 0.0, 0.0
    skin = disc & (smooth > thr)
    if not skin.any():
        return mask, float(mask.mean()), 0.0
    return mask, float(mask.mean()), float(np.median(smooth[skin]) - np.median(smooth[mask]))


def _is_ring(mask: np.ndarray) -> bool:
    """True when the region encloses the image centre in a hole larger than itself."""
    h, w = mask.shape
    cy, cx = h // 2, w // 2
    if mask[cy, cx]:
        return False
    outside = np.zeros((h + 2, w + 2), np.uint8)
    filled = mask.astype(np.uint8).copy()
    cv2.floodFill(filled, outside, (0, 0), 2)  # the corner is outside the ring, never in the region
    holes = filled == 0  # neither the region nor reachable from the corner
    if not holes[cy, cx]:
        return False
    n, lab = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
    return int((lab == lab[cy, cx]).sum()) > int(mask.sum())


def image_metrics(rgb: np.ndarray) -> dict[str, float]:
    grey_full = to_grey(rgb)
    grey = _work(grey_full)
    _, fraction, contrast = lesion_region(grey)
    return {
        "grey_std": float(grey_full.std()),
        "saturated_fraction": float(((grey_full <= 2) | (grey_full >= 253)).mean()),
        "high_frequency_ratio": high_frequency_ratio(grey),
        "sharpness": sharpness(grey),
        "lesion_fraction": fraction,
        "lesion_contrast": contrast,
    }


def check_image(rgb: np.ndarray, cfg: QualityConfig) -> tuple[str | None, dict]:
    """(reject reason or None, metrics). The reason's first word names the check."""
    m = image_metrics(rgb)
    if m["grey_std"] < cfg.min_std:
        return f"blank: grey-level std {m['grey_std']:.1f} < {cfg.min_std:g} (blank or low contrast)", m
    if m["saturated_fraction"] > cfg.max_saturated_fraction:
        return (
            f"saturated: {m['saturated_fraction']:.0%} of pixels clipped to black or white "
            f"> {cfg.max_saturated_fraction:.0%}"
        ), m
    if m["high_frequency_ratio"] > cfg.max_high_frequency_ratio:
        return (
            f"noise: high-frequency energy ratio {m['high_frequency_ratio']:.2f} > {cfg.max_high_frequency_ratio:g}"
        ), m
    if m["sharpness"] < cfg.min_sharpness:
        return f"blur: variance of Laplacian {m['sharpness']:.1f} < {cfg.min_sharpness:g}", m
    if m["lesion_fraction"] < cfg.min_lesion_fraction or m["lesion_contrast"] < cfg.min_lesion_contrast:
        return (
            f"no-lesion: no distinct darker region near the centre (area {m['lesion_fraction']:.1%} "
            f"[min {cfg.min_lesion_fraction:.1%}], contrast {m['lesion_contrast']:.1f} grey levels [min {cfg.min_lesion_contrast:g}])"
        ), m
    if m["lesion_fraction"] > cfg.max_lesion_fraction:
        return f"no-lesion: dark region covers {m['lesion_fraction']:.0%} of the image > {cfg.max_lesion_fraction:.0%}", m
    return None, m


def reason_code(reason: str | None) -> str | None:
    """'noise: ...' -> 'noise'; 'near-copy of seed X' -> 'memorised'."""
    if not isinstance(reason, str) or not reason:
        return None
    if reason.startswith("near-copy of seed"):
        return "memorised"
    return reason.split(":", 1)[0].strip()
