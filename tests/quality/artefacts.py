"""Planted artefacts and simulated "generated-like" lesions for the gate's tests (and bench/gate.py).

Nothing here is used by the gate itself; every function returns a new RGB uint8 array.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def soften(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible generated-like version: lost detail (down to 128-256 px and back), a mild blur,
    a slight colour shift and JPEG at q=60, the ways SD outputs are softer than photographs."""
    h, w = rgb.shape[:2]
    s = int(rng.integers(128, 257))
    x = cv2.resize(rgb, (s, s * h // w), interpolation=cv2.INTER_AREA)
    x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
    x = cv2.GaussianBlur(x, (0, 0), float(rng.uniform(0.3, 1.0)))
    shift = rng.uniform(-8, 8, size=3)
    gain = rng.uniform(0.95, 1.05, size=3)
    x = np.clip(x.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", x[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 60])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def smooth_lesion(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """A smooth "dark blob on skin": the kind of image whose 64-bit pHashes collide."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r = rng.uniform(200, 235)
    skin = np.array([r, r * rng.uniform(0.68, 0.8), r * rng.uniform(0.58, 0.7)], np.float32)
    r = rng.uniform(70, 140)
    lesion = np.array([r, r * rng.uniform(0.45, 0.7), r * rng.uniform(0.3, 0.5)], np.float32)  # browns
    cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)  # generated lesions sit centred and roundish
    r0 = rng.uniform(0.15, 0.3)
    ry, rx = r0 * rng.uniform(0.85, 1.15, 2)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    ang = np.arctan2(v, u)
    wobble = 1 + sum(rng.uniform(0, 0.08) * np.cos(k * ang + rng.uniform(0, 6.28)) for k in range(2, 6))
    r = np.sqrt(u**2 + v**2) / wobble
    alpha = 1 / (1 + np.exp((r - 1) * rng.uniform(6, 14)))
    # low-frequency mottling inside the lesion and on the skin
    noise = cv2.resize(rng.normal(0, 1, (8, 8)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = skin * (1 - alpha[..., None]) + lesion * alpha[..., None] + 6 * noise[..., None]
    fall = 1 - 0.15 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * 4
    img = img * fall[..., None] + rng.normal(0, 1.5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def face_crop(face_photo: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The (x, y, w, h) region of a photograph, e.g. the astronaut's face in skimage.data.astronaut()."""
    x, y, w, h = box
    return np.ascontiguousarray(face_photo[y : y + h, x : x + w])


def plant_face(rgb: np.ndarray, face: np.ndarray, size: int, at: tuple[int, int] | None = None) -> np.ndarray:
    """Paste ``face`` scaled to ``size`` px wide with a feathered elliptical edge, top-left at ``at``
    (default: the upper-left quarter, off the lesion)."""
    out = rgb.astype(np.float32).copy()
    fh = max(1, round(face.shape[0] * size / face.shape[1]))
    f = cv2.resize(face, (size, fh), interpolation=cv2.INTER_AREA if size < face.shape[1] else cv2.INTER_CUBIC)
    y0, x0 = at if at is not None else (rgb.shape[0] // 10, rgb.shape[1] // 10)
    fh, fw = min(fh, out.shape[0] - y0), min(size, out.shape[1] - x0)
    f = f[:fh, :fw]
    mask = np.zeros((fh, fw), np.float32)
    cv2.ellipse(mask, (fw // 2, fh // 2), (int(fw * 0.48), int(fh * 0.48)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, fw / 40))[..., None]
    out[y0 : y0 + fh, x0 : x0 + fw] = f * mask + out[y0 : y0 + fh, x0 : x0 + fw] * (1 - mask)
    return out.astype(np.uint8)


def plant_text(
    rgb: np.ndarray,
    text: str,
    height: int,
    corner: str = "bottom-right",
    colour: tuple[int, int, int] = (255, 255, 255),
    opacity: float = 1.0,
    margin: int | None = None,
    centre: bool = False,
) -> np.ndarray:
    """Render ``text`` (cap height about ``height`` px) in a corner or the centre, alpha-blended
    with ``opacity``: a caption, a stock-photo watermark, a light-grey semi-transparent signature."""
    h, w = rgb.shape[:2]
    font = ImageFont.load_default(size=max(6, round(height * 1.35)))
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    tw, th = x1 - x0, y1 - y0
    m = margin if margin is not None else max(4, h // 40)
    if centre:
        x, y = (w - tw) // 2, (h - th) // 2
    else:
        x = m if "left" in corner else w - tw - m
        y = m if "top" in corner else h - th - m
    draw.text((x - x0, y - y0), text, font=font, fill=255)
    a = np.asarray(layer, np.float32)[..., None] / 255 * opacity
    out = rgb.astype(np.float32) * (1 - a) + np.array(colour, np.float32) * a
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_ruler(
    rgb: np.ndarray,
    period: float = 8.0,
    length: float = 0.6,
    angle: float = 0.0,
    at: tuple[float, float] = (0.88, 0.5),
    colour: tuple[int, int, int] = (40, 40, 40),
    numbers: bool = False,
) -> np.ndarray:
    """A mm scale bar: a baseline with a tick every ``period`` px (longer every 5th and 10th),
    ``length`` of the side long, centred at ``at`` (fractions y, x), rotated by ``angle`` degrees."""
    h, w = rgb.shape[:2]
    out = rgb.copy()
    cy, cx = at[0] * h, at[1] * w
    L = length * w
    d = np.array([np.cos(np.radians(angle)), np.sin(np.radians(angle))])  # along the bar (x, y)
    n = np.array([d[1], -d[0]])  # ticks point "up" from the baseline
    a = np.array([cx, cy]) - d * L / 2
    b = np.array([cx, cy]) + d * L / 2
    thick = max(1, round(period / 8))
    cv2.line(out, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), colour, thick, cv2.LINE_AA)
    for k in range(int(L // period) + 1):
        p = a + d * k * period
        t = period * (2.2 if k % 10 == 0 else 1.6 if k % 5 == 0 else 1.0)
        q = p + n * t
        cv2.line(out, tuple(np.round(p).astype(int)), tuple(np.round(q).astype(int)), colour, thick, cv2.LINE_AA)
    if numbers:
        p = a + n * period * 2.8
        cv2.putText(out, "mm", tuple(np.round(p).astype(int)), cv2.FONT_HERSHEY_SIMPLEX, period / 20, colour, 1,
                    cv2.LINE_AA)
    return out


def draw_ink(
    rgb: np.ndarray,
    rng: np.random.Generator,
    strokes: int = 2,
    width: int = 4,
    colour: tuple[int, int, int] = (105, 55, 160),
    opacity: float = 0.8,
    dashed: bool = False,
) -> np.ndarray:
    """Surgical-marker (gentian violet) strokes: smooth curves through random points, optionally
    dashed, alpha-blended like ink soaking into skin."""
    h, w = rgb.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    for _ in range(strokes):
        pts = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h], size=(4, 2))
        t = np.linspace(0, 1, 200)[:, None]
        curve = ((1 - t) ** 3 * pts[0] + 3 * (1 - t) ** 2 * t * pts[1] + 3 * (1 - t) * t**2 * pts[2] + t**3 * pts[3])
        curve = np.round(curve).astype(np.int32)
        if dashed:
            for i in range(0, len(curve) - 6, 12):
                cv2.polylines(mask, [curve[i : i + 6]], False, 255, width, cv2.LINE_AA)
        else:
            cv2.polylines(mask, [curve], False, 255, width, cv2.LINE_AA)
    a = mask.astype(np.float32)[..., None] / 255 * opacity
    # ink darkens multiplicatively, the way a dye on skin does
    ink = rgb.astype(np.float32) * (np.array(colour, np.float32) / 255)
    return np.clip(rgb * (1 - a) + ink * a + np.array(colour) * a * 0.35, 0, 255).astype(np.uint8)


def vignette(rgb: np.ndarray, radius: float = 0.95) -> np.ndarray:
    """A round dermatoscope field of view: black outside a centred circle of ``radius`` x half-diagonal-ish."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    a = np.clip((radius + 0.03 - r) / 0.06, 0, 1)[..., None]
    return (rgb * a).astype(np.uint8)
