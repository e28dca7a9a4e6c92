"""Hair removal: what it changes on hair-free real images, and what it restores on drawn hair, per class,
the factory's shape-verified DullRazor against the plain one it replaced.

    python bench/hair.py [--phantoms 8]

1. Real images (../shared/data, skipped when absent), prepared as preprocessing does (short side
   512, hair removed, centre crop 512): the share of pixels whose grey level moved by more than 10,
   per class and per ``hair_visible`` (blank = hair-free, mild, yes), median and maximum.
2. Drawn hair (``dermt2im.phantoms.draw_hairs``, 12 hairs) on phantoms, both camera styles, per class
   and size: PSNR gain = PSNR(restored, clean) - PSNR(hairy, clean), over the whole image and inside
   the dermatoscope's field of view only (the phantoms draw hair over the black vignette, where no
   hair is visible in a real dermatoscope and no dark-detail detector can see it), next to the bound:
   the same fill given the exact set of pixels the hairs changed.
3. Time per real image. Prints ratios new / plain.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermt2im.core.specs import PreprocessConfig  # noqa: E402
from dermt2im.phantoms import draw_hairs, render_phantom  # noqa: E402
from dermt2im.preprocess.hair import changed_fraction, inpaint, remove_hair  # noqa: E402
from dermt2im.preprocess.resize import center_crop  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dermoscopy"
CFG = PreprocessConfig()


def plain_dullrazor(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The method it replaced: black-hat (17 px cross at 512) > 12, 3 x 3 dilation, Telea at half resolution."""
    grey = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (3, 3), 0)
    k = max(3, int(round(17 * min(rgb.shape[:2]) / 512)))
    k += 1 - k % 2
    bh = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k)))
    mask = cv2.dilate((bh > 12).astype(np.uint8) * 255, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))) > 0
    if not mask.any():
        return rgb.copy(), mask
    h, w = mask.shape
    if min(h, w) < 256:
        return cv2.inpaint(rgb, mask.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA), mask
    half = (w // 2, h // 2)
    small_mask = cv2.resize(mask.astype(np.uint8) * 255, half, interpolation=cv2.INTER_AREA) > 0
    small = cv2.inpaint(cv2.resize(rgb, half, interpolation=cv2.INTER_AREA), small_mask.astype(np.uint8) * 255, 3,
                        cv2.INPAINT_TELEA)
    out = rgb.copy()
    out[mask] = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)[mask]
    return out, mask


METHODS = {"plain": plain_dullrazor, "new": lambda rgb: remove_hair(rgb, CFG)}


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(d[where].mean() if where is not None else d.mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def real_part() -> dict[str, list[float]]:
    import pandas as pd

    from dermt2im.preprocess.resize import decode_at_least, resize_short_side

    rows = pd.read_csv(REAL / "labels.csv", keep_default_na=False)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    print("## Real images: share of the 512 x 512 crop changed by more than 10 grey levels\n")
    print("| hair_visible | class | n | plain median | plain max | new median | new max |")
    print("|---|---|---|---|---|---|---|")
    images = {f: resize_short_side(decode_at_least((REAL / "images" / f).read_bytes(), 512), 512) for f in rows["file"]}
    for flag, title in (("", "none (hair-free)"), ("mild", "mild"), ("yes", "yes")):
        for label in ("benign", "malignant"):
            files = rows.loc[(rows["hair_visible"] == flag) & (rows["label"] == label), "file"]
            cells = []
            for name, method in METHODS.items():
                changed = []
                for f in files:
                    t = time.perf_counter()
                    out, _ = method(images[f])
                    times[name].append(time.perf_counter() - t)
                    changed.append(changed_fraction(center_crop(images[f], 512), center_crop(out, 512)))
                cells += [f"{np.median(changed):.2%}", f"{np.max(changed):.2%}"]
            print(f"| {title} | {label} | {len(files)} | " + " | ".join(cells) + " |")
    return times


def field_of_view(clean: np.ndarray) -> np.ndarray:
    """Pixels inside the dermatoscope's lit field (not the black vignette)."""
    v = clean.max(axis=2).astype(np.float32)
    centre = float(np.median(v[v.shape[0] // 4 : 3 * v.shape[0] // 4, v.shape[1] // 4 : 3 * v.shape[1] // 4]))
    return v >= 0.35 * centre


def drawn_part(n: int) -> None:
    print(f"\n## Drawn hair: PSNR gain in dB (median / min over {n} phantoms per cell, styles isic and ham)\n")
    print("| size | class | hairy PSNR | plain | new | new, field of view only | exact-mask bound |")
    print("|---|---|---|---|---|---|---|")
    for size in (256, 512):
        for label in ("benign", "malignant"):
            cols: dict[str, list[float]] = {"hairy": [], "plain": [], "new": [], "fov": [], "bound": []}
            for i in range(n):
                clean = render_phantom(label, np.random.default_rng(i), size=size, style=("isic", "ham")[i % 2])
                hairy = draw_hairs(clean, np.random.default_rng(100 + i), n=12)
                base = psnr(hairy, clean)
                cols["hairy"].append(base)
                for name, method in METHODS.items():
                    cols[name].append(psnr(method(hairy)[0], clean) - base)
                fov = field_of_view(clean)
                cols["fov"].append(psnr(METHODS["new"](hairy)[0], clean, fov) - psnr(hairy, clean, fov))
                exact = np.abs(hairy.astype(int) - clean.astype(int)).max(axis=2) > 0
                cols["bound"].append(psnr(inpaint(hairy, exact, CFG), clean) - base)
            cells = [f"{np.median(cols['hairy']):.1f}"] + [f"{np.median(cols[k]):.1f} / {np.min(cols[k]):.1f}"
                                                          for k in ("plain", "new", "fov", "bound")]
            print(f"| {size} | {label} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantoms", type=int, default=8)
    args = ap.parse_args()
    times = real_part() if (REAL / "labels.csv").is_file() else None
    drawn_part(args.phantoms)
    if times:
        med = {k: 1000 * float(np.median(v)) for k, v in times.items()}
        print(f"\n## Time per real image at short side 512 (median): plain {med['plain']:.0f} ms, new "
              f"{med['new']:.0f} ms; new / plain: {med['new'] / med['plain']:.2f}x")


if __name__ == "__main__":
    main()
