"""Each regime builds the intended training mixture (counts, ratios, labels, filtering, seeding)."""

import pandas as pd
import pytest

from dermt2im.core.specs import ValidateConfig
from dermt2im.validate.regimes import (
    REAL,
    SYNTHETIC,
    NoSyntheticImages,
    RegimeError,
    allocate,
    build_mixture,
    expand_regimes,
    parse_regime,
    real_rows,
    usable_synthetic,
)


def _real(n_benign=16, n_malignant=16):
    rows = [(f"/real/b{i}.png", "benign") for i in range(n_benign)]
    rows += [(f"/real/m{i}.png", "malignant") for i in range(n_malignant)]
    return pd.DataFrame(rows, columns=["path", "label"]).assign(source=REAL)


def _synthetic(n_benign=200, n_malignant=200):
    rows = [(f"/syn/b{i}.png", "benign") for i in range(n_benign)]
    rows += [(f"/syn/m{i}.png", "malignant") for i in range(n_malignant)]
    return pd.DataFrame(rows, columns=["path", "label"]).assign(source=SYNTHETIC)


def test_baseline_is_all_real_images():
    m = build_mixture(_real(), _synthetic(), parse_regime("baseline"), 0)
    assert (m.n_real, m.n_synthetic) == (32, 0)
    assert sorted(p for p, _, _ in m.items) == sorted(_real()["path"])


def test_hybrid_constant_total_replaces_real_images():
    m = build_mixture(_real(), _synthetic(), parse_regime("hybrid", 0.75), 0)
    assert len(m.items) == 32  # N, the number of real training images
    assert (m.n_real, m.n_synthetic) == (8, 24)
    assert m.actual_ratio == 0.75
    assert m.label_counts(SYNTHETIC) == {"benign": 12, "malignant": 12}
    assert m.label_counts() == {"benign": 16, "malignant": 16}  # class composition of the real split
    assert m.regime.setting == "constant"


def test_additive_keeps_all_real_and_adds_synthetic_on_top():
    m = build_mixture(_real(), _synthetic(), parse_regime("hybrid-additive", 0.75), 0)
    assert (m.n_real, m.n_synthetic) == (32, 96)  # 96 / 128 = 0.75
    assert m.actual_ratio == 0.75
    s = build_mixture(_real(), _synthetic(), parse_regime("sweep-additive-50"), 0)
    assert (s.n_real, s.n_synthetic) == (32, 32)


def test_synthetic_only_and_sweep_names():
    m = build_mixture(_real(), _synthetic(), parse_regime("synthetic_only"), 0)
    assert (m.n_real, m.n_synthetic) == (0, 32)
    cfg = ValidateConfig(regimes=("baseline", "hybrid"), sweep_ratios=(0.0, 0.25, 0.5, 1.0),
                         sweep_settings=("constant", "additive"))
    names = [r.name for r in expand_regimes(cfg)]
    assert names == ["baseline", "hybrid", "sweep-constant-0", "sweep-constant-25", "sweep-constant-50",
                     "sweep-constant-100", "sweep-additive-0", "sweep-additive-25", "sweep-additive-50",
                     "sweep-additive-100"]
    counts = {}
    for spec in expand_regimes(cfg):
        try:
            mix = build_mixture(_real(), _synthetic(), spec, 1)
        except RegimeError:
            counts[spec.name] = None
            continue
        counts[spec.name] = (mix.n_real, mix.n_synthetic)
    assert counts["sweep-constant-0"] == (32, 0)
    assert counts["sweep-constant-25"] == (24, 8)
    assert counts["sweep-constant-50"] == (16, 16)
    assert counts["sweep-constant-100"] == (0, 32)
    assert counts["sweep-additive-0"] == (32, 0)
    assert counts["sweep-additive-25"] == (32, 11)  # round(0.25 * 32 / 0.75) = round(10.67)
    assert counts["sweep-additive-100"] is None  # undefined: infinitely many synthetic images


def test_rounding_and_odd_class_sizes_use_largest_remainder():
    assert allocate(7, {"benign": 1, "malignant": 1}) == {"benign": 4, "malignant": 3}
    m = build_mixture(_real(9, 5), _synthetic(), parse_regime("hybrid", 0.5), 0)
    assert len(m.items) == 14 and m.n_synthetic == 7  # round(0.5 * 14)
    assert m.label_counts() == {"benign": 9, "malignant": 5}
    assert m.label_counts(SYNTHETIC) == {"benign": 5, "malignant": 2}  # 4.5 / 2.5: the tied remainder goes by label


def test_sampling_is_seeded_and_nested():
    real, syn = _real(), _synthetic()
    a = build_mixture(real, syn, parse_regime("hybrid"), 3)
    b = build_mixture(real.sample(frac=1, random_state=1), syn.sample(frac=1, random_state=2), parse_regime("hybrid"), 3)
    assert a.items == b.items and a.digest() == b.digest()  # independent of manifest row order
    c = build_mixture(real, syn, parse_regime("hybrid"), 4)
    assert a.digest() != c.digest()
    half = build_mixture(real, syn, parse_regime("sweep-constant-50"), 3)
    syn_of = lambda m: {p for p, _, s in m.items if s == SYNTHETIC}  # noqa: E731
    real_of = lambda m: {p for p, _, s in m.items if s == REAL}  # noqa: E731
    assert syn_of(half) < syn_of(a) and real_of(a) < real_of(half)


def test_short_of_synthetic_images():
    few = _synthetic(3, 10)
    m = build_mixture(_real(), few, parse_regime("hybrid", 0.75), 0)
    assert len(m.items) == 32  # constant: filled with real images of the short label
    assert m.label_counts(SYNTHETIC) == {"benign": 3, "malignant": 10}
    assert m.label_counts(REAL) == {"benign": 13, "malignant": 6}
    assert any("benign: 12 synthetic images asked for, 3 usable" in n for n in m.notes)
    add = build_mixture(_real(), few, parse_regime("hybrid-additive"), 0)
    assert (add.n_real, add.n_synthetic) == (32, 13)
    only = build_mixture(_real(), few, parse_regime("synthetic_only"), 0)
    assert (only.n_real, only.n_synthetic) == (0, 13)
    with pytest.raises(NoSyntheticImages):
        build_mixture(_real(), _synthetic(0, 0), parse_regime("hybrid"), 0)


def test_only_accepted_unmemorised_synthetic_rows_are_usable():
    df = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d", "e", None],
            "label": ["benign", "benign", "malignant", "malignant", "benign", "benign"],
            "status": ["accepted", "rejected", "accepted", "accepted", None, "accepted"],
            "memorised": [False, False, True, None, False, False],
        }
    )
    assert list(usable_synthetic(df)["path"]) == ["a", "d"]


def test_real_rows_prefer_processed_images():
    seeds = pd.DataFrame(
        {
            "status": ["accepted", "accepted", "quarantined", "accepted"],
            "split": ["train", "train", "train", "val"],
            "label": ["benign", "malignant", "benign", "benign"],
            "processed_path": ["/p/1.png", None, "/p/3.png", "/p/4.png"],
            "source_path": ["/s/1.jpg", "/s/2.jpg", "/s/3.jpg", "/s/4.jpg"],
            "lesion_id": ["L1", "L2", "L3", "L4"],
            "sample_id": ["h1", "h2", "h3", "h4"],
        }
    )
    rows = real_rows(seeds, "train")
    assert list(rows["path"]) == ["/p/1.png", "/s/2.jpg"]


def test_unknown_regime_names_are_rejected():
    for bad in ("hybird", "sweep-constant-150", "sweep-weird-50"):
        with pytest.raises(RegimeError, match="unknown regime"):
            parse_regime(bad)
