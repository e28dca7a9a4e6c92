"""FID, KID and PRDC, each against an independent computation: ``scipy.linalg.sqrtm`` and a closed
form for the Fréchet distance, the U-statistic written out pair by pair for KID, the ``prdc``
package's own ``compute_prdc``; and the bootstrap weights against explicitly repeated images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from dermt2im.fidelity.bootstrap import Estimate, one_sample, resample_weights, too_small, two_sample
from dermt2im.fidelity.distances import frechet_distance, kid, nearest_distances, polynomial_kernel, prdc


def sqrtm_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula (pytorch-fid's): scipy's matrix square root of the covariance product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_has_its_closed_form_in_one_dimension():
    # N(0, 2) vs N(2, 8) (unbiased variances of the two point sets): (0-2)^2 + 2 + 8 - 2 sqrt(16) = 6
    a, b = np.array([[-1.0], [1.0]]), np.array([[0.0], [4.0]])
    assert frechet_distance(a, b)[0] == pytest.approx(6.0)


@pytest.mark.parametrize("n_a,n_b,dims", [(60, 80, 5), (12, 9, 40)])  # fewer dimensions than images, and more
def test_frechet_distance_equals_scipy_sqrtm(n_a, n_b, dims):
    rng = np.random.default_rng(dims)
    a = rng.normal(0, 1, (n_a, dims))
    b = rng.normal(0.5, 1.5, (n_b, dims)) @ rng.normal(0, 1, (dims, dims)) / np.sqrt(dims)
    assert frechet_distance(a, b)[0] == pytest.approx(sqrtm_frechet(a, b), rel=1e-6, abs=1e-6)


def test_weights_count_an_image_as_often_as_it_is_drawn():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, (15, 4)), rng.normal(0.3, 1, (20, 4))
    wa, wb = resample_weights(15, 3, rng), resample_weights(20, 3, rng)
    for i in range(3):
        repeated_a, repeated_b = np.repeat(a, wa[i].astype(int), 0), np.repeat(b, wb[i].astype(int), 0)
        assert frechet_distance(a, b, wa[i:i + 1], wb[i:i + 1])[0] == pytest.approx(
            sqrtm_frechet(repeated_a, repeated_b), rel=1e-6)


def naive_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Bińkowski et al.'s unbiased MMD^2 estimator, written out pair by pair."""
    d = a.shape[1]
    k = lambda x, y: (x @ y / d + 1.0) ** 3  # noqa: E731
    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_estimator():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (14, 6)), rng.normal(0.4, 1, (11, 6))
    assert kid(a, b)[0] == pytest.approx(naive_kid(a, b), rel=1e-9)
    assert polynomial_kernel(a[:1], b[:1])[0, 0] == pytest.approx((a[0] @ b[0] / 6 + 1) ** 3)


def test_kid_under_weights_leaves_out_an_image_paired_with_itself():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (8, 3)), rng.normal(0, 1, (9, 3))
    wa, wb = resample_weights(8, 1, rng), resample_weights(9, 1, rng)
    # every pair of draws of two different images, each counted by how often both were drawn
    ia, ib = np.repeat(np.arange(8), wa[0].astype(int)), np.repeat(np.arange(9), wb[0].astype(int))
    k = lambda x, y: (x @ y / 3 + 1.0) ** 3  # noqa: E731
    xx = [k(a[i], a[j]) for p, i in enumerate(ia) for q, j in enumerate(ia) if p != q and i != j]
    yy = [k(b[i], b[j]) for p, i in enumerate(ib) for q, j in enumerate(ib) if p != q and i != j]
    xy = [k(a[i], b[j]) for i in ia for j in ib]
    assert kid(a, b, wa, wb)[0] == pytest.approx(np.mean(xx) + np.mean(yy) - 2 * np.mean(xy), rel=1e-9)


def test_kid_is_unbiased_where_fid_is_not():
    """Two samples of one distribution: KID averages about 0, FID stays well above 0 at small n."""
    rng = np.random.default_rng(2)
    kids, fids = [], []
    for _ in range(40):
        a, b = rng.normal(0, 1, (20, 8)), rng.normal(0, 1, (20, 8))
        kids.append(kid(a, b)[0])
        fids.append(frechet_distance(a, b)[0])
    assert abs(np.mean(kids)) < 2 * np.std(kids) / np.sqrt(len(kids))
    assert np.mean(fids) > 10 * np.std(fids) / np.sqrt(len(fids))
    shifted = kid(rng.normal(0, 1, (20, 8)), rng.normal(1, 1, (20, 8)))[0]
    assert shifted > np.mean(kids) + 3 * np.std(kids)


def test_prdc_equals_the_prdc_package(capsys):
    from prdc import compute_prdc

    rng = np.random.default_rng(4)
    real, fake = rng.normal(0, 1, (40, 5)), rng.normal(0.5, 1.2, (30, 5))
    want = compute_prdc(real, fake, nearest_k=5)
    got = prdc(real, fake)
    for name in ("precision", "recall", "density", "coverage"):
        assert got[name][0] == pytest.approx(want[name], abs=1e-12), name


def test_prdc_of_a_copy_is_perfect_and_of_a_distant_set_zero():
    rng = np.random.default_rng(5)
    real = rng.normal(0, 1, (30, 4))
    same = prdc(real, real + 1e-9)
    assert all(same[m][0] == pytest.approx(1.0) for m in ("precision", "recall", "coverage"))
    far = prdc(real, real + 100.0)
    assert all(far[m][0] == 0.0 for m in ("precision", "recall", "density", "coverage"))


def test_nearest_distances_can_leave_out_the_image_itself():
    x = np.array([[0.0], [1.0], [3.0]])
    assert nearest_distances(x, x).tolist() == [0.0, 0.0, 0.0]
    assert nearest_distances(x, x, exclude_self=True).tolist() == [1.0, 1.0, 2.0]


def test_nearest_distances_are_scipys_exact_distances_in_chunks(monkeypatch):
    """NumPy alone, as exact as SciPy's cdist (differences, not the dot-product expansion that loses a
    near-copy's small distance), whatever the chunking."""
    from scipy.spatial.distance import cdist

    import dermt2im.fidelity.distances as distances

    rng = np.random.default_rng(11)
    reference = rng.normal(0, 1, (40, 24)) * 1e3
    queries = np.concatenate([reference[:5] + 1e-6, rng.normal(0, 1, (17, 24)) * 1e3])
    expected = np.sort(cdist(queries, reference), axis=1)[:, :3].mean(axis=1)
    for chunk in (1, 24 * 40 * 4, 10**9):
        monkeypatch.setattr(distances, "_CHUNK_ELEMENTS", chunk)
        got = nearest_distances(queries, reference, 3)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        np.testing.assert_allclose(nearest_distances(queries[:5], reference, 1), np.full(5, 1e-6 * np.sqrt(24)),
                                   rtol=1e-6)


def test_bootstrap_estimates_carry_their_interval_sample_sizes_and_warnings():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0, 1, (80, 3)), rng.normal(0.2, 1, (60, 3))
    est = two_sample(lambda w, w_ref: kid(a, b, w, w_ref), 80, 60, name="kid", resamples=100)
    assert isinstance(est, Estimate) and (est.n, est.n_reference) == (80, 60) and est.warning == ""
    assert est.low < est.value < est.high
    assert est == two_sample(lambda w, w_ref: kid(a, b, w, w_ref), 80, 60, name="kid", resamples=100)  # fixed seed
    small = two_sample(lambda w, w_ref: kid(a[:12], b[:9], w, w_ref), 12, 9, name="kid", resamples=100)
    assert "only 9 images" in small.warning and small.high - small.low > est.high - est.low
    assert "covariance singular" in too_small("fid", 30, 100, dimensions=64)
    nothing = two_sample(lambda w, w_ref: kid(a[:1], b, w, w_ref), 1, 60, name="kid")
    assert np.isnan(nothing.value) and nothing.n == 1


def test_one_sample_statistics_leave_out_undefined_values():
    values = np.array([1.0, 2.0, np.nan, 3.0, 4.0] * 4)
    est = one_sample(values, np.median, name="ita", resamples=200)
    assert est.n == 16 and est.value == 2.5 and est.low <= 2.5 <= est.high
    assert "only 16" not in est.warning and one_sample(values[:5], np.median, name="ita").warning
