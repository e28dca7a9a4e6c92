"""Bootstrap intervals over images, with the sample sizes behind them and a warning where a sample is
too small for the metric.

A set-level metric (FID, KID, FRD, precision / recall / density / coverage) is computed on the images
as they are and on ``resamples`` bootstrap resamples of both sets (images drawn with replacement,
each set on its own); the interval is the percentile interval of the resampled values. A resample is
given to a metric as *weights*, how often each image was drawn (a row of multinomial counts), so
that the metrics can treat an image drawn twice as one image counted twice (KID's unbiased estimator
leaves out the pairs of an image with itself; PRDC's neighbourhood radii stay those of the full sets:
``dermt2im.fidelity.distances``). The resamples come from a fixed seed: rebuilding a report gives the
same intervals.

Too small a sample is stated, not hidden: ``MIN_IMAGES`` holds, per metric, the size under which its
value is unreliable (FID also needs more images than embedding dimensions for a full-rank
covariance), and every estimate carries its warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RESAMPLES = 200
CONFIDENCE = 0.95
RANDOM_SEED = 0

# The smallest sets on which a metric means something. KID is unbiased but its spread is wide below
# ~50 images (Bińkowski et al. 2018 use subsets of 1000); PRDC's k-NN balls (k = 5) need an order of
# magnitude more points than k (Naeem et al. 2020 use 10,000); FID's covariance needs more images
# than dimensions (else it is singular and FID is strongly biased upwards); FRD is an FID on a few
# hundred radiomics features, with the same bias.
MIN_IMAGES: dict[str, int] = {"fid": 50, "kid": 50, "frd": 50, "precision": 50, "recall": 50, "density": 50,
                              "coverage": 50, "ita": 10, "typicality": 10, "memorisation": 10}


@dataclass(frozen=True)
class Estimate:
    """A metric's value on the images, its bootstrap interval and what it rests on."""

    value: float
    low: float
    high: float
    n: int  # images judged
    n_reference: int  # reference images (0 for a per-image statistic of one set)
    warning: str = ""

    def format(self, digits: int = 3) -> str:
        if math.isnan(self.value):
            return "n/a"
        text = f"{self.value:.{digits}f}"
        if not (math.isnan(self.low) or math.isnan(self.high)):
            text += f" [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return text


NAN = float("nan")


def missing(n: int, n_reference: int, why: str) -> Estimate:
    return Estimate(NAN, NAN, NAN, n, n_reference, why)


def too_small(metric: str, n: int, n_reference: int = 0, dimensions: int = 0) -> str:
    """The warning for ``metric`` on ``n`` images against ``n_reference`` ("" when large enough)."""
    least = MIN_IMAGES.get(metric.split(".")[0], 0)
    sizes = [s for s in (n, n_reference) if s]
    smallest = min(sizes) if sizes else 0
    notes = []
    if smallest < least:
        notes.append(f"only {smallest} images (fewer than {least}: unreliable)")
    if metric.startswith(("fid", "frd")) and dimensions and smallest <= dimensions:
        notes.append(f"{smallest} images in {dimensions} dimensions: covariance singular, biased upwards")
    return "; ".join(notes)


def resample_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) counts: how often each of ``n`` images is drawn in each bootstrap resample."""
    if n == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size < max(10, values.size // 2):  # most resamples undefined: no interval
        return NAN, NAN
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def two_sample(metric: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, n_reference: int, *,
               name: str, dimensions: int = 0, resamples: int = RESAMPLES, seed: int = RANDOM_SEED,
               confidence: float = CONFIDENCE, bias_shift: bool = False, lower_bound: float | None = None) -> Estimate:
    """``metric(w, w_reference)`` (each a (k, size) weight matrix, returning k values) on the sets as
    they are and on ``resamples`` bootstrap resamples of each.

    ``bias_shift``: the resampled values are first shifted by the bootstrap's estimate of the bias
    (their mean minus the value). FID and FRD need it: the images a resample draws twice shrink its
    covariances' rank, and every resample lands above the value (a plain percentile interval can
    then miss the value it is about). ``lower_bound`` clips the interval to the metric's range."""
    warning = too_small(name, n, n_reference, dimensions)
    if n < 2 or n_reference < 2:
        return missing(n, n_reference, warning or "fewer than 2 images")
    value = float(metric(np.ones((1, n)), np.ones((1, n_reference)))[0])
    if not resamples:
        return Estimate(value, NAN, NAN, n, n_reference, warning)
    rng = np.random.default_rng(seed)
    w, w_ref = resample_weights(n, resamples, rng), resample_weights(n_reference, resamples, rng)
    resampled = np.asarray(metric(w, w_ref), dtype=float)
    if bias_shift and np.isfinite(resampled).any() and math.isfinite(value):
        resampled = resampled - (np.nanmean(resampled[np.isfinite(resampled)]) - value)
    low, high = interval(resampled, confidence)
    if lower_bound is not None:
        low, high = max(low, lower_bound), max(high, lower_bound)
    return Estimate(value, low, high, n, n_reference, warning)


def two_sample_all(metric: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]], n: int, n_reference: int, *,
                   names: tuple[str, ...], minimum: int = 2, resamples: int = RESAMPLES, seed: int = RANDOM_SEED,
                   confidence: float = CONFIDENCE) -> dict[str, Estimate]:
    """``two_sample`` for a metric computing several values at once (``prdc``): one per name; none
    below ``minimum`` images on either side."""
    if n < minimum or n_reference < minimum:
        return {k: missing(n, n_reference, f"fewer than {minimum} images: not computed") for k in names}
    point = metric(np.ones((1, n)), np.ones((1, n_reference)))
    rng = np.random.default_rng(seed)
    w, w_ref = resample_weights(n, resamples, rng), resample_weights(n_reference, resamples, rng)
    resampled = metric(w, w_ref) if resamples else {k: np.zeros(0) for k in names}
    out = {}
    for k in names:
        low, high = interval(np.asarray(resampled[k], float), confidence) if resamples else (NAN, NAN)
        out[k] = Estimate(float(point[k][0]), low, high, n, n_reference, too_small(k, n, n_reference))
    return out


def one_sample(values: np.ndarray, statistic: Callable[[np.ndarray], float], *, name: str,
               resamples: int = RESAMPLES, seed: int = RANDOM_SEED, confidence: float = CONFIDENCE) -> Estimate:
    """A statistic of per-image values (a median, a share) with its bootstrap interval over images;
    NaN values (images where the quantity is undefined) are left out and not counted."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    warning = too_small(name, n)
    if n == 0:
        return missing(0, 0, warning or "no images")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    resampled = np.array([statistic(values[i]) for i in idx])
    low, high = interval(resampled, confidence) if n > 1 and resamples else (NAN, NAN)
    return Estimate(float(statistic(values)), low, high, n, 0, warning)
