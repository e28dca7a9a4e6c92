"""Procedural dermoscopy-like phantoms with known labels, for demos, the smoke preset and tests.

A phantom is rendered in three layers:

1. *Scene* (physical, in linear-ish RGB floats): textured skin, then a pigmented lesion.
   - benign (nevus-like): smaller, near-centred, roughly symmetric, smooth regular border, one or
     two even brown tones fading radially;
   - malignant (melanoma-like): larger, off-centre, asymmetric with an irregular ragged border,
     several colours (light and dark brown, black, red-ish) in blotches and a blue-white veil.
   Lesion size ranges and colour palettes overlap a little, so a classifier has to look at the
   lesion as a whole, not at one pixel.
2. *Hair* (optional): dark curved strands drawn with ``draw_hairs``.
3. *Camera*: the acquisition style (``isic`` or ``ham``) sets white balance, brightness, centre
   fall-off and the dark circular dermatoscope vignette, so the two styles form a real domain shift.

Every image is a pure function of (label, rng state, size, style, hair); ``make_phantoms`` seeds
one generator per image from (seed, style, index), so image *i* is the same whatever ``n`` is.

``render_phantom_traits`` also says what is visible (``PhantomTraits``: lesion size, number of
lesions, colours, hair, skin type), and can put the scene on any Fitzpatrick skin type and add
small satellite moles; with neither, it draws the same random numbers and pixels as
``render_phantom``. The miniature Stable Diffusion (``dermt2im.mini``) is pre-trained on such
phantoms with captions made from their traits.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dermt2im.core import identity
from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text
from dermt2im.core.imaging import encode_png
from dermt2im.core.specs import LABELS, PhantomConfig
from dermt2im.stage import Stamps

DIAGNOSIS = {"benign": "nevus", "malignant": "melanoma"}

# Bumped whenever a phantom's pixels (or traits) change for the same arguments: the miniature
# Stable Diffusion's header records the version it was pre-trained on (``dermt2im.mini``).
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class CameraStyle:
    """How a (simulated) dermatoscope and camera record the scene."""

    white_balance: tuple[float, float, float]  # per-channel gains
    brightness: float
    gamma: float  # applied to the [0, 1] image after gains; < 1 brightens mid-tones
    falloff: float  # illumination drop at the field edge, relative to the centre
    vignette_radius: float  # radius of the lit circle, in units of half the image side
    vignette_softness: float
    noise: float  # sensor noise std, in [0, 1] units


STYLES: dict[str, CameraStyle] = {
    # ISIC archive look: neutral-to-pink, bright, a wide field with only the corners dark.
    "isic": CameraStyle((1.00, 0.97, 0.98), 1.06, 0.92, 0.12, 1.22, 0.06, 0.010),
    # HAM10000 look: warmer / yellow cast, dimmer, a tighter and softer dark ring.
    "ham": CameraStyle((1.03, 0.94, 0.80), 0.90, 1.08, 0.30, 0.96, 0.12, 0.016),
}

SKIN_BASE = np.array([0.88, 0.68, 0.58], np.float32)
# Linear-ish RGB of the six Fitzpatrick skin types; type II is the default skin above. Melanin
# darkens and browns the skin (blue and green drop faster than red).
FITZPATRICK_SKIN: dict[int, np.ndarray] = {
    1: np.array([0.94, 0.77, 0.69], np.float32),
    2: SKIN_BASE,
    3: np.array([0.80, 0.60, 0.46], np.float32),
    4: np.array([0.68, 0.48, 0.33], np.float32),
    5: np.array([0.50, 0.33, 0.22], np.float32),
    6: np.array([0.33, 0.21, 0.15], np.float32),
}


def _noise_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation; ``sigma`` is in pixels."""
    field = rng.standard_normal((size, size)).astype(np.float32)
    if sigma > 0.3:
        field = cv2.GaussianBlur(field, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    std = float(field.std())
    return field / std if std > 0 else field


def _smoothstep(edge0: float | np.ndarray, edge1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], x to the right and y down."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c)


def _skin(rng: np.random.Generator, size: int, skin_type: int | None = None) -> np.ndarray:
    """Skin with a random tone, blotchy redness and fine pore-like texture; ``skin_type`` picks the
    Fitzpatrick type's colour (None: the default light skin), the same random draws either way."""
    tone = rng.uniform(0.80, 1.04)  # lighter / darker skin
    base_colour = SKIN_BASE if skin_type is None else FITZPATRICK_SKIN[skin_type] * np.float32(1.0 / 0.92)
    base = base_colour * tone + rng.normal(0.0, 0.015, 3).astype(np.float32)
    coarse = _noise_field(rng, size, size * 0.08)
    medium = _noise_field(rng, size, size * 0.02)
    fine = _noise_field(rng, size, max(0.6, size * 0.003))
    shade = 1.0 + 0.025 * coarse + 0.015 * medium + 0.02 * fine
    # erythema: haemoglobin absorbs green and blue, so redder patches lose G and B, not gain R
    redness = np.clip(_noise_field(rng, size, size * 0.06), 0.0, None) * rng.uniform(0.01, 0.04)
    skin = base[None, None, :] * shade[..., None]
    skin[..., 1] -= redness
    skin[..., 2] -= 0.6 * redness
    return skin


@dataclass(frozen=True)
class _Shape:
    t: np.ndarray  # normalised radius: < 1 inside the lesion, 1 on its border
    alpha: np.ndarray  # lesion coverage in [0, 1]
    theta: np.ndarray  # polar angle about the lesion centre
    radius: float = 0.0  # mean radius, in units of half the image side


def _lesion_shape(rng: np.random.Generator, size: int, malignant: bool) -> _Shape:
    x, y = _grid(size)
    if malignant:
        radius = rng.uniform(0.34, 0.62)
        centre = rng.normal(0.0, 0.09, 2)
        aspect = rng.uniform(0.70, 1.0)
        harmonics = [(k, rng.uniform(0.04, 0.16) / np.sqrt(k - 1)) for k in range(2, 10)]
    else:
        radius = rng.uniform(0.20, 0.42)
        centre = rng.normal(0.0, 0.04, 2)
        aspect = rng.uniform(0.85, 1.0)
        harmonics = [(2, rng.uniform(0.0, 0.05)), (3, rng.uniform(0.0, 0.02))]
    rot = rng.uniform(0.0, np.pi)
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    border = np.ones_like(theta)
    for k, amp in harmonics:
        border += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    t = rho / (radius * border)
    if malignant:
        # ragged edge, and a border that is sharp in some directions and fuzzy in others
        t = t + 0.06 * _noise_field(rng, size, size * 0.03) + 0.025 * _noise_field(rng, size, size * 0.008)
        width = 0.05 + 0.10 * (0.5 + 0.5 * np.cos(theta * rng.integers(1, 4) + rng.uniform(0, 2 * np.pi)))
    else:
        width = np.float32(rng.uniform(0.06, 0.12))
    alpha = 1.0 - _smoothstep(1.0 - width, 1.0 + width, t)
    return _Shape(t=t.astype(np.float32), alpha=alpha.astype(np.float32), theta=theta.astype(np.float32),
                  radius=float(radius * np.sqrt(aspect)))


def _blotches(rng: np.random.Generator, size: int, sigma: float, coverage: float) -> np.ndarray:
    """Soft random blobs covering roughly ``coverage`` of the image."""
    field = _noise_field(rng, size, sigma)
    cut = float(np.quantile(field, 1.0 - coverage))
    return _smoothstep(cut - 0.45, cut + 0.45, field)


def _network(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """A pigment-network-like mesh in [0, 1]: the zero crossings of smooth noise form closed cells."""
    field = _noise_field(rng, size, size * cell)
    return 1.0 - _smoothstep(0.0, 0.35, np.abs(field))


def _mix(colour: np.ndarray, layer: np.ndarray, weight: np.ndarray) -> np.ndarray:
    w = weight[..., None]
    return colour * (1.0 - w) + layer[None, None, :] * w


def _benign_colour(rng: np.random.Generator, size: int, shape: _Shape) -> tuple[np.ndarray, tuple[str, ...]]:
    centre = np.array([0.42, 0.26, 0.17], np.float32) * rng.uniform(0.8, 1.15)
    if rng.random() < 0.5:  # one tone
        rim = centre * rng.uniform(1.0, 1.1)
        names: tuple[str, ...] = ("brown",)
    else:  # two tones: darker centre, lighter rim
        rim = np.array([0.60, 0.42, 0.30], np.float32) * rng.uniform(0.9, 1.08)
        names = ("dark brown", "light brown")
    radial = _smoothstep(0.2, 1.0, shape.t)
    colour = centre[None, None, :] * (1 - radial[..., None]) + rim[None, None, :] * radial[..., None]
    mottle = 0.04 * _noise_field(rng, size, size * 0.012) + 0.02 * _noise_field(rng, size, size * 0.004)
    # a faint, regular network that fades towards the rim
    mesh = _network(rng, size, 0.008) * rng.uniform(0.05, 0.1) * _smoothstep(1.0, 0.4, shape.t)
    return colour * (1.0 + mottle - mesh)[..., None], names


def _malignant_colour(rng: np.random.Generator, size: int, shape: _Shape) -> tuple[np.ndarray, tuple[str, ...]]:
    light = np.array([0.52, 0.33, 0.22], np.float32) * rng.uniform(0.9, 1.1)
    dark = np.array([0.30, 0.17, 0.11], np.float32) * rng.uniform(0.8, 1.1)
    base = light[None, None, :] * (1.0 - 0.25 * _smoothstep(1.0, 0.2, shape.t))[..., None]
    colour = _mix(base, dark, _blotches(rng, size, size * 0.04, rng.uniform(0.35, 0.6)))
    # eccentric pigmentation: one side of the lesion darker than the other (asymmetry of colour)
    side = 0.5 + 0.5 * np.cos(shape.theta - rng.uniform(0, 2 * np.pi))
    black = _blotches(rng, size, size * 0.025, rng.uniform(0.08, 0.2)) * side
    colour = _mix(colour, np.array([0.09, 0.07, 0.07], np.float32), black)
    names: tuple[str, ...] = ("light brown", "dark brown", "black")
    if rng.random() < 0.8:
        red = _blotches(rng, size, size * 0.03, rng.uniform(0.05, 0.15)) * rng.uniform(0.5, 0.75)
        colour = _mix(colour, np.array([0.64, 0.30, 0.27], np.float32), red)
        names += ("red",)
    veil = _blotches(rng, size, size * 0.05, rng.uniform(0.10, 0.25)) * _smoothstep(1.1, 0.3, shape.t)
    colour = _mix(colour, np.array([0.55, 0.62, 0.74], np.float32), veil * rng.uniform(0.55, 0.8))
    # an atypical network: coarser, darker, and only in patches
    mesh = _network(rng, size, 0.012) * _blotches(rng, size, size * 0.06, 0.5) * rng.uniform(0.08, 0.16)
    return colour * (1.0 + 0.06 * _noise_field(rng, size, size * 0.006) - mesh)[..., None], names + ("blue-grey",)


def _camera(scene: np.ndarray, rng: np.random.Generator, style: CameraStyle) -> np.ndarray:
    size = scene.shape[0]
    x, y = _grid(size)
    r = np.sqrt(x * x + y * y)
    light = 1.0 - style.falloff * (r / max(style.vignette_radius, 1e-3)) ** 2
    field = 1.0 - _smoothstep(style.vignette_radius - style.vignette_softness,
                              style.vignette_radius + style.vignette_softness, r)
    img = scene * np.asarray(style.white_balance, np.float32)[None, None, :] * style.brightness
    img = np.clip(img * light[..., None], 0.0, 1.0) ** style.gamma
    img = img * (0.04 + 0.96 * field[..., None])  # outside the lens: nearly black
    img = img + rng.normal(0.0, style.noise, img.shape).astype(np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def draw_hairs(rgb: np.ndarray, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    """Return a copy of ``rgb`` (H x W x 3 uint8) with ``n`` dark, thin, curved hairs drawn on it.

    Hairs are anti-aliased quadratic Bézier strands, 1-3 px wide at 256 px (scaled with the image),
    dark brown to black, and may enter from outside the frame. ``n=None`` draws 6 to 15.
    """
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    scale = min(h, w) / 256.0
    count = int(rng.integers(6, 16)) if n is None else int(n)
    steps = np.linspace(0.0, 1.0, 48)[:, None]
    for _ in range(count):
        start = rng.uniform([-0.1 * w, -0.1 * h], [1.1 * w, 1.1 * h])
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 0.9) * min(h, w)
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-np.sin(angle), np.cos(angle)])
        control = (start + end) / 2 + normal * rng.normal(0.0, 0.18) * length
        pts = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * control + steps**2 * end
        shade = rng.uniform(10, 55)
        colour = (shade * 1.15, shade * 0.95, shade * 0.8)
        thickness = max(1, int(round(rng.uniform(0.9, 2.6) * scale)))
        fixed = np.round(pts * 16).astype(np.int32).reshape(-1, 1, 2)  # 4 fractional bits
        cv2.polylines(out, [fixed], False, colour, thickness, cv2.LINE_AA, shift=4)
    return out


@dataclass(frozen=True)
class PhantomTraits:
    """What a phantom shows, in the terms a caption (or a dermatologist's note) would use."""

    label: str
    radius: float  # the main lesion's mean radius, in units of half the image side
    lesions: int  # the main lesion and its satellite moles
    colours: tuple[str, ...]  # of the main lesion
    hair: bool
    skin_type: int | None  # Fitzpatrick type; None: the generator's default light skin (close to type II)
    style: str


def _pigment(skin_type: int) -> np.float32:
    """How much darker lesions are on this skin type than on type II (1 on types I and II)."""
    ratio = float(FITZPATRICK_SKIN[skin_type].mean() / SKIN_BASE.mean())
    return np.float32(min(1.0, max(0.3, ratio)))


def _satellites(rng: np.random.Generator, size: int, n: int, scene: np.ndarray, texture: np.ndarray,
                keep_out: float) -> np.ndarray:
    """``n`` small, round, brown moles away from the main lesion (whose radius is ``keep_out``)."""
    x, y = _grid(size)
    for _ in range(n):
        angle = rng.uniform(0.0, 2 * np.pi)
        dist = rng.uniform(min(keep_out + 0.12, 0.7), 0.8)
        radius = rng.uniform(0.07, 0.12)
        rho = np.hypot(x - dist * np.cos(angle), y - dist * np.sin(angle)) / radius
        a = (1.0 - _smoothstep(0.75, 1.25, rho))[..., None]
        colour = np.array([0.42, 0.26, 0.17], np.float32) * rng.uniform(0.8, 1.15)
        scene = scene * (1 - a) + colour[None, None, :] * texture * a
    return scene


def render_phantom_traits(
    label: str, rng: np.random.Generator, *, size: int = 256, style: str = "isic", hair: bool = False,
    skin_type: int | None = None, satellites: int = 0,
) -> tuple[np.ndarray, PhantomTraits]:
    """One dermoscopy-like image (size x size x 3 uint8) of a ``benign`` or ``malignant`` lesion and
    what it shows. ``skin_type`` (Fitzpatrick 1-6) sets the skin colour and ``satellites`` adds that
    many small moles; with the defaults the image is ``render_phantom``'s, pixel for pixel."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    if skin_type is not None and skin_type not in FITZPATRICK_SKIN:
        raise ValueError(f"skin_type must be a Fitzpatrick type 1-6 or None, got {skin_type!r}")
    if satellites < 0:
        raise ValueError(f"satellites must be at least 0, got {satellites}")
    malignant = label == "malignant"
    skin = _skin(rng, size, skin_type)
    shape = _lesion_shape(rng, size, malignant)
    colour, colours = _malignant_colour(rng, size, shape) if malignant else _benign_colour(rng, size, shape)
    a = shape.alpha[..., None]
    # lesion pigment sits in the skin, so the skin's texture modulates it as well
    texture = (skin.mean(axis=2) / float(skin.mean()))[..., None]
    if skin_type is not None:  # and a darker skin's melanin darkens its lesions too
        texture = texture * _pigment(skin_type)
    scene = skin * (1 - a) + colour * texture * a
    if satellites:
        scene = _satellites(rng, size, satellites, scene, texture, shape.radius)
    if hair:
        scene8 = draw_hairs(np.clip(scene * 255.0 + 0.5, 0, 255).astype(np.uint8), rng)
        scene = scene8.astype(np.float32) / 255.0
    image = _camera(scene.astype(np.float32), rng, STYLES[style])
    return image, PhantomTraits(label, shape.radius, 1 + satellites, colours, hair, skin_type, style)


def render_phantom(
    label: str, rng: np.random.Generator, *, size: int = 256, style: str = "isic", hair: bool = False,
    skin_type: int | None = None,
) -> np.ndarray:
    """One dermoscopy-like image (size x size x 3 uint8) of a ``benign`` or ``malignant`` lesion;
    ``skin_type`` (Fitzpatrick 1-6) sets the skin's colour (None: the default light skin)."""
    return render_phantom_traits(label, rng, size=size, style=style, hair=hair, skin_type=skin_type)[0]


def _image_rng(seed: int, style: str, index: int) -> np.random.Generator:
    style_code = sorted(STYLES).index(style)
    return np.random.default_rng(np.random.SeedSequence([seed, style_code, index]))


def phantom_id(style: str, seed: int, index: int) -> str:
    return f"PH-{style}-s{seed}-{index:04d}"


def make_phantoms(
    out: Path,
    n: int,
    *,
    seed: int = 0,
    style: str = "isic",
    size: int = 256,
    hair_probability: float = 0.3,
) -> Path:
    """Write ``n`` labelled phantoms to ``out/benign`` and ``out/malignant`` plus ``out/labels.csv``.

    Labels alternate (even index benign, odd malignant), so the classes are split evenly (benign
    gets the odd one out) and image *i* does not depend on ``n``. labels.csv has the columns
    ``file,label,diagnosis,lesion_id`` with ``file`` relative to ``out``; it is written last, so a
    folder with a labels.csv is complete. Output is byte-identical for the same arguments.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    if not 0.0 <= hair_probability <= 1.0:
        raise ValueError(f"hair_probability must be in [0, 1], got {hair_probability}")
    out = Path(out)
    rows: list[tuple[str, str, str, str]] = []
    for index in range(n):
        label = LABELS[index % 2]
        rng = _image_rng(seed, style, index)
        hair = bool(rng.random() < hair_probability)
        rgb = render_phantom(label, rng, size=size, style=style, hair=hair)
        lesion_id = phantom_id(style, seed, index)
        rel = f"{label}/{lesion_id}.png"
        atomic_write_bytes(out / rel, encode_png(rgb))
        rows.append((rel, label, DIAGNOSIS[label], lesion_id))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "label", "diagnosis", "lesion_id"])
    writer.writerows(rows)
    return atomic_write_text(out / "labels.csv", buf.getvalue())


# --------------------------------------------------------------------------------------------------
# the stage: the factory's own seed and test sets when no SOURCE is given


@dataclass(frozen=True)
class PhantomSet:
    name: str  # "seeds", or the test set's name ("phantom-isic", ...)
    folder: Path
    n: int
    seed: int
    style: str


def phantom_sets(data_dir: Path, cfg: PhantomConfig) -> list[PhantomSet]:
    """The smoke preset's phantom seed set and one phantom test set per configured style."""
    sets = [PhantomSet("seeds", Path(data_dir) / f"phantoms-seed-{cfg.seed_style}", cfg.n_seed, cfg.seed,
                       cfg.seed_style)]
    for i, style in enumerate(sorted(cfg.test_styles), start=1):
        sets.append(PhantomSet(f"phantom-{style}", Path(data_dir) / f"phantoms-test-{style}", cfg.n_test,
                               cfg.seed + 1000 * i, style))
    return sets


class PhantomStage:
    """Phantoms: one unit per set; done when its labels.csv exists and its stamp holds the key."""

    name = "phantoms"

    def __init__(self, cfg: PhantomConfig, data_dir: Path, stamps: Stamps) -> None:
        self.cfg, self.sets, self.stamps = cfg, phantom_sets(data_dir, cfg), stamps

    @classmethod
    def of(cls, workdir: Any, cfg: Any) -> "PhantomStage":
        """The stage as a factory config sets it up: the sets go to ``W/data``."""
        return cls(cfg.phantoms, workdir.data, Stamps(workdir.stamps, cls.name))

    def folders(self) -> dict[str, Path]:
        """Where each set will be (the seeds and every test set, by name), known before any is made."""
        return {s.name: s.folder for s in self.sets}

    def units(self) -> list[PhantomSet]:
        return self.sets

    def describe(self, unit: PhantomSet) -> str:
        return f"make {unit.n} {unit.style} phantoms ({unit.name})"

    def key(self, unit: PhantomSet) -> str:
        return identity.content_key("phantoms", unit.n, unit.seed, unit.style, self.cfg.size,
                                    self.cfg.hair_probability, str(unit.folder), identity.code_digest(__name__))

    def finished(self, unit: PhantomSet, key: str) -> dict | None:
        if not (unit.folder / "labels.csv").is_file():
            return None
        return self.stamps.matching(unit.name, key)

    def run(self, unit: PhantomSet, key: str) -> dict:
        make_phantoms(unit.folder, unit.n, seed=unit.seed, style=unit.style, size=self.cfg.size,
                      hair_probability=self.cfg.hair_probability)
        summary = {"name": unit.name, "folder": str(unit.folder), "images": unit.n}
        self.stamps.write(unit.name, key, summary)
        return summary

    def close(self, results) -> dict:
        return {r["name"]: r["folder"] for r in results}
