"""Phantoms: deterministic, labelled, dermoscopy-like, with a class signal and a style shift."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from dermt2im.core.imaging import decode_image
from dermt2im.phantoms import STYLES, draw_hairs, make_phantoms, render_phantom

SIZE = 64


def _render(label: str, i: int, style: str = "isic", size: int = SIZE, hair: bool = False) -> np.ndarray:
    return render_phantom(label, np.random.default_rng(i), size=size, style=style, hair=hair)


def _field_mask(size: int, radius: float = 0.8) -> np.ndarray:
    c = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(c, c)
    return np.hypot(x, y) < radius


def _lesion_stats(img: np.ndarray) -> tuple[float, float]:
    """(lesion area as a fraction of the lit field, mean per-channel colour std inside the lesion)."""
    grey = img.astype(float).mean(axis=2)
    field = _field_mask(img.shape[0])
    ring = field & ~_field_mask(img.shape[0], 0.7)
    lesion = field & (grey < 0.75 * np.median(grey[ring]))
    return lesion.sum() / field.sum(), float(img[lesion].astype(float).std(axis=0).mean())


def test_render_is_deterministic_rgb_uint8():
    a = _render("malignant", 3, hair=True)
    b = _render("malignant", 3, hair=True)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _render("malignant", 4, hair=True))


def test_render_rejects_unknown_label_style_and_tiny_size():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label"):
        render_phantom("melanoma", rng)
    with pytest.raises(ValueError, match="style"):
        render_phantom("benign", rng, style="derm7pt")
    with pytest.raises(ValueError, match="size"):
        render_phantom("benign", rng, size=8)


def test_dermoscopy_look_skin_lesion_and_dark_vignette():
    img = _render("benign", 0, size=128).astype(float)
    corner = img[:6, :6].mean()
    centre = img[60:68, 60:68].mean(axis=(0, 1))
    skin = img[_field_mask(128) & ~_field_mask(128, 0.7)].mean(axis=0)
    assert corner < 20  # outside the dermatoscope's lit circle
    assert skin[0] > skin[1] > skin[2] and skin.mean() > 100  # skin tone: red > green > blue
    assert centre.mean() < 0.7 * skin.mean() and centre[0] > centre[2]  # brown pigmented lesion


def test_styles_differ_in_colour_and_lighting():
    means = {
        style: np.mean([_render(label, i, style).reshape(-1, 3).mean(axis=0) for i in range(6) for label in ("benign", "malignant")], axis=0)
        for style in STYLES
    }
    isic, ham = means["isic"], means["ham"]
    assert isic.mean() - ham.mean() > 30  # brightness / vignette
    assert isic[2] / isic[0] - ham[2] / ham[0] > 0.08  # white balance: ham is yellower


def test_classes_differ_in_lesion_size_and_colour_variety():
    stats = {label: np.array([_lesion_stats(_render(label, i)) for i in range(10)]) for label in ("benign", "malignant")}
    benign, malignant = stats["benign"].mean(axis=0), stats["malignant"].mean(axis=0)
    assert malignant[0] > 1.8 * benign[0]  # larger
    assert malignant[1] > 1.4 * benign[1]  # several colours rather than one or two even tones


def test_classes_learnable_by_a_small_classifier_but_not_by_one_pixel():
    def dataset(offset: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(60) % 2
        imgs = np.array([_render(("benign", "malignant")[y], offset + i, size=48, hair=i % 3 == 0) for i, y in enumerate(labels)])
        return imgs.astype(float) / 255, labels

    (x_train, y_train), (x_test, y_test) = dataset(0), dataset(1000)
    # nearest class centroid on 8 x 8 thumbnails
    thumbs = lambda xs: np.array([cv2.resize(x, (8, 8), interpolation=cv2.INTER_AREA).ravel() for x in xs])  # noqa: E731
    f_train, f_test = thumbs(x_train), thumbs(x_test)
    c0, c1 = f_train[y_train == 0].mean(axis=0), f_train[y_train == 1].mean(axis=0)
    predicted = np.linalg.norm(f_test - c1, axis=1) < np.linalg.norm(f_test - c0, axis=1)
    assert (predicted == y_test).mean() >= 0.7
    # the best single pixel / channel with the best threshold, chosen on train, scored on test
    p_train, p_test = x_train.reshape(60, -1), x_test.reshape(60, -1)
    best = (0.0, 0, 0.0, True)
    for j in range(p_train.shape[1]):
        order = np.argsort(p_train[:, j])
        ones_below = np.cumsum(y_train[order])
        k = np.arange(1, 61)
        acc_low0 = ((k - ones_below) + (ones_below[-1] - ones_below)) / 60
        i = int(np.argmax(np.maximum(acc_low0, 1 - acc_low0)))
        score = max(acc_low0[i], 1 - acc_low0[i])
        if score > best[0]:
            best = (score, j, p_train[order[i], j], acc_low0[i] >= 0.5)
    _, j, threshold, low_is_benign = best
    above = p_test[:, j] > threshold
    single_pixel_acc = ((above if low_is_benign else ~above) == y_test.astype(bool)).mean()
    assert single_pixel_acc < 0.95


def test_draw_hairs_adds_thin_dark_strands_and_leaves_input_alone():
    clean = _render("benign", 1, size=128)
    before = clean.copy()
    hairy = draw_hairs(clean, np.random.default_rng(0), n=8)
    assert np.array_equal(clean, before)
    changed = np.abs(hairy.astype(int) - clean.astype(int)).sum(axis=2) > 30
    assert 0.01 < changed.mean() < 0.25
    assert hairy[changed].mean() < clean[changed].mean() - 40
    assert np.array_equal(draw_hairs(clean, np.random.default_rng(0), n=0), clean)


def test_hair_option_draws_hair():
    plain, hairy = _render("benign", 5, size=128), _render("benign", 5, size=128, hair=True)
    darker = plain.astype(int).sum(axis=2) - hairy.astype(int).sum(axis=2) > 90
    assert darker.mean() > 0.005


def _read_labels(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_make_phantoms_writes_class_folders_and_labels_csv(tmp_path):
    labels_csv = make_phantoms(tmp_path / "a", 7, seed=3, style="ham", size=48, hair_probability=0.5)
    assert labels_csv == tmp_path / "a" / "labels.csv"
    with open(labels_csv, newline="") as f:
        assert next(csv.reader(f)) == ["file", "label", "diagnosis", "lesion_id"]
    rows = _read_labels(labels_csv)
    assert len(rows) == 7
    assert sum(r["label"] == "benign" for r in rows) == 4 and sum(r["label"] == "malignant" for r in rows) == 3
    assert len({r["lesion_id"] for r in rows}) == 7
    assert rows[1]["lesion_id"] == "PH-ham-s3-0001"
    for r in rows:
        assert r["file"].split("/")[0] == r["label"]
        assert r["diagnosis"] == {"benign": "nevus", "malignant": "melanoma"}[r["label"]]
        img = decode_image((tmp_path / "a" / r["file"]).read_bytes())
        assert (img.width, img.height) == (48, 48)
    assert sorted(p.name for p in (tmp_path / "a").rglob("*") if p.is_file() and p.name.startswith(".")) == []


def test_make_phantoms_is_deterministic_and_seeded(tmp_path):
    def snapshot(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.*"))}

    make_phantoms(tmp_path / "a", 6, seed=1, size=40)
    make_phantoms(tmp_path / "b", 6, seed=1, size=40)
    make_phantoms(tmp_path / "c", 6, seed=2, size=40)
    make_phantoms(tmp_path / "d", 8, seed=1, size=40)
    a, b, c, d = (snapshot(tmp_path / x) for x in "abcd")
    assert a == b
    assert a["labels.csv"] != c["labels.csv"]
    assert a["benign/PH-isic-s1-0000.png"] != c["benign/PH-isic-s2-0000.png"]
    # growing n appends images without changing the existing ones
    assert all(d[k] == v for k, v in a.items() if k != "labels.csv")


def test_make_phantoms_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_phantoms(tmp_path, 0)
    with pytest.raises(ValueError):
        make_phantoms(tmp_path, 2, style="nope")
    with pytest.raises(ValueError):
        make_phantoms(tmp_path, 2, hair_probability=1.5)
