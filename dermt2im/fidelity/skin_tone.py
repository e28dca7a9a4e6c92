"""Skin tone: the individual typology angle (ITA) of the skin around the lesion, and its categories.

ITA (Chardon et al. 1991) is computed from CIELAB lightness L* and yellow-blue b*:
``ITA = arctan((L* - 50) / b*) * 180 / pi``; the higher, the lighter the skin. Many dermatoscopes'
white balance leaves light skin with b* near or below 0, where that quotient jumps from +90 to -90
degrees: the angle is taken with ``arctan2(L* - 50, b*)``, equal to the formula for b* > 0 and beyond
+90 (very light) or -90 (dark) for b* <= 0, on the side its lightness says. Its usual categories
(Chardon et al. 1991; Del Bino et al. 2006) are very light (> 55), light (41, 55], intermediate
(28, 41], tan (10, 28], brown (-30, 10] and dark (<= -30). Dermatology datasets are audited with it
(Kinyanjui et al. 2020; Groh et al. 2021) because skin type is rarely recorded.

Which pixels are skin: the image is analysed at ``ANALYSIS_SIDE``; the lesion is the quality gate's
lesion region (``dermt2im.quality.checks.lesion_region``: the darker region nearest the centre,
Otsu on the smoothed grey image inside the dermatoscope disc), grown by ``LESION_MARGIN`` of the side
(its border mixes lesion and skin); outside the dermatoscope disc, nearly black pixels (the
vignette and frames, L* < ``MIN_LIGHTNESS``), specular highlights (L* > ``MAX_LIGHTNESS``) and thin
dark strokes (hair, ink: the gate's black-hat response) are left out too. The ITA of an image is that
of the median L* and median b* of its skin pixels (medians of the colour, not of per-pixel angles).
With fewer than ``MIN_SKIN_FRACTION`` of the disc left as skin the ITA is undefined (NaN), and
counted as such.

CIELAB is OpenCV's conversion of 8-bit sRGB (D65 white): tests check it against scikit-image's
independent implementation and ITA against published CIELAB values of skin.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import cv2
import numpy as np

ANALYSIS_SIDE = 128
LESION_MARGIN = 0.06
MIN_LIGHTNESS = 15.0
MAX_LIGHTNESS = 97.0
MIN_SKIN_FRACTION = 0.02
STROKE_LEVEL = 12.0  # black-hat grey levels above which a pixel is a thin dark stroke

# (name, lower bound exclusive): a value above the bound falls in the bin, checked from the top.
ITA_BINS: tuple[tuple[str, float], ...] = (("very light", 55.0), ("light", 41.0), ("intermediate", 28.0),
                                           ("tan", 10.0), ("brown", -30.0), ("dark", -math.inf))
BIN_NAMES: tuple[str, ...] = tuple(name for name, _ in ITA_BINS)
UNDEFINED = "undefined"


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (L* in [0, 100], a* and b* about [-128, 127]) of an 8-bit sRGB image, float32."""
    x = np.ascontiguousarray(rgb[..., :3]).astype(np.float32) / 255.0
    return cv2.cvtColor(x, cv2.COLOR_RGB2Lab)


def ita_from_lab(lightness: float | np.ndarray, b: float | np.ndarray) -> float | np.ndarray:
    """ITA in degrees, ``arctan2(L* - 50, b*)`` (the module docstring says why not a plain arctan)."""
    out = np.degrees(np.arctan2(np.asarray(lightness, float) - 50.0, np.asarray(b, float)))
    return float(out) if out.ndim == 0 else out


def ita_bin(ita: float) -> str:
    """The category of an ITA value (``UNDEFINED`` for NaN)."""
    if ita is None or not np.isfinite(ita):
        return UNDEFINED
    for name, bound in ITA_BINS:
        if ita > bound:
            return name
    return BIN_NAMES[-1]


@dataclass(frozen=True)
class SkinTone:
    ita: float  # degrees; NaN when undefined
    category: str
    skin_fraction: float  # share of the dermatoscope disc used as skin
    lightness: float  # median L* of the skin pixels
    b: float  # median b*


def _fit(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(np.ascontiguousarray(rgb[..., :3]), size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def skin_mask(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(skin mask, lesion mask, disc) of an image at ``ANALYSIS_SIDE`` (``rgb`` already at that size)."""
    from dermt2im.quality.checks import lesion_region
    from dermt2im.quality.detectors import dark_strokes

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    lesion, _, _ = lesion_region(grey)
    margin = max(1, round(LESION_MARGIN * max(h, w)))
    grown = cv2.dilate(lesion.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1,) * 2))
    yy, xx = np.mgrid[0:h, 0:w]
    ny, nx = (yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2)
    disc = ny**2 + nx**2 <= 0.92**2
    lightness = to_lab(rgb)[..., 0]
    strokes = dark_strokes(grey) > STROKE_LEVEL
    skin = disc & ~grown.astype(bool) & (lightness >= MIN_LIGHTNESS) & (lightness <= MAX_LIGHTNESS) & ~strokes
    return skin, lesion, disc


def skin_tone(rgb: np.ndarray) -> SkinTone:
    """The ITA of the skin around the lesion of an RGB uint8 image (see the module docstring)."""
    small = _fit(rgb, ANALYSIS_SIDE)
    skin, _, disc = skin_mask(small)
    fraction = float(skin.sum() / max(1, disc.sum()))
    if fraction < MIN_SKIN_FRACTION:
        return SkinTone(math.nan, UNDEFINED, fraction, math.nan, math.nan)
    lab = to_lab(small)
    lightness, b = float(np.median(lab[..., 0][skin])), float(np.median(lab[..., 2][skin]))
    ita = ita_from_lab(lightness, b)
    return SkinTone(ita, ita_bin(ita), fraction, lightness, b)


# --- what a prompt asks for ----------------------------------------------------------------------

_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6}
_FITZPATRICK = re.compile(r"fitzpatrick\s+(?:skin\s+)?type\s+(vi|v|iv|iii|ii|i|[1-6])\b", re.IGNORECASE)
_TONE_WORDS = {"fair": 1, "light": 2, "medium": 3, "olive": 4, "brown": 5, "dark brown": 6, "dark": 6, "black": 6}
_TONE = re.compile(r"\bon\s+(dark brown|fair|light|medium|olive|brown|dark|black)\s+skin\b", re.IGNORECASE)


def requested_skin_type(text: str | None) -> int | None:
    """The Fitzpatrick type (1-6) a prompt or transformation asks for ("Fitzpatrick type IV", or
    "on olive skin"), or None when it names none."""
    if not text:
        return None
    m = _FITZPATRICK.search(text)
    if m:
        token = m.group(1).lower()
        return int(token) if token.isdigit() else _ROMAN[token]
    m = _TONE.search(text)
    return _TONE_WORDS[m.group(1).lower()] if m else None
