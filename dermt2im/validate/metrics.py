"""Classification metrics, confidence intervals and the paired McNemar test, with no SciPy.

Conventions: labels are 0 = benign, 1 = malignant; ``prob`` is the predicted probability of
*malignant*; the decision threshold is fixed at 0.5 (never tuned, least of all on a test set).
Sensitivity and specificity are for the malignant class. Degenerate cases return NaN rather than
raising (e.g. ROC AUC on a test set with a single class), so one odd test set cannot crash a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THRESHOLD = 0.5
METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "sensitivity",
    "specificity",
    "f1",
)
CONFUSION: tuple[str, ...] = ("tn", "fp", "fn", "tp")


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, int]:
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(y_pred, dtype=int)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y.shape} vs {p.shape}")
    return {
        "tn": int(((y == 0) & (p == 0)).sum()),
        "fp": int(((y == 0) & (p == 1)).sum()),
        "fn": int(((y == 1) & (p == 0)).sum()),
        "tp": int(((y == 1) & (p == 1)).sum()),
    }


def roc_auc(y_true: Sequence[int], prob: Sequence[float]) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half)."""
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(prob, dtype=float)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: Sequence[int], prob: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over every distinct threshold, from (0,0) to (1,1)."""
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(prob, dtype=float)
    n_pos, n_neg = max(int((y == 1).sum()), 1), max(int((y == 0).sum()), 1)
    fpr, tpr = [0.0], [0.0]
    for t in np.unique(s)[::-1]:
        pred = s >= t
        tpr.append(float((pred & (y == 1)).sum()) / n_pos)
        fpr.append(float((pred & (y == 0)).sum()) / n_neg)
    if fpr[-1] != 1.0 or tpr[-1] != 1.0:
        fpr.append(1.0)
        tpr.append(1.0)
    return np.asarray(fpr), np.asarray(tpr)


def binary_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float = THRESHOLD) -> dict[str, float]:
    """Every metric of Table IV plus the confusion counts, for one model on one test set."""
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(prob, dtype=float)
    pred = (s >= threshold).astype(int)
    c = confusion(y, pred)
    tn, fp, fn, tp = c["tn"], c["fp"], c["fn"], c["tp"]
    sens = _div(tp, tp + fn)
    spec = _div(tn, tn + fp)
    precision = _div(tp, tp + fp)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    balanced = float(np.nanmean([sens, spec])) if not (math.isnan(sens) and math.isnan(spec)) else float("nan")
    out = {
        "accuracy": _div(tp + tn, len(y)),
        "balanced_accuracy": balanced,
        "roc_auc": roc_auc(y, s),
        "sensitivity": sens,
        "specificity": spec,
        "precision": precision,
        "f1": f1,
        "n": float(len(y)),
    }
    out.update({k: float(v) for k, v in c.items()})
    return out


# --- Student t quantiles, via the regularised incomplete beta function (Numerical Recipes 6.4) ---


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided t-interval; ``half_width`` is NaN when n < 2."""

    mean: float
    low: float
    high: float
    half_width: float
    n: int
    confidence: float = 0.95

    def format(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and Student t confidence interval over seeds (NaN values are dropped)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=float)
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, 0, confidence)
    m = float(v.mean())
    if n < 2:
        return Interval(m, float("nan"), float("nan"), float("nan"), n, confidence)
    sd = float(v.std(ddof=1))
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, half, n, confidence)


@dataclass(frozen=True)
class McNemar:
    """Exact (binomial) McNemar test on paired predictions of two classifiers.

    ``b``: images only A classified correctly; ``c``: images only B classified correctly.
    """

    b: int
    c: int
    p_value: float

    @property
    def n_discordant(self) -> int:
        return self.b + self.c


def mcnemar_exact(b: int, c: int) -> McNemar:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    n = b + c
    if n == 0:
        return McNemar(b, c, 1.0)
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return McNemar(b, c, min(1.0, 2.0 * tail))


def mcnemar_from_predictions(y_true: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int]) -> McNemar:
    y = np.asarray(y_true, dtype=int)
    a = np.asarray(pred_a, dtype=int) == y
    b = np.asarray(pred_b, dtype=int) == y
    if not (len(y) == len(a) == len(b)):
        raise ValueError("paired predictions must cover the same images")
    return mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum()))
