"""Hair removal that keeps the lesion: hairs go, dots, globules and pigment network stay, and neither
class is changed more than the other; the preprocess report states both figures per class."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest

from dermt2im.core.views import seeds_view
from dermt2im.core.manifest import SEEDS, read_manifest
from dermt2im.core.specs import PreprocessConfig
from dermt2im.phantoms import draw_hairs, make_phantoms, render_phantom
from dermt2im.preprocess.hair import candidate_mask, changed_fraction, hair_like, hair_mask, remove_hair
from dermt2im.preprocess.resize import preprocess_with_change

CFG = PreprocessConfig()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def skin_with_dots_and_network(size: int = 512) -> np.ndarray:
    """Skin with a brown blob carrying dark dots, globules and a pigment-network-like mesh."""
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), (205, 160, 140), np.float32)
    yy, xx = np.mgrid[:size, :size]
    img -= np.exp(-(((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 6) ** 2)))[..., None] * (90, 90, 80)
    mesh = np.zeros((size, size), np.uint8)
    for _ in range(400):  # short wavy network strands, cells of ~12 px
        x, y = rng.uniform(size * 0.3, size * 0.7, 2)
        a, d = rng.uniform(0, np.pi), rng.uniform(4, 9)
        cv2.line(mesh, (int(x), int(y)), (int(x + d * np.cos(a)), int(y + d * np.sin(a))), 1, 2, cv2.LINE_AA)
    for _ in range(40):  # dots and globules, radius 2-7 px
        x, y = rng.uniform(size * 0.25, size * 0.75, 2)
        cv2.circle(mesh, (int(x), int(y)), int(rng.integers(2, 8)), 1, -1, cv2.LINE_AA)
    img -= mesh[..., None].astype(np.float32) * 45
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def test_dots_globules_and_network_survive_but_a_hair_on_them_goes():
    img = skin_with_dots_and_network()
    restored, mask = remove_hair(img, CFG)
    assert not mask.any() and np.array_equal(restored, img)
    assert candidate_mask(img, CFG).mean() > 0.02  # the plain black-hat would have taken them
    with_hair = img.copy()
    cv2.line(with_hair, (20, 60), (480, 420), (30, 25, 20), 3, cv2.LINE_AA)
    drawn = np.abs(with_hair.astype(int) - img.astype(int)).max(axis=2) > 40
    restored, mask = remove_hair(with_hair, CFG)
    assert mask[drawn].mean() > 0.95 and mask.sum() < 3 * drawn.sum()
    assert psnr(restored, img) > psnr(with_hair, img) + 10


def test_shape_verification_keeps_long_thin_components_only():
    m = np.zeros((512, 512), np.uint8)
    cv2.line(m, (50, 100), (400, 160), 1, 3)  # a hair: long and thin
    cv2.circle(m, (250, 350), 12, 1, -1)  # a globule
    cv2.line(m, (300, 450), (330, 460), 1, 3)  # a streak-length segment
    cv2.line(m, (0, 250), (40, 260), 1, 2)  # a hair leaving the picture: long enough at an edge
    cv2.rectangle(m, (400, 300), (480, 330), 1, -1)  # a thick bar: long, not thin
    kept = hair_like(m > 0, CFG)
    assert kept[130, 225] and kept[254, 15]
    assert not kept[350, 250] and not kept[455, 315] and not kept[315, 440]


def drawn_hair_gains(label: str, size: int, n: int = 8) -> list[float]:
    """The project's protocol: 12 hairs drawn on phantoms of both camera styles."""
    gains = []
    for i in range(n):
        clean = render_phantom(label, np.random.default_rng(i), size=size, style=("isic", "ham")[i % 2])
        hairy = draw_hairs(clean, np.random.default_rng(100 + i), n=12)
        gains.append(psnr(remove_hair(hairy, CFG)[0], clean) - psnr(hairy, clean))
    return gains


@pytest.mark.parametrize(("size", "floor"), [(256, 10.0), (512, 15.0)])
@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_drawn_hair_is_removed_in_each_class(label, size, floor):
    """Measured medians (8 phantoms, bench/hair.py): 256 px 15.8 (benign) / 11.8 (malignant) dB,
    512 px 19.0 / 17.0 dB; the plain DullRazor it replaced: 17.1 / 9.8 and 20.1 / 14.5 dB."""
    gains = drawn_hair_gains(label, size)
    assert np.median(gains) >= floor and min(gains) > 6, gains


@pytest.mark.xfail(strict=True, reason="the issue's 20 dB is not reached: per-class medians 11.8-19.0 dB (bench/hair.py); "
                   "Telea given the exact drawn-hair mask gains only 19.7-25.3 dB, so the mask is not the whole gap")
@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_drawn_hair_psnr_gain_reaches_20_db(label):
    assert min(np.median(drawn_hair_gains(label, size)) for size in (256, 512)) >= 20


@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_hair_free_phantoms_are_barely_changed(label):
    for i in range(3):
        clean = render_phantom(label, np.random.default_rng(i), size=512)
        assert changed_fraction(clean, remove_hair(clean, CFG)[0]) < 0.002


@pytest.mark.realdata
def test_hair_free_real_images_change_at_most_1_percent_per_class(real_dermoscopy):
    """As preprocessing does it (short side 512, hair removed, centre crop): the median share of pixels
    moved by more than 10 grey levels, each class apart (measured 0.00 % benign, 0.10 % malignant;
    the plain DullRazor: 1.91 % and 3.16 %), while images with visible hair lose it."""
    rows = pd.read_csv(real_dermoscopy / "labels.csv", keep_default_na=False)
    for label in ("benign", "malignant"):
        mine = rows[rows["label"] == label]
        changed = {flag: [preprocess_with_change((real_dermoscopy / "images" / f).read_bytes(), CFG)[2]
                          for f in mine.loc[mine["hair_visible"] == flag, "file"]] for flag in ("", "yes")}
        assert len(changed[""]) >= 30 and np.median(changed[""]) <= 0.01, (label, sorted(changed[""])[-5:])
        assert np.median(changed["yes"]) > 0.02, label  # hairy images: hair was found and removed


def test_the_preprocess_report_states_both_figures_per_class(tmp_path):
    from dermt2im.ingest.stage import ingest_source
    from dermt2im.core.specs import IngestConfig
    from dermt2im.preprocess.stage import PreprocessStage
    from dermt2im.runners.sequential import run_stage

    make_phantoms(tmp_path / "src", 8, seed=0, size=96, hair_probability=0.5)
    manifest = tmp_path / "seeds.parquet"
    ingest_source(tmp_path / "src", manifest, IngestConfig())
    closing = run_stage(PreprocessStage(PreprocessConfig(size=64), {"seeds": manifest}, tmp_path / "processed",
                                        workers=1, reports=tmp_path / "reports")).closing
    figures = json.loads((tmp_path / "reports" / "preprocess-seeds.json").read_text())["classes"]
    df = seeds_view(manifest)
    for label in ("benign", "malignant"):
        f = figures[label]
        mine = df[(df["label"] == label) & (df["status"] == "accepted")]
        assert f["images"] == len(mine) and f["changed"]["median"] == pytest.approx(mine["hair_changed_fraction"].median())
        assert f["drawn_hair_gain_db"]["images"] == min(6, len(mine)) and f["drawn_hair_gain_db"]["median"] > 3
    md = (tmp_path / "reports" / "preprocess-seeds.md").read_text()
    assert "| seeds | benign |" in md and "| seeds | malignant |" in md
    assert "drawn-hair gain median" in closing["seeds"]["hair_text"]


def test_a_flat_image_comes_back_unchanged_as_a_copy():
    flat = np.full((64, 64, 3), 180, np.uint8)
    restored, mask = remove_hair(flat, CFG)
    assert mask.dtype == bool and not mask.any() and np.array_equal(restored, flat) and restored is not flat
    assert hair_mask(flat, CFG).shape == (64, 64)
