"""Intervals for Table IV: a percentile bootstrap over the test images.

A cell of Table IV is one (model, regime, test set). For each seed it has one prediction per
test image, and its value is the mean over seeds of the metric. Its interval resamples the test
images with replacement, within each class (so every resample holds both classes and the class
balance of the test set), the same images for every seed; recomputes the mean over seeds on
every resample; and takes the percentiles of those values. Seeds are pooled, not resampled: the
interval says how far the number could move on another test set of the same size and make-up,
and it always lies inside the metric's range.

The difference between a regime and the baseline is resampled the same way, with the same images
for both (a paired bootstrap), which keeps the correlation between two models judged on the same
images and gives a much narrower interval than two separate ones would suggest.

Thousands of resamples of scikit-learn calls would take minutes, so a resample's metrics are
computed here in one vectorised pass from its confusion counts and, for ROC AUC, from the
Mann-Whitney rank sum (``scipy.stats.rankdata``); on the original images they equal
``metrics.binary_metrics`` (tests/validate/test_bootstrap.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dermt2im.validate.metrics import THRESHOLD, binary_metrics

N_RESAMPLES = 2000
CONFIDENCE = 0.95
RANDOM_SEED = 0  # a fixed seed: rebuilding the report gives the same intervals
_CHUNK_ELEMENTS = 4_000_000  # probabilities held at once per chunk of resamples


@dataclass(frozen=True)
class Interval:
    """A value with its bootstrap interval (NaN bounds when there is none)."""

    value: float
    low: float
    high: float

    def format(self, digits: int = 3, signed: bool = False) -> str:
        if math.isnan(self.value):
            return "n/a"
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        if math.isnan(self.low) or math.isnan(self.high):
            return f.format(self.value)
        return f"{f.format(self.value)} [{f.format(self.low)}, {f.format(self.high)}]"


def stratified_resamples(y: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, len(y)) image indices: each resample draws each class's images from that class."""
    idx = np.empty((n_resamples, len(y)), dtype=np.int64)
    start = 0
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        idx[:, start:start + len(members)] = rng.choice(members, size=(n_resamples, len(members)), replace=True)
        start += len(members)
    return idx


def metric_values(y: np.ndarray, prob: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` along the last axis of ``prob`` (labels ``y`` broadcast against it)."""
    from scipy.stats import rankdata

    pos = np.broadcast_to(y == 1, prob.shape)
    pred = prob >= THRESHOLD
    tp, fn = (pred & pos).sum(-1), (~pred & pos).sum(-1)
    tn, fp = (~pred & ~pos).sum(-1), (pred & ~pos).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of two NaNs: a single-class test set
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        if metric == "roc_auc":
            n_pos, n_neg = pos.sum(-1), (~pos).sum(-1)
            rank_sum = (rankdata(prob, axis=-1) * pos).sum(-1)
            return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        values = {
            "accuracy": lambda: (tp + tn) / prob.shape[-1],
            "balanced_accuracy": lambda: np.nanmean(np.stack([sens, spec]), axis=0),
            "sensitivity": lambda: sens,
            "specificity": lambda: spec,
            "precision": lambda: tp / (tp + fp),
            "f1": lambda: 2 * tp / (2 * tp + fp + fn),
        }
        if metric not in values:
            raise ValueError(f"no bootstrap for metric {metric!r}")
        return np.asarray(values[metric](), dtype=float)


def _resampled_means(y: np.ndarray, groups: Sequence[np.ndarray], weights: Sequence[float], metric: str,
                     n_resamples: int, seed: int) -> np.ndarray:
    """For every resample: sum over groups of weight x (mean over the group's seeds of ``metric``)."""
    rng = np.random.default_rng(seed)
    idx = stratified_resamples(y, n_resamples, rng)
    rows = sum(len(g) for g in groups)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, rows * len(y)))
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        part = idx[start:start + chunk]
        ys = y[part]
        total = np.zeros(len(part))
        for probs, w in zip(groups, weights):
            total += w * metric_values(ys, probs[:, part], metric).mean(axis=0)
        out[start:start + chunk] = total
    return out


def _interval(value: float, draws: np.ndarray, confidence: float) -> Interval:
    finite = draws[np.isfinite(draws)]
    if math.isnan(value) or len(finite) < len(draws) / 2:
        return Interval(value, float("nan"), float("nan"))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def _as_matrix(probs: np.ndarray | Sequence[Sequence[float]], n: int) -> np.ndarray:
    m = np.atleast_2d(np.asarray(probs, dtype=float))
    if m.shape[1] != n:
        raise ValueError(f"predictions cover {m.shape[1]} images, labels {n}")
    return m


def point_value(y: np.ndarray, probs: np.ndarray, metric: str) -> float:
    """The mean over seeds (rows of ``probs``) of ``metric`` on every test image."""
    values = [binary_metrics(y, p)[metric] for p in probs]
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def seed_mean_interval(y: Sequence[int], probs, metric: str, *, n_resamples: int = N_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = RANDOM_SEED) -> Interval:
    """The mean over seeds of ``metric`` with its percentile bootstrap interval over test images.

    ``probs``: one row of P(malignant) per seed, columns in the order of ``y``."""
    y = np.asarray(y, dtype=int)
    p = _as_matrix(probs, len(y))
    draws = _resampled_means(y, [p], [1.0], metric, n_resamples, seed)
    return _interval(point_value(y, p, metric), draws, confidence)


def paired_difference(y: Sequence[int], baseline, other, metric: str, *, n_resamples: int = N_RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = RANDOM_SEED) -> Interval:
    """``other`` minus ``baseline`` (each the mean over its seeds) with a paired bootstrap interval:
    both are recomputed on the same resampled test images."""
    y = np.asarray(y, dtype=int)
    base, oth = _as_matrix(baseline, len(y)), _as_matrix(other, len(y))
    draws = _resampled_means(y, [oth, base], [1.0, -1.0], metric, n_resamples, seed)
    return _interval(point_value(y, oth, metric) - point_value(y, base, metric), draws, confidence)
