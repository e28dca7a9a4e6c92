"""Typicality: how far an image is from the seeds in the learned embedding, against how far real
images are.

An image's *distance* is its mean Euclidean distance to its ``k`` nearest training seeds in the seed
embedding (``embeddings.seed_embedding``). The same distance of every *held-out* real image (the
seeds' validation and test splits, which the embedding never saw) calibrates it: an image's
*typicality* is the share of held-out real images at least as far from the seeds as it is (1: closer
than every real image, 0: farther than all of them), and an image is *atypical* beyond the
``quantile`` of the held-out distances (``quality.max_typicality_quantile``). Generated anatomy (an eye
or a mouth inside a lesion), a photograph of something else or plain noise lie outside the seeds'
neighbourhood where real lesions do not: a distance an embedding of the domain can see, which the
face detector, made for photographed faces, cannot.

How many real images the cut would reject is estimated without the optimism of judging the
calibration images by their own cut: each held-out image is judged by the cut computed from the
others (leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dermt2im.fidelity.distances import nearest_distances

NEIGHBOURS = 5
MIN_HELD_OUT = 5  # fewer held-out real images cannot calibrate a cut


@dataclass(frozen=True)
class Calibration:
    reference: np.ndarray  # training seeds' embeddings
    held_out: np.ndarray  # held-out real images' distances to the reference, sorted
    k: int
    quantile: float

    @property
    def cut(self) -> float:
        return float(np.quantile(self.held_out, self.quantile)) if len(self.held_out) else float("nan")

    def distances(self, embedded: np.ndarray) -> np.ndarray:
        if len(embedded) == 0:
            return np.zeros(0)
        return nearest_distances(embedded, self.reference, self.k)

    def typicality(self, distances: np.ndarray) -> np.ndarray:
        """Share of held-out real images at least as far from the seeds (1 typical ... 0 atypical)."""
        n = len(self.held_out)
        if n == 0:
            return np.full(len(distances), np.nan)
        return (n - np.searchsorted(self.held_out, distances, side="left")) / n

    def atypical(self, distances: np.ndarray) -> np.ndarray:
        return np.asarray(distances) > self.cut

    def held_out_rejections(self) -> int:
        """Held-out real images each beyond the cut computed from the other held-out images."""
        d = self.held_out
        return int(sum(d[i] > np.quantile(np.delete(d, i), self.quantile) for i in range(len(d)))) if len(d) > 1 else 0


def calibrate(reference: np.ndarray, held_out: np.ndarray, *, k: int = NEIGHBOURS, quantile: float = 0.99) -> Calibration:
    """Calibrate on the training seeds' embeddings (``reference``) and held-out real images' (``held_out``)."""
    reference = np.asarray(reference, np.float64)
    k = max(1, min(k, len(reference)))
    held = np.sort(nearest_distances(held_out, reference, k)) if len(held_out) and len(reference) else np.zeros(0)
    return Calibration(reference, held, k, quantile)
