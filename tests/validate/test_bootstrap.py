"""Bootstrap intervals over test images: the vectorised metrics equal scikit-learn's, intervals stay
inside the metric's range, narrow with more test images, and the paired difference is paired."""

import math

import numpy as np
import pytest

from dermt2im.validate.bootstrap import (
    metric_values,
    paired_difference,
    seed_mean_interval,
    stratified_resamples,
)
from dermt2im.validate.metrics import METRICS, binary_metrics


def _predictions(n: int, seeds: int, skill: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels (a third malignant) and per-seed P(malignant) that separate the classes by ``skill``."""
    y = (rng.random(n) < 1 / 3).astype(int)
    noise = rng.normal(0, 1, (seeds, n))
    probs = 1 / (1 + np.exp(-(skill * (2 * y - 1) + noise)))
    return y, np.round(probs, 2)  # rounded: ties, as real classifiers produce them


@pytest.mark.parametrize("metric", [*METRICS, "precision"])
def test_vectorised_metrics_equal_scikit_learn_on_the_original_images(metric):
    y, probs = _predictions(60, 3, 1.0, np.random.default_rng(1))
    got = metric_values(y, probs, metric)
    want = [binary_metrics(y, p)[metric] for p in probs]
    assert got == pytest.approx(want, abs=1e-12)


def test_resamples_keep_each_class_and_its_count():
    y = np.array([0] * 7 + [1] * 3)
    idx = stratified_resamples(y, 500, np.random.default_rng(0))
    assert idx.shape == (500, 10)
    assert (y[idx].sum(axis=1) == 3).all()  # every resample: 3 malignant, 7 benign
    assert len(np.unique(idx[:, 7:])) == 3 and set(np.unique(idx[:, :7])) == set(range(7))


def test_two_seeds_that_disagree_still_give_an_interval_inside_the_range():
    """The Student interval over two seeds gave ROC AUC 0.484 +- 3.325; a bootstrap over images cannot."""
    rng = np.random.default_rng(2)
    y, good = _predictions(40, 1, 2.0, rng)
    bad = 1 - good  # a seed that learned the classes the wrong way round
    for metric in METRICS:
        ci = seed_mean_interval(y, np.vstack([good, bad]), metric)
        assert 0.0 <= ci.low <= ci.value <= ci.high <= 1.0, (metric, ci)


def test_more_test_images_give_a_narrower_interval_and_the_same_seed_the_same_interval():
    rng = np.random.default_rng(3)
    small = _predictions(50, 2, 1.0, rng)
    large = _predictions(800, 2, 1.0, rng)
    w_small = seed_mean_interval(*small, "balanced_accuracy")
    w_large = seed_mean_interval(*large, "balanced_accuracy")
    assert (w_large.high - w_large.low) < 0.5 * (w_small.high - w_small.low)
    assert seed_mean_interval(*small, "balanced_accuracy") == w_small


def test_the_interval_covers_the_population_value_about_as_often_as_it_says():
    """Test sets drawn from one population: the 95% interval of ROC AUC covers the value on a
    very large test set in roughly 95 of 100 draws (not 60, not 100)."""
    rng = np.random.default_rng(4)
    y_pop, p_pop = _predictions(200_000, 1, 1.0, rng)
    truth = binary_metrics(y_pop, p_pop[0])["roc_auc"]
    covered = 0
    for i in range(100):
        pick = rng.choice(len(y_pop), 120, replace=False)
        ci = seed_mean_interval(y_pop[pick], p_pop[:, pick], "roc_auc", n_resamples=400, seed=i)
        covered += ci.low <= truth <= ci.high
    assert 85 <= covered <= 100


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    y, probs = _predictions(80, 2, 1.0, np.random.default_rng(5))
    same = paired_difference(y, probs, probs, "balanced_accuracy")
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


def test_pairing_narrows_the_difference_of_two_correlated_models():
    """Two models that mostly agree: the paired interval of their difference is far narrower than
    that of a difference of two independent estimates (their widths added in quadrature)."""
    rng = np.random.default_rng(6)
    y, base = _predictions(200, 1, 1.0, rng)
    other = base.copy()
    flip = rng.choice(np.flatnonzero((base[0] >= 0.5) != y), 8, replace=False)  # fix 8 of its mistakes
    other[0, flip] = 1.0 - other[0, flip]
    diff = paired_difference(y, base, other, "accuracy")
    assert diff.value == pytest.approx(8 / 200)
    assert diff.low > 0  # a consistent gain on the same images is established
    a, b = seed_mean_interval(y, base, "accuracy"), seed_mean_interval(y, other, "accuracy")
    assert (diff.high - diff.low) < 0.6 * math.hypot(a.high - a.low, b.high - b.low)


def test_a_single_class_test_set_has_no_roc_interval():
    y = np.zeros(10, dtype=int)
    ci = seed_mean_interval(y, np.linspace(0.1, 0.9, 10)[None, :], "roc_auc")
    assert math.isnan(ci.value) and math.isnan(ci.low) and ci.format() == "n/a"
    assert seed_mean_interval(y, np.full((1, 10), 0.2), "specificity").format() == "1.000 [1.000, 1.000]"
