"""A phantom class judge: does an image look like a benign or a malignant phantom?

Phantoms differ by construction (``dermt2im.phantoms``): a malignant lesion is larger, off-centre,
ragged, and holds black, red and blue-grey blotches on light and dark brown; a benign one is small,
round and one or two even browns. The judge measures exactly that on the lesion the quality gate
finds (``dermt2im.quality.checks.lesion_region``): its area, border irregularity and offset, and the
share of its pixels that are blue-grey, black, red or far from its mean colour. A logistic regression
(scikit-learn) on those measures is fitted on freshly rendered phantoms.

It is what the tests and the phantom experiment use to ask whether generated images show their
class; it knows nothing of how they were generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dermt2im.core.specs import LABELS
from dermt2im.quality.checks import lesion_region

FEATURES = ("area", "irregularity", "offset", "blue_grey", "black", "red", "colour_spread", "contrast", "lesions")


def _mask_geometry(mask: np.ndarray) -> tuple[float, float]:
    """(perimeter^2 / (4 pi area), centroid distance from the centre in half sides)."""
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    area = float(m.sum())
    if not contours or area == 0:
        return 1.0, 1.0
    perimeter = max(cv2.arcLength(c, True) for c in contours)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    offset = float(np.hypot(xs.mean() - (w - 1) / 2, ys.mean() - (h - 1) / 2) / (min(h, w) / 2))
    return perimeter**2 / (4 * np.pi * area), offset


def dark_blobs(grey: np.ndarray) -> int:
    """How many separate dark blobs (at least 0.5 % of the image, clear of the vignette) there are."""
    h, w = grey.shape
    smooth = cv2.GaussianBlur(grey, (0, 0), max(1.0, min(h, w) / 64))
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 0.85**2
    values = smooth[disc]
    if values.size == 0 or values.max() - values.min() < 1:
        return 0
    thr, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = ((smooth <= thr) & disc).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    return int((stats[1:, cv2.CC_STAT_AREA] >= 0.005 * h * w).sum())


def features(rgb: np.ndarray) -> np.ndarray:
    """The judge's measures of one RGB uint8 image (``FEATURES``, in that order)."""
    rgb = np.ascontiguousarray(rgb[..., :3])
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    mask, area, contrast = lesion_region(grey)
    n_blobs = dark_blobs(grey)
    if not mask.any():
        return np.array([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, contrast, n_blobs], float)
    irregularity, offset = _mask_geometry(mask)
    px = rgb[mask].astype(float)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    skin = float(np.median(grey[~mask])) if (~mask).any() else 255.0
    lum = px.mean(axis=1)
    blue_grey = float(((b >= 0.85 * r) & (b > g)).mean())
    black = float((lum < 0.35 * max(skin, 1.0)).mean())
    red = float(((r > 1.6 * g) & (r > 1.4 * b)).mean())
    spread = float(np.linalg.norm(px - px.mean(axis=0), axis=1).mean() / max(skin, 1.0))
    return np.array([area, irregularity, offset, blue_grey, black, red, spread, contrast, n_blobs], float)


@dataclass
class PhantomJudge:
    """P(malignant) of an image, from ``features``: a logistic regression fitted on phantoms."""

    model: object

    def malignant_probability(self, images: list[np.ndarray]) -> np.ndarray:
        x = np.stack([features(im) for im in images])
        return self.model.predict_proba(x)[:, 1]

    def predict(self, images: list[np.ndarray]) -> list[str]:
        return [LABELS[int(p >= 0.5)] for p in self.malignant_probability(images)]


def judge_phantoms(n: int, seed: int, size: int = 64) -> tuple[list[np.ndarray], list[str]]:
    """``n`` phantoms drawn as the miniature model's training set is (all skin types, satellites,
    hair, both styles), from a generator stream of their own, at ``size`` px."""
    from dermt2im.mini.data import training_phantom
    from dermt2im.mini.recipe import MiniRecipe

    recipe = MiniRecipe(data_seed=seed, size=size)
    images, labels = [], []
    for i in range(n):
        image, traits = training_phantom(recipe, i)
        images.append(image)
        labels.append(traits.label)
    return images, labels


def fit_judge(n: int = 600, seed: int = 99, size: int = 64) -> PhantomJudge:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images, labels = judge_phantoms(n, seed, size)
    x = np.stack([features(im) for im in images])
    y = np.array([LABELS.index(label) for label in labels])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0))
    model.fit(x, y)
    return PhantomJudge(model)
