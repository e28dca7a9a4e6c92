"""Rulers and scale bars: rows of evenly spaced dark ticks along a line, at any angle.

A ruler is a *flag* (it occurs in real dermoscopy), rejecting only when ``quality.reject_flags``
names it. ``comb_score`` also tells the text check a row of ticks from a line of letters.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from dermt2im.quality.detectors import dark_strokes, fit, grey, too_small

_ANGLES = tuple(range(0, 180, 15))


@dataclass(frozen=True)
class Ruler:
    centre: tuple[float, float]  # x, y in the analysed image
    angle: float  # degrees, direction of the bar
    length: float
    width: float
    period: int  # px between the ticks that repeat best
    score: float


def _line_kernel(length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), np.uint8)
    c = length // 2
    dx, dy = math.cos(math.radians(angle)) * c, math.sin(math.radians(angle)) * c
    cv2.line(k, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1, 1)
    return k


@functools.cache
def _kernels() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {a: (_line_kernel(21, a), _line_kernel(61, a)) for a in _ANGLES}


def comb_score(profiles: np.ndarray, min_lag: int = 4, min_ticks: int = 8) -> tuple[float, int]:
    """How well 1-D profiles repeat with one period: (best score, period) over the rows.

    Each profile is high-passed (minus a Gaussian of sigma 6 px: lesion edges and illumination go)
    and autocorrelated (normalised, unbiased). A period P is a local maximum of the autocorrelation;
    its score is min(ac(P), ac(2P), ac(3P)): ticks repeat at every multiple of their spacing, while
    hair, pigment network and noise rarely correlate at three multiples at once. 1 is a perfect comb;
    skin texture scores up to ~0.6, photographed rulers 0.7-0.97.
    """
    profiles = np.atleast_2d(np.asarray(profiles, np.float32))
    n = profiles.shape[1]
    hi = n // min_ticks
    if hi <= min_lag or 3 * hi >= n:
        return 0.0, 0
    p = profiles - cv2.GaussianBlur(profiles, (0, 0), sigmaX=6, sigmaY=1e-3)
    f = np.fft.rfft(p, 2 * n, axis=1)
    ac = np.fft.irfft(np.abs(f) ** 2, axis=1)[:, :n]
    zero = ac[:, :1]
    ok = zero[:, 0] > 1e-6
    if not ok.any():
        return 0.0, 0
    ac = ac[ok] / zero[ok] * (n / (n - np.arange(n)))
    lags = np.arange(min_lag, hi + 1)
    peak = (ac[:, lags] >= ac[:, lags - 1]) & (ac[:, lags] >= ac[:, lags + 1])
    s = np.minimum(np.minimum(ac[:, lags], ac[:, 2 * lags]), ac[:, 3 * lags])
    s = np.where(peak, s, -np.inf)
    r, k = np.unravel_index(int(np.argmax(s)), s.shape)
    best = float(s[r, k])
    return (best, int(lags[k])) if np.isfinite(best) else (0.0, 0)


def _band(img: np.ndarray, centre: np.ndarray, d: np.ndarray, length: float, width: float) -> np.ndarray:
    """The rectangle of ``img`` along unit direction ``d``: rows across the band, columns along it."""
    nrm = np.array([-d[1], d[0]])
    u = np.arange(-length / 2, length / 2, dtype=np.float32)
    v = np.arange(-width / 2, width / 2 + 1, dtype=np.float32)
    xs = centre[0] + u[None] * d[0] + v[:, None] * nrm[0]
    ys = centre[1] + u[None] * d[1] + v[:, None] * nrm[1]
    return cv2.remap(img, xs.astype(np.float32), ys.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def band_comb(strokes: np.ndarray, centre: np.ndarray, d: np.ndarray, length: float, width: float,
              min_ticks: int = 8) -> tuple[float, int]:
    """Comb score of 5 px strips (every 2 px) across a band 12 px wider on each side than ``width``:
    ticks stand on one side of a baseline, so one strip holds them undiluted."""
    patch = _band(strokes, centre, d, length, width + 24)
    strips = np.stack([patch[r : r + 5].mean(0) for r in range(0, max(1, patch.shape[0] - 4), 2)])
    return comb_score(strips, min_ticks=min_ticks)


def _bands(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """(centre, direction, length, width) of every long band of closed-up strokes, per direction."""
    found = []
    for close_k, open_k in _kernels().values():
        m = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, close_k), cv2.MORPH_OPEN, open_k)
        _, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        for k in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= 60):
            if k == 0:
                continue
            x, y, w, h = stats[k, :4]
            ys, xs = np.nonzero(lab[y : y + h, x : x + w] == k)
            pts = np.column_stack([xs + x, ys + y]).astype(np.float32)
            mean = pts.mean(0)
            _, vecs = np.linalg.eigh(np.cov((pts - mean).T))
            d = vecs[:, 1]
            nrm = np.array([-d[1], d[0]])
            u, v = (pts - mean) @ d, (pts - mean) @ nrm
            length, width = float(u.max() - u.min()), float(v.max() - v.min())
            if length >= 48 and width <= 40:
                centre = mean + d * (u.max() + u.min()) / 2 + nrm * (v.max() + v.min()) / 2
                found.append((centre, d, length, width))
    return found


def detect_rulers(rgb: np.ndarray, min_score: float = 0.5) -> list[Ruler]:
    """Scale bars, best first.

    Dark thin strokes (black-hat > 12 grey levels) are closed along 12 directions (21 px line) so a
    row of ticks becomes a band, and opened with a 61 px line so only bands that long survive. Each
    band's direction comes from its pixels' principal axis; the stroke map is resampled along it and
    scored by ``comb_score``. Bands shorter than 48 px or wider than 40 px are skipped.
    """
    rgb = fit(rgb)
    if too_small(rgb):
        return []
    strokes = dark_strokes(grey(rgb))
    found: list[Ruler] = []
    for centre, d, length, width in _bands((strokes > 12).astype(np.uint8)):
        score, period = band_comb(strokes, centre, d, length, width)
        if score >= min_score:
            angle = math.degrees(math.atan2(d[1], d[0])) % 180
            found.append(Ruler((float(centre[0]), float(centre[1])), angle, length, width, period, score))
    return sorted(found, key=lambda r: -r.score)


def ruler_score(rgb: np.ndarray) -> float:
    """Best comb score of a tick row, 0..1; 0 when none. Default flag above 0.7
    (``quality.max_ruler_score``): the full rulers in the real ISIC set score 0.73-0.97, other real
    images at most 0.62."""
    return max((r.score for r in detect_rulers(rgb)), default=0.0)
