"""The miniature model's training data: phantoms with what they show, rendered deterministically.

Phantom *i* is a pure function of (recipe, i): its class alternates, and its style, hair, skin type
and satellite moles are drawn from a generator seeded by (``data_seed``, i), so the first *k*
images are the same whatever the set's size. The set's digest (sha256 over every image's pixels
and full caption, in order) and a fingerprint of the first images (their mean colours) are recorded
in the model's header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from dermt2im.core.specs import LABELS
from dermt2im.mini.captions import caption
from dermt2im.mini.recipe import MiniRecipe
from dermt2im.phantoms import PhantomTraits, render_phantom_traits

FINGERPRINT_IMAGES = 8
_STREAM = 20  # keeps these generators apart from make_phantoms' (seed, style code, index)


@dataclass(frozen=True)
class TrainingSet:
    images: np.ndarray  # N x size x size x 3 uint8
    traits: tuple[PhantomTraits, ...]
    digest: str

    @property
    def captions(self) -> list[str]:
        return [caption(t) for t in self.traits]


def training_phantom(recipe: MiniRecipe, index: int) -> tuple[np.ndarray, PhantomTraits]:
    rng = np.random.default_rng(np.random.SeedSequence([recipe.data_seed, _STREAM, index]))
    label = LABELS[index % 2]
    style = "ham" if rng.random() < recipe.ham_style_share else "isic"
    hair = bool(rng.random() < recipe.hair_probability)
    weights = np.asarray(recipe.skin_type_weights, float)
    skin_type = int(rng.choice(np.arange(1, 7), p=weights / weights.sum()))
    satellites = int(rng.integers(1, 4)) if rng.random() < recipe.satellite_probability else 0
    image, traits = render_phantom_traits(label, rng, size=recipe.render_size, style=style, hair=hair,
                                          skin_type=skin_type, satellites=satellites)
    if recipe.render_size != recipe.size:
        image = cv2.resize(image, (recipe.size, recipe.size), interpolation=cv2.INTER_AREA)
    return image, traits


def digest_of(images: np.ndarray, traits: tuple[PhantomTraits, ...]) -> str:
    h = hashlib.sha256()
    for image, t in zip(images, traits):
        h.update(np.ascontiguousarray(image).tobytes())
        h.update(caption(t).encode() + b"\0")
    return h.hexdigest()


def fingerprint(images: np.ndarray) -> list[list[float]]:
    """Mean R, G, B of the first images (two decimals): robust to a last-bit difference in a
    floating-point library, not to a change of the generator."""
    return [[round(float(c), 2) for c in im.reshape(-1, 3).mean(axis=0)] for im in images[:FINGERPRINT_IMAGES]]


def build_training_set(recipe: MiniRecipe, n: int | None = None) -> TrainingSet:
    n = recipe.images if n is None else n
    rendered = [training_phantom(recipe, i) for i in range(n)]
    images = np.stack([im for im, _ in rendered])
    traits = tuple(t for _, t in rendered)
    return TrainingSet(images, traits, digest_of(images, traits))
