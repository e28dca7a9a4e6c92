"""Per-image checks of the quality gate, each a measure with a threshold in ``QualityConfig``.

Image measures, on the grey image (long side at most ``WORK_SIZE``):

* ``blank``: grey-level std below ``min_std`` (blank or washed-out, low contrast);
* ``saturated``: more than ``max_saturated_fraction`` of the pixels clipped to black or white;
* ``noise``: share of spectral energy above half the Nyquist frequency (Hann-windowed FFT) over
  ``max_high_frequency_ratio``: white noise has ~0.80, photographs of skin a few percent;
* ``blur``: variance of the Laplacian below ``min_sharpness``;
* ``no-lesion``: no darker region near the centre (Otsu on the central disc smoothed at 1/16 of
  the side, the component overlapping the central box the most, not a ring), or it covers less than
  ``min_lesion_fraction`` / more than ``max_lesion_fraction`` of the image, or it is darker than
  the skin around it by less than ``min_lesion_contrast`` grey levels.

The grey std, the sharpness and the lesion's contrast are taken at a common brightness for images
darker than mid-grey (``brightness_gain``; the sharpness, a variance, by the gain once: see
``image_metrics``): darker skin
gives proportionally smaller differences in grey levels for the same picture, and a gate calibrated
on light seeds would otherwise call a lesion on dark skin blank, blurred or absent (13 of 24
Fitzpatrick type VI phantoms were "blank" before; in the demo, once the miniature model drew the
skin types its prompts name, all 6 type VI images were "blurred" at a sharpness 5.5 times below type
I's, at gains of 1.7-2.0). A blank, black or blurred image stays so: its differences are scaled,
not created, and the gain is capped.

The cuts of ``blank``, ``noise``, ``blur`` and the lesion contrast come from the accepted seeds when
the config leaves them empty (``calibrate``); ``FALLBACK_CUTS`` when there are too few seeds.

Then the detectors (``detectors``, ``rulers``, ``text``; hair from ``dermt2im.preprocess.hair``),
each setting a *flag* when its score passes its threshold: ``face``, ``text``, ``ruler``, ``ink``,
``frame``, ``hair``. A flag rejects when ``quality.reject_flags`` names it (faces and text by
default); the others are recorded and their per-class rates audited (``shortcuts``).

``gate_image`` runs everything: ``gate_measures`` (the costly part, independent of the calibrated
cuts), then ``judge``; a rejection's reason starts with the check's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from dermt2im.core.specs import FLAGS, QualityConfig
from dermt2im.preprocess.hair import hair_mask
from dermt2im.quality.detectors import face_score, fit, frame_score, ink_score
from dermt2im.quality.rulers import detect_rulers
from dermt2im.quality.text import text_score

WORK_SIZE = 256
MID_GREY = 128.0
MAX_BRIGHTNESS_GAIN = 3.0  # images darker than MID_GREY / 3 are measured at a third of mid-grey at most
HF_CUTOFF = 0.25  # cycles / pixel: half the Nyquist frequency
# The calibrated cuts when the config leaves them empty and there are too few seeds to calibrate on.
FALLBACK_CUTS = {"min_std": 8.0, "max_high_frequency_ratio": 0.35, "min_sharpness": 5.0, "min_lesion_contrast": 10.0}
SCORE_COLUMNS = {"face": "face_score", "text": "text_score", "ruler": "ruler_score", "ink": "ink_score",
                 "frame": "frame_score", "hair": "hair_fraction"}


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


def brightness_gain(grey: np.ndarray) -> float:
    """The factor that brings an image darker than mid-grey to mid-grey (its median grey level),
    1 for brighter images, at most ``MAX_BRIGHTNESS_GAIN``: contrast scales with brightness, so the
    same lesion on darker skin differs from its skin by fewer grey levels."""
    median = float(np.median(grey))
    return float(min(MAX_BRIGHTNESS_GAIN, max(1.0, MID_GREY / max(median, 1.0))))


def image_metrics(rgb: np.ndarray) -> dict[str, float]:
    grey_full = to_grey(rgb)
    grey = _work(grey_full)
    _, fraction, contrast = lesion_region(grey)
    gain = brightness_gain(grey_full)
    return {
        "grey_std": float(grey_full.std()) * gain,
        "saturated_fraction": float(((grey_full <= 2) | (grey_full >= 253)).mean()),
        "high_frequency_ratio": high_frequency_ratio(grey),
        # A variance, so the picture's structure scales with the square of brightness; but what is
        # left of a blurred picture is mostly noise, which does not darken with the skin: scaled by
        # the gain once (squared, a blurred dark real image passed the blur cut).
        "sharpness": sharpness(grey) * gain,
        "lesion_fraction": fraction,
        "lesion_contrast": contrast * gain,
    }


def cut(cfg: QualityConfig, name: str) -> float:
    """A cut of the config, or its fallback when the config leaves it to calibration."""
    value = getattr(cfg, name)
    return FALLBACK_CUTS[name] if value is None else float(value)


def check_image(rgb: np.ndarray, cfg: QualityConfig) -> tuple[str | None, dict]:
    """(reject reason or None, metrics) of the image-measure checks. The reason's first word names the check."""
    m = image_metrics(rgb)
    return measure_reason(m, cfg), m


def measure_failures(m: dict[str, float], cfg: QualityConfig) -> list[str]:
    """Every image-measure check that ``m`` fails, as reasons, in check order."""
    min_std, max_hf = cut(cfg, "min_std"), cut(cfg, "max_high_frequency_ratio")
    min_sharp, min_contrast = cut(cfg, "min_sharpness"), cut(cfg, "min_lesion_contrast")
    out = []
    if m["grey_std"] < min_std:
        out.append(f"blank: grey-level std {m['grey_std']:.1f} < {min_std:g} (blank or low contrast)")
    if m["saturated_fraction"] > cfg.max_saturated_fraction:
        out.append(f"saturated: {m['saturated_fraction']:.0%} of pixels clipped to black or white "
                   f"> {cfg.max_saturated_fraction:.0%}")
    if m["high_frequency_ratio"] > max_hf:
        out.append(f"noise: high-frequency energy ratio {m['high_frequency_ratio']:.2f} > {max_hf:g}")
    if m["sharpness"] < min_sharp:
        out.append(f"blur: variance of Laplacian {m['sharpness']:.1f} < {min_sharp:g}")
    if m["lesion_fraction"] < cfg.min_lesion_fraction or m["lesion_contrast"] < min_contrast:
        out.append(f"no-lesion: no distinct darker region near the centre (area {m['lesion_fraction']:.1%} "
                   f"[min {cfg.min_lesion_fraction:.1%}], contrast {m['lesion_contrast']:.1f} grey levels "
                   f"[min {min_contrast:g}])")
    elif m["lesion_fraction"] > cfg.max_lesion_fraction:
        out.append(f"no-lesion: dark region covers {m['lesion_fraction']:.0%} of the image > "
                   f"{cfg.max_lesion_fraction:.0%}")
    return out


def measure_reason(m: dict[str, float], cfg: QualityConfig) -> str | None:
    """Why the image measures ``m`` fail the gate (the first failing check), or None."""
    failures = measure_failures(m, cfg)
    return failures[0] if failures else None


# --------------------------------------------------------------------------- detectors and flags


def detector_scores(rgb: np.ndarray, cfg: QualityConfig) -> dict[str, float]:
    """Every detector's score (``SCORE_COLUMNS``) on one image."""
    img = fit(rgb)
    rulers = detect_rulers(img)
    flagged = [r for r in rulers if r.score > cfg.max_ruler_score]  # labels beside them are the ruler's
    return {
        "face_score": face_score(img),
        "text_score": text_score(img, flagged),
        "ruler_score": max((r.score for r in rulers), default=0.0),
        "ink_score": ink_score(img),
        "frame_score": frame_score(img),
        "hair_fraction": float(hair_mask(img).mean()),
    }


def thresholds(cfg: QualityConfig) -> dict[str, float]:
    return {"face": cfg.max_face_score, "text": cfg.max_text_score, "ruler": cfg.max_ruler_score,
            "ink": cfg.max_ink_score, "frame": cfg.max_frame_score, "hair": cfg.max_hair_fraction}


def flags_of(scores: dict[str, float], cfg: QualityConfig) -> list[str]:
    """The flags whose score passes its threshold, in ``FLAGS`` order."""
    limits = thresholds(cfg)
    return [f for f in FLAGS if scores.get(SCORE_COLUMNS[f], 0.0) > limits[f]]


_FLAG_WORDS = {"face": "face score {:.0f}", "text": "text-line probability {:.2f}", "ruler": "ruler score {:.2f}",
               "ink": "ink strokes {:.1f} per mille", "frame": "black border {:.0f}%", "hair": "hair {:.1%} of pixels"}


def flag_reason(flag: str, scores: dict[str, float], cfg: QualityConfig) -> str:
    default = flag in QualityConfig().reject_flags
    why = "" if default else " (quality.reject_flags)"
    limit = thresholds(cfg)[flag]
    shown = f"{limit:.1%}" if flag == "hair" else f"{limit:g}"
    return f"{flag}: {_FLAG_WORDS[flag].format(scores[SCORE_COLUMNS[flag]])} > {shown}{why}"


@dataclass
class Verdict:
    """The gate on one image: why it is rejected (None: accepted), its flags, every measure and score."""

    reason: str | None
    flags: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def gate_measures(rgb: np.ndarray, cfg: QualityConfig) -> dict[str, float]:
    """Every image measure and detector score of one image: what costs time. They depend on no
    calibrated cut (only ``max_ruler_score``, see ``detector_scores``), so they can be measured while
    rendering goes on and judged once the cuts are known (``judge``)."""
    metrics = image_metrics(rgb)
    metrics.update(detector_scores(rgb, cfg))
    return metrics


def judge(metrics: dict[str, float], cfg: QualityConfig) -> Verdict:
    """The gate's decision on measured ``metrics`` with the cuts of ``cfg``: image measures first (a
    broken image), then the flags that reject."""
    flags = flags_of(metrics, cfg)
    reason = measure_reason(metrics, cfg)
    if reason is None:
        rejecting = [f for f in flags if f in cfg.reject_flags]
        reason = flag_reason(rejecting[0], metrics, cfg) if rejecting else None
    return Verdict(reason, flags, metrics)


def gate_image(rgb: np.ndarray, cfg: QualityConfig) -> Verdict:
    """The whole gate on one image: ``judge(gate_measures(rgb, cfg), cfg)``."""
    return judge(gate_measures(rgb, cfg), cfg)


def reason_code(reason: str | None) -> str | None:
    """'noise: ...' -> 'noise'; 'near-copy of seed X' -> 'memorised'."""
    if not isinstance(reason, str) or not reason:
        return None
    if reason.startswith("near-copy of seed"):
        return "memorised"
    return reason.split(":", 1)[0].strip()
