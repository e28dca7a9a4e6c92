"""The phantom judge the method tests rely on: it tells benign from malignant phantoms it never saw
(all skin types, satellites, hair, both camera styles), by their visible differences."""

import numpy as np
import pytest

from dermt2im.mini.judge import FEATURES, features, judge_phantoms

pytestmark = pytest.mark.xdist_group("mini_method")  # the worker that fits the session's judge anyway


def test_the_judge_tells_unseen_phantoms_apart(judge):
    images, labels = judge_phantoms(120, seed=4242)
    predicted = judge.predict(images)
    per_class = {label: np.mean([p == label for p, t in zip(predicted, labels) if t == label]) for label in set(labels)}
    assert min(per_class.values()) >= 0.85, per_class


def test_features_measure_what_separates_the_classes():
    images, labels = judge_phantoms(40, seed=7)
    x = np.stack([features(im) for im in images])
    labels = np.array(labels)
    area, blue = FEATURES.index("area"), FEATURES.index("blue_grey")
    assert x[labels == "malignant", area].mean() > 1.5 * x[labels == "benign", area].mean()
    assert x[labels == "malignant", blue].mean() > x[labels == "benign", blue].mean()
    blank = np.full((64, 64, 3), 200, np.uint8)
    assert features(blank)[area] == 0.0
