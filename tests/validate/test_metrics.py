"""Metrics and the exact McNemar test on small known examples."""

import math

import numpy as np
import pytest

from dermt2im.validate.metrics import (
    binary_metrics,
    confusion,
    mcnemar_exact,
    mcnemar_from_predictions,
    roc_auc,
    roc_curve,
)


def test_binary_metrics_on_a_known_example():
    y = [0, 0, 1, 1]
    prob = [0.1, 0.6, 0.4, 0.9]  # predictions 0, 1, 0, 1
    m = binary_metrics(y, prob)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 1, 1, 1)
    assert m["accuracy"] == m["balanced_accuracy"] == m["sensitivity"] == m["specificity"] == m["f1"] == 0.5
    assert m["roc_auc"] == pytest.approx(0.75)  # 3 of 4 (positive, negative) pairs ordered right

    m = binary_metrics([0, 0, 0, 1], [0.2, 0.3, 0.7, 0.8])
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))
    assert m["roc_auc"] == 1.0


def test_threshold_is_inclusive_and_confusion_counts():
    assert confusion([1, 0], [1, 1]) == {"tn": 0, "fp": 1, "fn": 0, "tp": 1}
    assert binary_metrics([1], [0.5])["tp"] == 1


def test_auc_ties_and_degenerate_cases():
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.2, 0.9]))
    m = binary_metrics([1, 1], [0.9, 0.2])
    assert math.isnan(m["specificity"]) and m["balanced_accuracy"] == 0.5  # mean of the defined one
    fpr, tpr = roc_curve([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_mcnemar_exact_binomial():
    # 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8 / 128
    assert mcnemar_exact(1, 6).p_value == pytest.approx(0.125)
    assert mcnemar_exact(6, 1).p_value == pytest.approx(0.125)
    assert mcnemar_exact(0, 5).p_value == pytest.approx(2 / 32)
    assert mcnemar_exact(2, 10).p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(3, 3).p_value == 1.0
    assert mcnemar_exact(0, 0).p_value == 1.0


def test_mcnemar_from_paired_predictions():
    y = [1, 1, 1, 0, 0, 0, 1]
    a = [1, 1, 0, 0, 1, 1, 0]  # correct on 0, 1, 3
    b = [1, 0, 1, 0, 0, 0, 1]  # correct on 0, 2, 3, 4, 5, 6
    t = mcnemar_from_predictions(y, a, b)
    assert (t.b, t.c) == (1, 4)  # only a right: {1}; only b right: {2, 4, 5, 6}
    assert t.p_value == pytest.approx(2 * (1 + 5) / 32)
