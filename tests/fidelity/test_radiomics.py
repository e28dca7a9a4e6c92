"""The Fréchet Radiomics Distance per CIELAB channel: each channel's features are pyradiomics' on that
channel (checked against scikit-image's CIELAB and plain statistics), FRDv1's filters are used, and
FRD is log of the Fréchet distance of reference-standardised features (checked with scipy's sqrtm)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from dermt2im.fidelity.radiomics import CHANNELS, frd, image_features, lab_channels, settings, standardise
from dermt2im.phantoms import render_phantom


def phantom(i: int, size: int = 48) -> np.ndarray:
    return render_phantom(("benign", "malignant")[i % 2], np.random.default_rng([11, i]), size=size)


def test_each_channel_is_read_by_pyradiomics_on_its_own():
    from skimage.color import rgb2lab

    rgb = phantom(0)
    names, values = image_features(rgb, 48, ["Original"])
    got = dict(zip(names, values))
    lab = rgb2lab(rgb)  # an independent CIELAB
    inside = np.ones(lab.shape[:2], bool)
    inside[0, 0] = False  # the one pixel the mask leaves out
    assert got["L:original_firstorder_Mean"] == pytest.approx(lab[..., 0][inside].mean(), abs=0.3)
    assert got["a:original_firstorder_Mean"] == pytest.approx(lab[..., 1][inside].mean() + 128, abs=0.3)
    assert got["b:original_firstorder_Median"] == pytest.approx(np.median(lab[..., 2][inside]) + 128, abs=0.5)
    assert got["L:original_firstorder_Maximum"] == pytest.approx(lab[..., 0][inside].max(), abs=0.3)
    per_channel = {c: sum(n.startswith(f"{c}:") for n in names) for c in CHANNELS}
    assert len(set(per_channel.values())) == 1 and per_channel["L"] > 50  # the same features for L*, a*, b*
    assert any(n.startswith("L:original_glcm_") for n in names) and any("_ngtdm_" in n for n in names)


def test_frd_v1_filters_add_laplacian_of_gaussian_and_wavelet_features():
    names, _ = image_features(phantom(1, 32), 32, ["Original", "LoG", "Wavelet"])
    assert any(n.startswith("L:log-sigma-2-0-mm") for n in names)
    assert any(n.startswith("b:wavelet-") for n in names)
    assert settings(["Original"])["setting"]["normalize"] is False  # calibrated colour: no per-image rescaling
    with pytest.raises(ValueError, match="unknown radiomics filter"):
        settings(["Gabor"])


def test_channels_are_resized_first():
    assert [c.shape for c in lab_channels(phantom(2, 64), 32)] == [(32, 32)] * 3


def test_frd_is_the_log_frechet_distance_of_reference_standardised_features():
    rng = np.random.default_rng(0)
    reference = rng.normal(5, 2, (40, 6))
    reference[:, 5] = 1.0  # constant on the reference: dropped
    x = rng.normal(6, 3, (30, 6))
    z = (x[:, :5] - reference[:, :5].mean(0)) / reference[:, :5].std(0)
    zr = (reference[:, :5] - reference[:, :5].mean(0)) / reference[:, :5].std(0)
    s1, s2 = np.cov(z, rowvar=False), np.cov(zr, rowvar=False)
    want = ((z.mean(0) - zr.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frd(x, reference)[0] == pytest.approx(np.log(want), rel=1e-6)
    assert standardise(x, reference)[0].shape == (30, 5)


def test_frd_separates_phantoms_from_noise():
    real = np.stack([image_features(phantom(i, 32), 32, ["Original"])[1] for i in range(16)])
    more = np.stack([image_features(phantom(i, 32), 32, ["Original"])[1] for i in range(100, 112)])
    rng = np.random.default_rng(0)
    noise = np.stack([image_features(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8), 32, ["Original"])[1]
                      for _ in range(12)])
    assert frd(more, real)[0] + 2 < frd(noise, real)[0]
