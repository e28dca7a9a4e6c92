"""Text and watermarks: the PP-OCR DB text-*detection* model that ships inside the ``rapidocr`` wheel,
run with onnxruntime on the CPU, offline.

Why a detector and not OCR: Stable Diffusion's watermarks and captions are mostly pseudo-text, so
the detector's "text-likeness" map is what is wanted; recognition needs legible glyphs. Tesseract
would need a system package everywhere and binarises globally, losing light semi-transparent text;
a hand-made stroke method fires on pigment network and hair. The model file is found in the
installed wheel; nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dermt2im.quality.detectors import DetectorUnavailable, dark_strokes, fit, grey, ink_mask, too_small
from dermt2im.quality.rulers import Ruler, band_comb, detect_rulers

RULER_FLAG = 0.7  # ruler score from which labels beside a ruler are the ruler's (quality.max_ruler_score)


@dataclass(frozen=True)
class TextBox:
    centre: tuple[float, float]
    size: tuple[float, float]  # length along the line, height
    angle: float
    score: float  # mean text probability inside the region


def _model_path() -> Path:
    spec = importlib.util.find_spec("rapidocr")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailable("the text check needs the rapidocr wheel (pip install 'rapidocr==3.10.*')")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = sorted(models.glob("*det*.onnx"))
    if not found:
        raise DetectorUnavailable(f"no text-detection model (*det*.onnx) in {models}")
    return found[-1]


@functools.cache
def _text_model():
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise DetectorUnavailable(f"the text check needs onnxruntime: {err}") from err
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the gate runs images in parallel
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(_model_path()), opts, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def text_probability(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel text probability of the DB detector, at the analysed size rounded to 32."""
    session, name = _text_model()
    h, w = rgb.shape[:2]
    th, tw = max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)
    x = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_LINEAR) if (th, tw) != (h, w) else rgb
    x = (x[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5  # the model was trained on BGR
    p = session.run(None, {name: x.transpose(2, 0, 1)[None]})[0][0, 0]
    return cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) if p.shape != (h, w) else p


def enhanced(rgb: np.ndarray) -> np.ndarray:
    """Local contrast stretched (CLAHE on CIELAB lightness): faint grey text on light, smooth skin,
    which the detector misses at its own contrast, stands out; real skin gains no text-like lines."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    lab[..., 0] = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)


def coherence(rgb: np.ndarray, region: np.ndarray, origin: tuple[int, int]) -> float:
    """Orientation coherence of the grey gradients inside ``region`` (a mask of the box at
    ``origin``), 0..1. Letters mix vertical, horizontal and curved strokes (0.2-0.6); ticks and hairs
    are parallel (0.7+)."""
    x, y = origin
    h, w = region.shape
    g = grey(rgb)[max(0, y - 1) : y + h + 1, max(0, x - 1) : x + w + 1].astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    oy, ox = y - max(0, y - 1), x - max(0, x - 1)
    gx, gy = gx[oy : oy + h, ox : ox + w][region], gy[oy : oy + h, ox : ox + w][region]
    z = (gx * gx - gy * gy).sum() + 2j * (gx * gy).sum()
    return float(abs(z) / ((gx * gx + gy * gy).sum() + 1e-6))


def _near_ruler(box: TextBox, ruler: Ruler) -> bool:
    """The box lies within 3 box-heights (at least 24 px) of the ruler's band, ends included."""
    d = np.array([math.cos(math.radians(ruler.angle)), math.sin(math.radians(ruler.angle))])
    rel = np.array(box.centre) - np.array(ruler.centre)
    along, across = abs(rel @ d), abs(rel @ np.array([-d[1], d[0]]))
    margin = max(24.0, 3 * box.size[1]) + box.size[0] / 2
    return along <= ruler.length / 2 + margin and across <= ruler.width / 2 + margin


def _line_regions(p: np.ndarray, side: int):
    """Text-line-shaped regions of the probability map: (label mask, box origin, minAreaRect, score)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats((p > 0.3).astype(np.uint8), connectivity=8)
    for k in range(1, n):
        x, y, w, h, area = stats[k]
        if area < 20 or max(w, h) < 16:
            continue
        region = lab[y : y + h, x : x + w] == k
        ys, xs = np.nonzero(region)
        score = float(p[ys + y, xs + x].mean())
        if score < 0.5:
            continue
        rect = cv2.minAreaRect(np.column_stack([xs + x, ys + y]).astype(np.float32))
        (_, _), (rw, rh), _ = rect
        length, height = max(rw, rh), max(1.0, min(rw, rh))
        if height <= 0.1 * side and length >= 16 and length >= 1.5 * height:
            yield region, (x, y), rect, score


def detect_text(rgb: np.ndarray, rulers: Sequence[Ruler] | None = None) -> list[TextBox]:
    """Lines of text (captions, watermarks, signatures), any colour or opacity, best first.

    The DB detector marks text-like pixels (p > 0.3), on the image and on a contrast-stretched copy
    (``enhanced``); a region is a text line when it is line-shaped (at most 10 % of the side high,
    16+ px long, 1.5x longer than high; the detector also lights up whole lesions, which are blobs)
    with a mean probability of 0.5+. Regions that are a ruler's are not text: rows of parallel strokes
    (``coherence`` >= 0.7), evenly spaced and mostly parallel ones (comb score >= 0.5 over 5+ ticks
    with coherence >= 0.5; digits are evenly spaced too, but not parallel), and labels within 3 heights
    of a flagged ruler (``rulers``; found here when None). A region drawn mostly in marker ink is the
    ink flag's business.
    """
    rgb = fit(rgb)
    if too_small(rgb):
        return []
    strokes, ink = dark_strokes(grey(rgb)), None
    boxes = []
    for view in (rgb, enhanced(rgb)):
        for region, (x, y), ((cx, cy), (rw, rh), ang), score in _line_regions(text_probability(view),
                                                                              min(rgb.shape[:2])):
            length, height = max(rw, rh), max(1.0, min(rw, rh))
            ang = ang + 90 if rw < rh else ang
            d = np.array([math.cos(math.radians(ang)), math.sin(math.radians(ang))])
            ink = ink_mask(rgb) if ink is None else ink
            h, w = region.shape
            parallel = coherence(rgb, region, (x, y))
            if ink[y : y + h, x : x + w][region].mean() >= 0.25 or parallel >= 0.7:
                continue
            if parallel >= 0.5 and band_comb(strokes, np.array([cx, cy]), d, length, height, min_ticks=5)[0] >= 0.5:
                continue
            boxes.append(TextBox((float(cx), float(cy)), (float(length), float(height)), float(ang % 180), score))
    if boxes:
        if rulers is None:
            rulers = [r for r in detect_rulers(rgb) if r.score > RULER_FLAG]
        boxes = [b for b in boxes if not any(_near_ruler(b, r) for r in rulers)]
    return sorted(boxes, key=lambda b: -b.score)


def text_score(rgb: np.ndarray, rulers: Sequence[Ruler] | None = None) -> float:
    """Highest mean text probability of a text-line region (``detect_text``), 0..1; 0 when none.
    Default reject above 0.6 (``quality.max_text_score``; the DB detector's usual box cut is 0.5-0.6)."""
    return max((b.score for b in detect_text(rgb, rulers)), default=0.0)
