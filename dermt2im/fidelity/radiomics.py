"""The Fréchet Radiomics Distance (FRD), per CIELAB channel.

FRD (Osuala et al. 2024; Konz, Osuala et al. 2026, "FRDv1") is the Fréchet distance between Gaussians
fitted to standardised radiomics features of two image sets: the features medical imaging trusts
(first-order statistics and grey-level co-occurrence, run-length, size-zone and neighbourhood
tone-difference matrices) on the image and on Laplacian-of-Gaussian and wavelet filtered copies.
FRDv1's recipe is followed: its feature classes and filters (``FRD_V1_FEATURES``, ``FRD_V1_FILTERS``),
bin width 5, features z-scored with the *reference* set's statistics (features constant on the
reference are dropped), and ``FRD = log(d_F^2)`` (the ``frd-score`` package's default convention).

Radiomics libraries read one grey channel; dermoscopy's diagnostic content is largely colour. Each
image is therefore converted to CIELAB (``skin_tone.to_lab``) and the features are computed on L*,
a* and b* separately and concatenated (a* and b* shifted by +128 so that every channel is positive).
Two settings differ from FRDv1, which was made for MRI and CT: pyradiomics' per-image intensity
normalisation is off (CIELAB values are calibrated, and a colour cast is what fidelity must see), and
images are resized to ``frd_size`` px instead of resampled to 2 mm voxels (photographs have no
physical pixel size). The features come from pyradiomics as maintained in ``pyradiomics-bhklab``
(``pyradiomics`` 3.1.0 cannot be installed on Python 3.11 from the registry: its sdist declares the
version 3.0.1a1 and pip discards it, and there are no 3.11 wheels); the ``frd-score`` package itself is
not a dependency because it requires ``opencv-contrib-python-headless``, which would overwrite the
``cv2`` of ``opencv-python-headless`` that the gate uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from dermt2im.fidelity.distances import frechet_distance
from dermt2im.fidelity.skin_tone import to_lab

CHANNELS = ("L", "a", "b")
# FRDv1's 2D extraction (frd_score/configs/extraction_2d.yaml)
FRD_V1_FILTERS: dict[str, dict] = {"Original": {}, "LoG": {"sigma": [2.0, 3.0, 4.0, 5.0]}, "Wavelet": {}}
_GLCM = ["Autocorrelation", "JointAverage", "ClusterProminence", "ClusterShade", "ClusterTendency", "Contrast",
         "Correlation", "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance", "JointEnergy", "JointEntropy",
         "Imc1", "Imc2", "Idm", "Idmn", "Id", "Idn", "InverseVariance", "MaximumProbability", "SumEntropy",
         "SumSquares"]
FRD_V1_FEATURES: dict[str, list[str]] = {"firstorder": [], "glcm": _GLCM, "glrlm": [], "glszm": [], "ngtdm": []}
BIN_WIDTH = 5
VOXEL_ARRAY_SHIFT = 300


def settings(filters: Sequence[str]) -> dict:
    """The pyradiomics parameters: FRDv1's, with the two changes the module docstring gives."""
    unknown = [f for f in filters if f not in FRD_V1_FILTERS]
    if unknown:
        raise ValueError(f"unknown radiomics filter(s) {unknown}; known: {sorted(FRD_V1_FILTERS)}")
    return {"setting": {"binWidth": BIN_WIDTH, "normalize": False, "voxelArrayShift": VOXEL_ARRAY_SHIFT, "label": 1},
            "imageType": {f: FRD_V1_FILTERS[f] for f in filters},
            "featureClass": FRD_V1_FEATURES}


_EXTRACTORS: dict[tuple[str, ...], object] = {}


def _extractor(filters: Sequence[str]):
    import radiomics
    from radiomics import featureextractor

    key = tuple(filters)
    if key not in _EXTRACTORS:
        radiomics.setVerbosity(logging.ERROR)
        logging.getLogger("radiomics").setLevel(logging.ERROR)
        _EXTRACTORS[key] = featureextractor.RadiomicsFeatureExtractor(settings(filters))
    return _EXTRACTORS[key]


def channel_features(channel: np.ndarray, filters: Sequence[str]) -> dict[str, float]:
    """pyradiomics features of one grey channel (2D float), over the whole image."""
    import SimpleITK as sitk

    # a 2D image: pyradiomics' LoG filter refuses a (1, H, W) volume as "too small"
    image = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
    mask = np.ones(channel.shape, np.uint8)
    mask[0, 0] = 0  # a mask of every pixel trips pyradiomics (AIM-Harvard/pyradiomics#765); frd-score does the same
    sitk_mask = sitk.GetImageFromArray(mask)
    sitk_mask.CopyInformation(image)
    out = _extractor(filters).execute(image, sitk_mask)
    return {k: float(v) for k, v in out.items() if not k.startswith("diagnostics")}


def lab_channels(rgb: np.ndarray, size: int) -> list[np.ndarray]:
    """L*, a* + 128 and b* + 128 of the image resized to ``size`` x ``size``."""
    h, w = rgb.shape[:2]
    interpolation = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    small = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (size, size), interpolation=interpolation)
    lab = to_lab(small)
    return [lab[..., 0], lab[..., 1] + 128.0, lab[..., 2] + 128.0]


def image_features(rgb: np.ndarray, size: int, filters: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Feature names (``L:original_firstorder_Mean``, ...) and values of one RGB image."""
    names, values = [], []
    for channel, pixels in zip(CHANNELS, lab_channels(rgb, size)):
        for k, v in channel_features(pixels, filters).items():
            names.append(f"{channel}:{k}")
            values.append(v)
    return names, np.asarray(values, np.float64)


def standardise(features: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets z-scored with the reference's mean and standard deviation; columns constant (or not
    finite) on the reference are dropped. Returns (features, reference) standardised."""
    ref = np.asarray(reference, np.float64)
    x = np.asarray(features, np.float64)
    mean, std = ref.mean(0), ref.std(0)
    keep = np.isfinite(mean) & np.isfinite(std) & (std > 1e-12) & np.isfinite(x).all(0)
    return (x[:, keep] - mean[keep]) / std[keep], (ref[:, keep] - mean[keep]) / std[keep]


def frd(features: np.ndarray, reference: np.ndarray, w: np.ndarray | None = None,
        w_reference: np.ndarray | None = None) -> np.ndarray:
    """``log(d_F^2)`` between standardised radiomics features of a set and of the reference."""
    x, ref = standardise(features, reference)
    d2 = frechet_distance(x, ref, w, w_reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.where(d2 > 0, d2, np.nan))
