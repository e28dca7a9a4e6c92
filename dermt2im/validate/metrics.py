"""Classification metrics of one model on one test set, and the paired exact McNemar test.

scikit-learn computes the metrics and the ROC curve, SciPy the binomial test; what is left here
is how they are put together for Table IV.

Conventions: labels are 0 = benign, 1 = malignant; ``prob`` is the predicted probability of
*malignant*; the decision threshold is fixed at 0.5 (never tuned, least of all on a test set).
Sensitivity and specificity are for the malignant class. Degenerate cases return NaN rather than
raising (e.g. ROC AUC on a test set with a single class), so one odd test set cannot crash a run.
Balanced accuracy is the mean of the sensitivity and specificity that are defined (scikit-learn's
convention when a class is absent).
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
    from sklearn.metrics import confusion_matrix

    y, p = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y.shape} vs {p.shape}")
    tn, fp, fn, tp = confusion_matrix(y, p, labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def roc_auc(y_true: Sequence[int], prob: Sequence[float]) -> float:
    """Area under the ROC curve; NaN when the test set holds a single class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=int)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(prob, dtype=float)))


def roc_curve(y_true: Sequence[int], prob: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1); a diagonal for one class."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    y = np.asarray(y_true, dtype=int)
    if len(np.unique(y)) < 2:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = sk_roc_curve(y, np.asarray(prob, dtype=float), drop_intermediate=False)
    return fpr, tpr


def binary_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float = THRESHOLD) -> dict[str, float]:
    """Every metric of Table IV plus the confusion counts, for one model on one test set."""
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(prob, dtype=float)
    c = confusion(y, (s >= threshold).astype(int))
    tn, fp, fn, tp = c["tn"], c["fp"], c["fn"], c["tp"]
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    defined = [v for v in (sens, spec) if not math.isnan(v)]
    out = {
        "accuracy": _div(tp + tn, len(y)),
        "balanced_accuracy": float(np.mean(defined)) if defined else float("nan"),
        "roc_auc": roc_auc(y, s),
        "sensitivity": sens,
        "specificity": spec,
        "precision": _div(tp, tp + fp),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "n": float(len(y)),
    }
    out.update({k: float(v) for k, v in c.items()})
    return out


@dataclass(frozen=True)
class McNemar:
    """Exact (binomial) McNemar test on paired predictions of two classifiers.

    ``b``: images only A classified correctly; ``c``: images only B classified correctly.
    """

    b: int
    c: int
    p_value: float


def mcnemar_exact(b: int, c: int) -> McNemar:
    """Two-sided exact McNemar p-value: the binomial test of min(b, c) in b + c trials at 1/2."""
    from scipy.stats import binomtest

    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    if b + c == 0:
        return McNemar(b, c, 1.0)
    return McNemar(b, c, float(binomtest(min(b, c), b + c, 0.5).pvalue))


def mcnemar_from_predictions(y_true: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int]) -> McNemar:
    y = np.asarray(y_true, dtype=int)
    a = np.asarray(pred_a, dtype=int) == y
    b = np.asarray(pred_b, dtype=int) == y
    if not (len(y) == len(a) == len(b)):
        raise ValueError("paired predictions must cover the same images")
    return mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum()))
