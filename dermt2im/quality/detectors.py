"""Detectors for what a person curating dermoscopy throws away or notes: human faces, ink and pen
marks, dermatoscope frames (here), rulers (``rulers``) and text or watermarks (``text``).

Each detector is a pure function on an RGB uint8 array that returns a score with a documented
meaning; its threshold is a ``QualityConfig`` field. Images are analysed at ``ANALYSIS_SIDE`` (the
factory's 512 px; larger inputs are downscaled first). Below ``MIN_SIDE`` px (the test suite's and
the smoke preset's 64 px images) no detector fires: there is no room for a readable face, word or
ruler, and the score is 0.

Faces and text reject; rulers, ink and frames also occur in real dermoscopy, so they are *flags*
(``dermt2im.quality.checks``) that reject only when ``quality.reject_flags`` names them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dermt2im.core.errors import DermT2imError

MIN_SIDE = 128
ANALYSIS_SIDE = 512


class DetectorUnavailable(DermT2imError, RuntimeError):
    """A detector's model (Haar cascades, the text-detection ONNX) is not installed: the gate stops
    rather than pass faces or text unchecked."""


def fit(rgb: np.ndarray, side: int = ANALYSIS_SIDE) -> np.ndarray:
    """RGB with the long side at most ``side`` (area-averaged), contiguous uint8."""
    rgb = np.ascontiguousarray(rgb[..., :3] if rgb.ndim == 3 else np.dstack([rgb] * 3))
    h, w = rgb.shape[:2]
    if max(h, w) <= side:
        return rgb
    s = side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def too_small(rgb: np.ndarray) -> bool:
    return min(rgb.shape[:2]) < MIN_SIDE


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)


def dark_strokes(grey_image: np.ndarray) -> np.ndarray:
    """Black-hat (closing minus image, 9 px disc): thin dark strokes (ticks, hair, text), grey levels."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    return cv2.morphologyEx(grey_image, cv2.MORPH_BLACKHAT, k).astype(np.float32)


# --------------------------------------------------------------------------- faces


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, w, h in the analysed image
    neighbours: int  # merged detections of the weaker of the two cascades
    eyes: bool  # two eyes side by side in its upper part
    score: float


_CASCADE_FILES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml", "haarcascade_eye.xml")
_local = threading.local()  # a CascadeClassifier is not safe to share between threads


def _cascades() -> tuple[cv2.CascadeClassifier, ...]:
    found = getattr(_local, "cascades", None)
    if found is not None:
        return found
    root = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not hasattr(cv2, "CascadeClassifier") or not root:
        raise DetectorUnavailable(
            f"the face check needs OpenCV's Haar cascades, which OpenCV {cv2.__version__} lacks "
            "(cv2.CascadeClassifier / cv2.data.haarcascades); install opencv-python-headless>=4.9,<5")
    cascades = []
    for name in _CASCADE_FILES:
        c = cv2.CascadeClassifier(str(Path(root) / name))
        if c.empty():
            raise DetectorUnavailable(f"cannot load the Haar cascade {name} from {root}")
        cascades.append(c)
    _local.cascades = tuple(cascades)
    return _local.cascades


def _clusters(raw: Sequence, min_size: int = 2) -> list[tuple[tuple[int, int, int, int], int]]:
    if len(raw) == 0:
        return []
    rects, weights = cv2.groupRectangles(np.asarray(raw).tolist(), 1, 0.2)
    return [(tuple(int(v) for v in r), int(w)) for r, w in zip(rects, np.ravel(weights)) if w >= min_size]


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def _two_eyes(grey_image: np.ndarray, box: tuple[int, int, int, int], eye: cv2.CascadeClassifier) -> bool:
    x, y, w, h = box
    roi = grey_image[y : y + h * 6 // 10, x : x + w]
    if roi.size == 0:
        return False
    s = 120.0 / w  # the eyes of a small face are below the eye cascade's 20 px window: upsample
    roi = cv2.resize(roi, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
    eyes = eye.detectMultiScale(roi, 1.1, 2, minSize=(14, 14), maxSize=(60, 60))
    centres = [(ex + ew / 2, ey + eh / 2) for ex, ey, ew, eh in eyes]
    left = [c for c in centres if c[0] < 60]
    right = [c for c in centres if c[0] >= 60]
    return any(abs(cl[1] - cr[1]) < 24 for cl in left for cr in right)


def detect_faces(rgb: np.ndarray) -> list[Face]:
    """Frontal human faces: two OpenCV Haar cascades (shipped in the OpenCV wheel) that must agree,
    verified by the eye cascade.

    ``frontalface_default`` proposes boxes (every raw detection down to 20 px, grouped);
    ``frontalface_alt2`` must confirm each on the region around it (IoU >= 0.3). ``neighbours`` is
    the smaller of the two cascades' merged-detection counts: a pigment network fools one cascade a
    few times (real ISIC images reach 7), a face makes both fire many times. A face's score is
    ``neighbours + 10`` with two eyes side by side in the upper 60 % of the box, else ``neighbours``.
    """
    rgb = fit(rgb)
    if too_small(rgb):
        return []
    default, alt2, eye = _cascades()
    g = grey(rgb)
    height, width = g.shape
    faces = []
    for box, n1 in _clusters(default.detectMultiScale(g, 1.1, 0, minSize=(20, 20))):
        x, y, w, h = box
        m = w // 2
        x0, y0, x1, y1 = max(0, x - m), max(0, y - m), min(width, x + w + m), min(height, y + h + m)
        raw = alt2.detectMultiScale(g[y0:y1, x0:x1], 1.1, 0, minSize=(int(w * 0.7), int(w * 0.7)),
                                    maxSize=(int(w * 1.45), int(w * 1.45)))
        n2 = max((n for r, n in _clusters([(rx + x0, ry + y0, rw, rh) for rx, ry, rw, rh in raw])
                  if _iou(r, box) >= 0.3), default=0)
        n = min(n1, n2)
        if n < 2:
            continue
        eyes = _two_eyes(g, box, eye)
        score = float(n + (10 if eyes else 0))
        if score >= 3:
            faces.append(Face(box, n, eyes, score))
    return sorted(faces, key=lambda f: -f.score)


def face_score(rgb: np.ndarray) -> float:
    """Largest face score (``detect_faces``), 0 when none. Default reject above 12
    (``quality.max_face_score``): a box both cascades agree on with two eyes and 3+ neighbours, or
    13+ neighbours alone (a large face whose eyes were missed). Real ISIC images reach 7."""
    return max((f.score for f in detect_faces(rgb)), default=0.0)


# --------------------------------------------------------------------------- ink and pen marks


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of violet / blue marker strokes (uint8 0/1) at the analysed size.

    Against its 31 px median surroundings in CIELAB, an ink pixel turned bluer (b* down by >= 9)
    without turning greener (a* down by at most 2), with a* - b* up by >= 15: gentian violet and blue
    ballpoint do that on skin and lesions, while hair and lesion borders lose red and yellow together
    (a global hue cut fails: blue-cast photographs are three quarters "violet"). Pixels within 2 px of
    dark non-violet strokes are dropped: lenses fringe hair edges with blue-violet."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    a, b = lab[..., 1].astype(np.int16), lab[..., 2].astype(np.int16)
    da = a - cv2.medianBlur(lab[..., 1], 31).astype(np.int16)
    db = b - cv2.medianBlur(lab[..., 2], 31).astype(np.int16)
    violet = (db <= -9) & (da >= -2) & (da - db >= 15)
    hair = (dark_strokes(grey(rgb)) >= 20) & ~violet
    fringe = cv2.dilate(hair.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    m = (violet & ~fringe).astype(np.uint8)
    return cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))


def ink_score(rgb: np.ndarray) -> float:
    """Area of stroke-like ink (``ink_mask`` components of 20+ px at most 16 px across), in per mille
    of the image; 0 when none. A blue nevus or a blue-white veil is a blob, not a stroke. Default flag
    above 2.5 (``quality.max_ink_score``: about a 3 px line across a third of a 512 px image); real
    images without ink reach 2.0."""
    rgb = fit(rgb)
    if too_small(rgb):
        return 0.0
    m = ink_mask(rgb)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return 0.0
    radius = np.zeros(n, np.float32)
    np.maximum.at(radius, lab.ravel(), cv2.distanceTransform(m, cv2.DIST_L2, 3).ravel())
    keep = (stats[:, cv2.CC_STAT_AREA] >= 20) & (radius <= 8)
    keep[0] = False
    return float(stats[keep, cv2.CC_STAT_AREA].sum() / m.size * 1000)


# --------------------------------------------------------------------------- dermatoscope frames


def frame_score(rgb: np.ndarray) -> float:
    """Share (%) of the outer ring (4 % of the side wide) covered by black regions that touch the
    border: a round dermatoscope field of view, black corners or letterbox bars. Black is below 35 %
    of the centre's median brightness (max of R, G, B), so dim photographs are judged against
    themselves. Default flag above 10 (``quality.max_frame_score``); skin photographed edge to edge
    reaches ~6 (dark lesions running off the edge)."""
    rgb = fit(rgb)
    if too_small(rgb):
        return 0.0
    v = rgb.max(axis=2).astype(np.float32)
    h, w = v.shape
    centre = float(np.median(v[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]))
    dark = (v < 0.35 * centre).astype(np.uint8)
    _, lab = cv2.connectedComponents(dark, connectivity=8)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    region = np.isin(lab, edge[edge > 0])
    b = max(2, min(h, w) // 25)
    ring = np.ones((h, w), bool)
    ring[b:-b, b:-b] = False
    return float(region[ring].mean() * 100)
