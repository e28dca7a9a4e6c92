"""Preprocessing: DullRazor hair removal, resize / crop, and the cached, parallel manifest stage."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermt2im.core.views import seeds_view
from dermt2im.core.fileio import sha256_file
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import SEEDS, processed_location, read_manifest, write_manifest
from dermt2im.core.specs import PreprocessConfig
from dermt2im.phantoms import draw_hairs, make_phantoms, render_phantom
from dermt2im.preprocess import pool as pp
from dermt2im.preprocess.hair import remove_hair, scaled
from dermt2im.preprocess.resize import (
    decode_at_least,
    preprocess_image,
    resize_center_crop,
)
from dermt2im.preprocess.stage import (
    PreprocessReport,
    preprocess_key,
    preprocess_manifest,
)

FILLED = ["processed_path", "preprocess_key", "hair_fraction", "hair_changed_fraction"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --------------------------------------------------------------------------- hair removal


@pytest.mark.parametrize("style", ["isic", "ham"])
def test_hair_removal_restores_a_hairy_phantom(style):
    cfg = PreprocessConfig()
    for i in range(2):
        clean = render_phantom("benign", np.random.default_rng(i), size=256, style=style)
        hairy = draw_hairs(clean, np.random.default_rng(100 + i), n=12)
        restored, mask = remove_hair(hairy, cfg)
        assert restored.shape == clean.shape and restored.dtype == np.uint8
        assert mask.shape == clean.shape[:2] and mask.dtype == bool
        assert psnr(restored, clean) > psnr(hairy, clean) + 6  # measured: +9 to +20 dB
        drawn = np.abs(hairy.astype(int) - clean.astype(int)).sum(axis=2) > 100
        assert mask[drawn].mean() > 0.85  # the mask finds the hairs (measured 0.9-1.0) ...
        assert mask.mean() < 3 * drawn.mean()  # ... and not much else


@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_hair_free_image_is_barely_changed(label):
    cfg = PreprocessConfig()
    for i in range(3):
        clean = render_phantom(label, np.random.default_rng(i), size=256, style="isic")
        restored, mask = remove_hair(clean, cfg)
        assert psnr(restored, clean) > (40 if label == "benign" else 32)
        assert mask.mean() < (0.015 if label == "benign" else 0.05)


def test_kernel_is_scaled_with_the_working_resolution():
    def kernel(side: int) -> int:
        return scaled(PreprocessConfig(hair_kernel_size=17).hair_kernel_size, side, odd=True, minimum=3)

    assert kernel(512) == 17
    assert kernel(1024) == 35  # 34, made odd
    assert kernel(256) == 9
    assert kernel(32) == 3  # never below 3


def test_inpaint_methods_both_work_and_no_hair_means_a_copy():
    clean = render_phantom("benign", np.random.default_rng(0), size=128)
    hairy = draw_hairs(clean, np.random.default_rng(1), n=6)
    for method in ("telea", "ns"):
        restored, _ = remove_hair(hairy, PreprocessConfig(inpaint_method=method))
        assert psnr(restored, clean) > psnr(hairy, clean) + 5
    flat = np.full((64, 64, 3), 180, np.uint8)
    restored, mask = remove_hair(flat, PreprocessConfig())
    assert not mask.any() and np.array_equal(restored, flat) and restored is not flat


# --------------------------------------------------------------------------- resize / crop / decode


@pytest.mark.parametrize(("h", "w"), [(300, 200), (200, 300), (97, 97), (40, 70), (1000, 31)])
def test_resize_center_crop_shapes(h, w):
    out = resize_center_crop(np.zeros((h, w, 3), np.uint8), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_center_crop_keeps_the_middle():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the middle third of a landscape image
    out = resize_center_crop(img, 50)
    assert out.min() >= 250
    portrait = np.zeros((300, 100, 3), np.uint8)
    portrait[100:200] = 255
    assert resize_center_crop(portrait, 50).min() >= 250


def _jpeg(rgb: np.ndarray, orientation: int | None = None) -> bytes:
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_reduced_jpeg_decode_keeps_the_working_size_and_applies_exif_rotation():
    rgb = np.zeros((160, 320, 3), np.uint8)
    rgb[:, :160] = (200, 40, 40)  # left half red
    fast = decode_at_least(_jpeg(rgb), 32)
    assert min(fast.shape[:2]) >= 32 and fast.shape[1] > fast.shape[0] and fast.shape[0] < 160  # downscaled
    rotated = decode_at_least(_jpeg(rgb, orientation=6), 32)  # 6: rotate 90 degrees clockwise to view
    assert rotated.shape[0] > rotated.shape[1] and min(rotated.shape[:2]) >= 32
    assert rotated[2, rotated.shape[1] // 2, 0] > 150  # the red half is now on top
    out, _ = preprocess_image(_jpeg(rgb, orientation=6), PreprocessConfig(size=32))
    assert out.shape == (32, 32, 3)


def test_preprocess_image_without_hair_removal_is_resize_and_crop():
    rgb = draw_hairs(render_phantom("benign", np.random.default_rng(0), size=96), np.random.default_rng(1))
    data = encode_png(rgb)
    out, fraction = preprocess_image(data, PreprocessConfig(size=48, hair_removal=False))
    assert fraction == 0.0 and np.array_equal(out, resize_center_crop(rgb, 48))
    out, fraction = preprocess_image(data, PreprocessConfig(size=48))
    assert out.shape == (48, 48, 3) and fraction > 0.01


def test_preprocess_image_raises_decode_error_for_garbage():
    from dermt2im.core.imaging import DecodeError

    with pytest.raises(DecodeError, match="not an image"):
        preprocess_image(b"hello, this is text", PreprocessConfig())
    with pytest.raises(DecodeError, match="truncated"):
        preprocess_image(_jpeg(np.zeros((200, 200, 3), np.uint8))[:400], PreprocessConfig(size=32))


# --------------------------------------------------------------------------- keys


def test_preprocess_key_covers_content_and_output_parameters_only():
    cfg = PreprocessConfig()
    k = preprocess_key("a" * 64, cfg)
    assert k == preprocess_key("a" * 64, PreprocessConfig())
    assert k != preprocess_key("b" * 64, cfg)
    for change in ({"size": 256}, {"hair_threshold": 20}, {"hair_kernel_size": 9}, {"inpaint_radius": 2},
                   {"inpaint_method": "ns"}, {"hair_removal": False}):
        assert k != preprocess_key("a" * 64, PreprocessConfig(**change)), change
    off = PreprocessConfig(hair_removal=False)
    assert preprocess_key("a" * 64, off) == preprocess_key("a" * 64, PreprocessConfig(hair_removal=False, hair_threshold=30))


# --------------------------------------------------------------------------- the manifest stage


def _seed_manifest(folder: Path, manifest: Path, extra: list[dict] | None = None) -> pd.DataFrame:
    """A seeds manifest as ingest would write it: one accepted row per image, plus ``extra`` rows."""
    rows = []
    for p in sorted(folder.rglob("*.png")):
        rows.append({"sample_id": sha256_file(p), "source_path": str(p), "source_root": str(folder),
                     "dataset": "folders", "label": p.parent.name, "diagnosis": None, "lesion_id": p.stem,
                     "width": 64, "height": 64, "mode": "RGB", "exif_rotated": False, "status": "accepted",
                     "reason": None, "duplicate_of": None, "split": "train"})
    rows += extra or []
    write_manifest(pd.DataFrame(rows), manifest, SEEDS)
    return seeds_view(manifest)


@pytest.fixture
def seeds(tmp_path):
    folder = tmp_path / "phantoms"
    make_phantoms(folder, 6, seed=0, size=64, hair_probability=0.5)
    quarantined = {"sample_id": None, "source_path": str(tmp_path / "gone.jpg"), "status": "quarantined",
                   "reason": "missing file", "width": None, "exif_rotated": None}
    manifest = tmp_path / "seeds.parquet"
    _seed_manifest(folder, manifest, [quarantined])
    return manifest


def _mtimes(paths) -> dict[str, int]:
    return {p: os.stat(p).st_mtime_ns for p in paths}


def test_preprocess_manifest_fills_columns_with_every_core(seeds, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "POOL_MIN_PIXELS", 0)  # a pool even for these few tiny images
    started = []
    real_pool = pp.ProcessPoolExecutor
    monkeypatch.setattr(pp, "ProcessPoolExecutor", lambda n, **kw: started.append(n) or real_pool(n, **kw))
    before = seeds_view(seeds)
    out = tmp_path / "processed"
    cfg = PreprocessConfig(size=32)
    report = preprocess_manifest(seeds, out, cfg, workers=2)
    assert isinstance(report, PreprocessReport)
    assert (report.processed, report.cached, report.failed) == (6, 0, 0)
    assert started == [2]
    assert "6 processed" in report.summary()
    after = seeds_view(seeds)
    pd.testing.assert_frame_equal(after.drop(columns=FILLED), before.drop(columns=FILLED))
    done = after[after["status"] == "accepted"]
    for _, row in done.iterrows():
        path = Path(row["processed_path"])
        assert path.is_file() and path.parent.parent == out.resolve() and path.parent.name == row["sample_id"][:2]
        assert row["preprocess_key"] == preprocess_key(row["sample_id"], cfg)
        assert 0.0 <= row["hair_fraction"] < 0.5
        assert np.asarray(Image.open(path)).shape == (32, 32, 3)
    q = after[after["status"] == "quarantined"].iloc[0]
    assert q["processed_path"] is None or pd.isna(q["processed_path"])


def test_second_run_does_no_work_and_a_changed_parameter_reprocesses(seeds, tmp_path, monkeypatch):
    out = tmp_path / "processed"
    cfg = PreprocessConfig(size=32)
    preprocess_manifest(seeds, out, cfg)
    first = seeds_view(seeds)
    files = list(first["processed_path"].dropna())
    stamps = _mtimes([*files, str(seeds)])

    def no_pool(*a, **k):
        raise AssertionError("a process pool was started for zero work")

    monkeypatch.setattr(pp, "ProcessPoolExecutor", no_pool)
    monkeypatch.setattr(pp, "_process_job", lambda *a, **k: pytest.fail("an image was processed again"))
    again = preprocess_manifest(seeds, out, PreprocessConfig(size=32), workers=2)  # workers do not matter
    assert (again.processed, again.cached, again.failed) == (0, 6, 0)
    assert _mtimes([*files, str(seeds)]) == stamps  # neither the images nor the manifest were rewritten
    monkeypatch.undo()

    changed = preprocess_manifest(seeds, out, PreprocessConfig(size=32, hair_threshold=30), workers=1)
    assert (changed.processed, changed.cached) == (6, 0)
    second = seeds_view(seeds)
    accepted = second["status"] == "accepted"
    assert not set(second.loc[accepted, "processed_path"]) & set(files)
    assert (second.loc[accepted, "preprocess_key"] != first.loc[accepted, "preprocess_key"]).all()


def test_finished_files_are_adopted_after_a_lost_record(seeds, tmp_path, monkeypatch):
    out = tmp_path / "processed"
    cfg = PreprocessConfig(size=32)
    preprocess_manifest(seeds, out, cfg)
    done = seeds_view(seeds)
    processed_location(seeds).unlink()  # as if the run was killed before it recorded what it made
    monkeypatch.setattr(pp, "_process_job", lambda *a, **k: pytest.fail("an image was processed again"))
    report = preprocess_manifest(seeds, out, cfg)
    assert (report.processed, report.cached) == (0, 6)
    pd.testing.assert_frame_equal(seeds_view(seeds), done)


def test_a_missing_processed_file_is_made_again(seeds, tmp_path):
    out = tmp_path / "processed"
    cfg = PreprocessConfig(size=32)
    preprocess_manifest(seeds, out, cfg)
    victim = Path(seeds_view(seeds)["processed_path"].dropna().iloc[0])
    victim.unlink()
    report = preprocess_manifest(seeds, out, cfg)
    assert (report.processed, report.cached) == (1, 5) and victim.is_file()


def test_bad_accepted_files_are_quarantined_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "POOL_MIN_PIXELS", 0)  # failures must come back from worker processes too
    folder, spare = tmp_path / "phantoms", tmp_path / "spare"
    make_phantoms(folder, 4, size=64)
    make_phantoms(spare, 3, seed=9, size=64)
    good, others = sorted(folder.rglob("*.png")), sorted(spare.rglob("*.png"))
    names = ("trunc.png", "text.jpg", "short.jpg", "missing.png", "changed.png")
    truncated, text, short_jpeg, missing, changed = (tmp_path / n for n in names)
    truncated.write_bytes(good[0].read_bytes()[:300])
    text.write_bytes(b"just some text, not a picture\n")
    short_jpeg.write_bytes(_jpeg(np.zeros((200, 200, 3), np.uint8))[:400])  # cut inside its EXIF header
    missing.write_bytes(others[0].read_bytes())
    changed.write_bytes(others[1].read_bytes())

    def row(p: Path) -> dict:
        return {"sample_id": sha256_file(p), "source_path": str(p), "status": "accepted", "label": "benign"}

    extra = [row(tmp_path / n) for n in names]
    missing.unlink()
    changed.write_bytes(others[2].read_bytes())  # the file changed after ingest hashed it
    manifest = tmp_path / "seeds.parquet"
    _seed_manifest(folder, manifest, extra)
    report = preprocess_manifest(manifest, tmp_path / "out", PreprocessConfig(size=32), workers=2)
    assert (report.processed, report.failed) == (4, 5)
    df = seeds_view(manifest).set_index("source_path")
    reasons = {name: df.loc[str(tmp_path / name), "reason"] for name in names}
    assert all(df.loc[str(tmp_path / name), "status"] == "quarantined" for name in names)
    assert all(pd.isna(df.loc[str(tmp_path / name), "processed_path"]) for name in names)
    assert "truncated" in reasons["trunc.png"]
    assert "not an image" in reasons["text.jpg"]
    assert "truncated or corrupt" in reasons["short.jpg"]
    assert "cannot read source file" in reasons["missing.png"]
    assert "changed since ingest" in reasons["changed.png"]
    assert all(r.startswith(("preprocess: ", "preprocess (transient): ")) for r in reasons.values())
    assert reasons["missing.png"].startswith("preprocess (transient): ")  # it may be back: tried again later
    assert (df.loc[[str(p) for p in good], "status"] == "accepted").all()


def test_duplicates_sharing_a_sample_id_are_processed_once(tmp_path, monkeypatch):
    folder = tmp_path / "phantoms"
    make_phantoms(folder, 2, size=64)
    original = sorted(folder.rglob("*.png"))[0]
    copy = tmp_path / "copy.png"
    copy.write_bytes(original.read_bytes())
    manifest = tmp_path / "seeds.parquet"
    _seed_manifest(folder, manifest, [{"sample_id": sha256_file(copy), "source_path": str(copy),
                                       "status": "accepted", "label": "benign"}])
    calls = []
    real = pp._process_job
    monkeypatch.setattr(pp, "_process_job", lambda job, *a: calls.append(job.sample_id) or real(job, *a))
    original.unlink()  # one copy is enough: it is the same content
    report = preprocess_manifest(manifest, tmp_path / "out", PreprocessConfig(size=32), workers=1)
    assert (report.processed, report.failed) == (3, 0) and len(calls) == 2
    df = seeds_view(manifest).set_index("source_path")
    assert df.loc[str(copy), "processed_path"] == df.loc[str(original), "processed_path"]


def test_worker_count():
    big, small = PreprocessConfig(size=512), PreprocessConfig(size=64)
    assert pp.worker_count(big, 0, 0) == 0
    assert pp.worker_count(big, 1000, 0) == pp.available_cores()
    assert pp.worker_count(PreprocessConfig(), 1000, 3) == 3
    assert pp.worker_count(PreprocessConfig(), 2, 8) == 1  # two 512 px images: not worth a pool
    assert pp.worker_count(small, 24, 0) == 1  # the smoke preset's seeds
    assert pp.worker_count(PreprocessConfig(), 5, 8) == 5


def test_empty_manifest_is_no_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("pool started"))
    report = preprocess_manifest(tmp_path / "none.parquet", tmp_path / "out", PreprocessConfig())
    assert (report.processed, report.cached, report.failed) == (0, 0, 0)
    assert not (tmp_path / "none.parquet").exists()


# --------------------------------------------------------------------------- real images


@pytest.mark.realdata
def test_real_hairy_images_get_larger_hair_fractions(real_dermoscopy, tmp_path):
    labels = pd.read_csv(real_dermoscopy / "labels.csv").sort_values("file")
    hairy = labels[labels["hair_visible"] == "yes"].head(6)
    clear = labels[labels["hair_visible"].isna()].head(6)
    rows = [{"sample_id": sha, "source_path": str(real_dermoscopy / "images" / f), "status": "accepted", "label": lab}
            for f, sha, lab in pd.concat([hairy, clear])[["file", "sha256", "label"]].itertuples(index=False)]
    manifest = tmp_path / "seeds.parquet"
    write_manifest(pd.DataFrame(rows), manifest, SEEDS)
    report = preprocess_manifest(manifest, tmp_path / "out", PreprocessConfig(size=512), workers=2)
    assert (report.processed, report.failed) == (12, 0)
    df = seeds_view(manifest)
    for path in df["processed_path"]:
        assert np.asarray(Image.open(path)).shape == (512, 512, 3)
    fraction = df.set_index("source_path")["hair_fraction"]
    with_hair = fraction[[r["source_path"] for r in rows[:6]]]
    without = fraction[[r["source_path"] for r in rows[6:]]]
    # measured on these 12: 0.174 vs 0.044 on average (every yes-image 0.05-0.29, every clear one 0.02-0.09)
    assert with_hair.mean() > 2 * without.mean()
    assert with_hair.median() > without.median()
