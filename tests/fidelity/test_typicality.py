"""Typicality calibrated on held-out real images, and the nearest-seed distances of the audit."""

from __future__ import annotations

import numpy as np
import pytest

from dermt2im.fidelity.memorisation import copy_cut, nearest_seed_distances, seed_reference
from dermt2im.fidelity.typicality import calibrate
from dermt2im.phantoms import render_phantom
from dermt2im.quality.audit import audit_image, build_index


def test_typicality_is_the_share_of_held_out_real_images_at_least_as_far():
    rng = np.random.default_rng(0)
    seeds, held = rng.normal(0, 1, (60, 4)), rng.normal(0, 1, (20, 4))
    cal = calibrate(seeds, held, k=3, quantile=0.9)
    d = cal.distances(np.vstack([held, rng.normal(8, 1, (5, 4))]))
    typ = cal.typicality(d)
    assert typ[:20].min() >= 1 / 20 and sorted(typ[:20]) == pytest.approx(np.arange(1, 21) / 20)  # uniform
    assert (typ[20:] == 0).all() and cal.atypical(d)[20:].all()  # far away: beyond every real image
    assert cal.atypical(d)[:20].sum() == 2  # the cut is the 0.9 quantile of the held-out distances
    assert 0 < cal.held_out_rejections() <= 4  # judged by the others' cut, about 10 % again


def test_without_held_out_images_nothing_is_calibrated():
    cal = calibrate(np.zeros((5, 2)), np.zeros((0, 2)))
    assert np.isnan(cal.cut) and np.isnan(cal.typicality(np.array([1.0]))).all() and cal.held_out_rejections() == 0


def test_nearest_seed_distances_are_the_audits():
    seeds = [render_phantom("benign", np.random.default_rng(i), size=64) for i in range(6)]
    queries = [render_phantom("malignant", np.random.default_rng(50 + i), size=64) for i in range(3)] + [seeds[2][:, ::-1]]
    got = nearest_seed_distances(seed_reference(seeds), queries)
    index = build_index([(str(i), s) for i, s in enumerate(seeds)])
    want = [audit_image(q, index).distance for q in queries[:3]]
    assert got[:3] == pytest.approx(want, abs=1e-5)
    assert got[3] == pytest.approx(0.0, abs=1e-3)  # a mirrored seed is at distance 0, as in the audit
    assert np.isnan(nearest_seed_distances(seed_reference([]), queries)).all()
    assert copy_cut(np.arange(101.0)) == pytest.approx(5.0)
