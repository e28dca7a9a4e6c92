"""Class agreement's arithmetic: Wilson intervals, pooling seeds per image, the both-classes mean."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from dermt2im.validate.agreement import BOTH, agreement_table, headline, metrics, reference_rows, wilson


@pytest.mark.parametrize("k,n", [(0, 5), (8, 10), (72, 200), (40, 40)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert math.isnan(wilson(0, 0)[0])


def _preds(model="vit", seeds=(0,), call=lambda label, i, seed: label):
    rows = []
    for seed in seeds:
        for label in ("benign", "malignant"):
            for i in range(10):
                rows.append({"model": model, "seed": seed, "key": f"{label}-{i}", "label": label, "source": "dermt2im",
                             "sampler": ("euler", "plms")[i % 2], "transformation": ("", ", tiny mole")[i % 2],
                             "pred": call(label, i, seed)})
    return pd.DataFrame(rows)


def test_a_classifier_calling_everything_malignant_is_at_chance_for_both_classes():
    table = agreement_table(_preds(call=lambda label, i, seed: "malignant"))
    overall = table[table["by"] == "all"].set_index("label")
    assert overall.loc["malignant", "share"] == 1.0 and overall.loc["benign", "share"] == 0.0
    assert overall.loc[BOTH, "share"] == 0.5 and overall.loc[BOTH, "n_images"] == 20
    assert set(table["by"]) == {"all", "source", "sampler", "transformation"}
    assert set(table.loc[table["by"] == "sampler", "group"]) == {"euler", "plms"}
    assert set(table.loc[table["by"] == "transformation", "group"]) == {"(none)", ", tiny mole"}


def test_seeds_are_pooled_per_image_and_intervals_count_images():
    # seed 0 right on every image, seed 1 right on none: each image agrees half the time
    table = agreement_table(_preds(seeds=(0, 1), call=lambda label, i, seed: label if seed == 0 else
                                   ("malignant" if label == "benign" else "benign")))
    row = table[(table["by"] == "all") & (table["label"] == "benign")].iloc[0]
    assert row["share"] == 0.5 and row["n_images"] == 10 and row["n_seeds"] == 2
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson(5, 10))


def test_metrics_headline_and_the_real_reference():
    table = agreement_table(_preds(call=lambda label, i, seed: label if i < 8 else "benign"))
    m = metrics(table)
    assert m["class_agreement.vit.benign"] == 1.0 and m["class_agreement.vit.malignant"] == 0.8
    assert m["class_agreement.vit.both"] == pytest.approx(0.9)
    assert "class_agreement.vit.sampler.plms.malignant_ci_low" in m
    assert "90% [" in headline(table)[0] and "chance 50%" in headline(table)[0]
    test = pd.DataFrame({"model": "vit", "seed": 0, "test_set": "ham", "key": [str(i) for i in range(4)],
                         "label": [0, 0, 1, 1], "prob": [0.1, 0.9, 0.8, 0.7]})
    ref = reference_rows(test).set_index("label")
    assert ref.loc["benign", "share"] == 0.5 and ref.loc["malignant", "share"] == 1.0 and set(ref["by"]) == {"real test"}
    assert np.isclose(ref.loc[BOTH, "share"], 0.75)
