"""The SAM segmentation check: prompts at the lesion, mask statistics, tiny SAM, offline message."""

import math

import numpy as np
import pandas as pd
import pytest

from dermt2im.validate.segmentation import census_row, lesion_prompt, mask_stats, sam_agrees, segmentation_check
from tests.validate.validate_fixtures import make_validation_data, tiny_config


def _disc(size=64, r=10, cx=30, cy=34):
    yy, xx = np.mgrid[0:size, 0:size]
    return np.hypot(xx - cx, yy - cy) < r


def test_mask_statistics_of_a_disc_and_a_ragged_blob():
    disc = mask_stats(_disc(size=128, r=30, cx=64, cy=64))
    assert disc["area_fraction"] == pytest.approx(math.pi * 30**2 / 128**2, rel=0.03)
    assert disc["irregularity"] == pytest.approx(1.0, abs=0.12)
    yy, xx = np.mgrid[0:128, 0:128]
    angle = np.arctan2(yy - 64, xx - 64)
    star = np.hypot(xx - 64, yy - 64) < 30 * (1 + 0.4 * np.sin(7 * angle))
    assert mask_stats(star)["irregularity"] > 1.5 * disc["irregularity"]
    empty = mask_stats(np.zeros((8, 8), bool))
    assert empty["area_fraction"] == 0 and math.isnan(empty["irregularity"])


def test_prompt_finds_the_lesion_not_the_dark_vignette():
    rgb = np.full((64, 64, 3), 210, np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    rgb[np.hypot(xx - 32, yy - 32) > 36] = 5  # dermatoscope ring: darker than the lesion, at the border
    rgb[_disc()] = 90
    (px, py), (x0, y0, x1, y1), blob = lesion_prompt(rgb)
    assert abs(px - 30) <= 9 and abs(py - 34) <= 9
    assert x0 <= 21 and y0 <= 25 and x1 >= 39 and y1 >= 43 and x1 - x0 < 40
    assert blob[34, 30] and not blob[0, 0]


def test_tiny_sam_reports_real_and_synthetic_side_by_side(workdir):
    make_validation_data(workdir, n_train=3, n_val=1, n_test=1, n_synthetic=3, n_external=1)
    report = segmentation_check(workdir, tiny_config(segmentation_samples=2).validation)
    assert report.status == "ok", report.message
    table = pd.read_csv(report.paths["csv"])
    counts = table.groupby(["source", "label"]).size().to_dict()
    assert counts == {("real", "benign"): 2, ("real", "malignant"): 2,
                      ("synthetic", "benign"): 2, ("synthetic", "malignant"): 2}
    assert table["sam_area_fraction"].between(0, 1).all()
    assert (table.groupby("label")["otsu_area_fraction"].mean()["malignant"]
            > table.groupby("label")["otsu_area_fraction"].mean()["benign"])
    md = report.paths["md"].read_text()
    assert "| malignant | synthetic | 2 |" in md and "Tiny random SAM" in md
    # the lesion census covers every usable synthetic image and every real seed, not the SAM sample
    census = pd.read_csv(report.paths["lesions"])
    assert census.groupby(["source", "label"]).size().to_dict() == {
        ("real", "benign"): 5, ("real", "malignant"): 5, ("synthetic", "benign"): 3, ("synthetic", "malignant"): 3}
    assert census["one_plausible_lesion"].mean() >= 0.75  # phantoms: one lesion each
    assert "## One plausible lesion?" in md and "| synthetic | benign | 3 |" in md
    assert "synthetic images hold one plausible lesion" in report.message


def _skin(size=64):
    rgb = np.full((size, size, 3), 200, np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    rgb[np.hypot(xx - 31.5, yy - 31.5) > 36] = 5  # the dermatoscope's dark ring
    return rgb


def test_one_plausible_lesion_counts_dark_regions_clear_of_the_border():
    one = _skin()
    one[_disc(r=9)] = 80
    assert census_row(one)["one_plausible_lesion"] and census_row(one)["lesions"] == 1
    two = one.copy()
    two[_disc(r=6, cx=48, cy=14)] = 80
    assert census_row(two)["lesions"] == 2 and not census_row(two)["one_plausible_lesion"]
    assert census_row(_skin())["lesions"] == 0 and not census_row(_skin())["one_plausible_lesion"]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not census_row(noise)["one_plausible_lesion"]
    assert sam_agrees(_disc(r=9)) and not sam_agrees(_disc(r=9) | _disc(r=6, cx=50, cy=12))
    assert not sam_agrees(np.ones((64, 64), bool))  # the whole image is no lesion


def test_an_unavailable_sam_model_gives_a_message_not_a_crash(workdir):
    make_validation_data(workdir, n_train=1, n_val=1, n_test=1, n_synthetic=1, n_external=1)
    cfg = tiny_config(tiny=False, sam_model="/nonexistent/sam", segmentation_samples=1)
    report = segmentation_check(workdir, cfg.validation)
    assert report.status == "unavailable"
    assert "SAM model '/nonexistent/sam' is not available" in report.message
    assert "validate.segmentation_samples=0" in report.paths["md"].read_text()
