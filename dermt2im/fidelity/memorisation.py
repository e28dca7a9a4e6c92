"""The memorisation distribution: nearest-seed distances of a set against those of held-out real
images.

The distance is the memorisation audit's own (``dermt2im.quality.audit``): the global descriptor (a
low-frequency DCT of a normalised 32 x 32 colour thumbnail) of an image against every seed's under
six crops and eight flips / quarter turns, the nearest entry counting. Here the seeds are the
*training* split only (what the LoRA saw), so that held-out real images, which the LoRA never saw,
give the distances of images that are not copies: a synthetic set closer to its seeds than real
images are to them is copying. ``copy_share`` is the share of a set closer to the seeds than the
``COPY_QUANTILE`` of the held-out real distances (5 % of real images are that close by chance).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dermt2im.quality.audit import DCT_BLOCK, embed, seed_descriptors, top_k

COPY_QUANTILE = 0.05


def seed_reference(seeds: Sequence[np.ndarray]) -> np.ndarray:
    """The audit's index entries (every crop and flip) of the seed images."""
    if not len(seeds):
        return np.zeros((0, 3 * DCT_BLOCK**2), np.float32)
    return np.concatenate([seed_descriptors(rgb) for rgb in seeds])


def nearest_seed_distances(reference: np.ndarray, images: Sequence[np.ndarray]) -> np.ndarray:
    """Each image's global-descriptor distance to its nearest seed (NaN without seeds)."""
    if not len(images):
        return np.zeros(0)
    if len(reference) == 0:
        return np.full(len(images), np.nan)
    queries = np.stack([embed(rgb) for rgb in images])
    return top_k(reference, queries, 1)[1][:, 0].astype(np.float64)


def copy_cut(held_out: np.ndarray) -> float:
    held = np.asarray(held_out, float)
    held = held[np.isfinite(held)]
    return float(np.quantile(held, COPY_QUANTILE)) if held.size else float("nan")
