"""Quality gate checks and the memorisation audit, on phantoms and constructed bad images."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from dermt2im.core.fileio import atomic_write_bytes, sha256_bytes
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import SEEDS, SYNTHETIC, read_manifest, write_manifest
from dermt2im.core.specs import QualityConfig
from dermt2im.core.views import synthetic_view
from dermt2im.phantoms import render_phantom
from dermt2im.quality.audit import embed
from dermt2im.quality.checks import check_image, reason_code
from dermt2im.quality.dedupe import hamming_matrix, phash
from dermt2im.quality.stage import assess
from tests.quality.gate_config import tiny_with_full_gate
from tests.manifests import write_seeds

Q = QualityConfig()


def phantom(label: str = "benign", seed: int = 0, size: int = 128, style: str = "isic", hair: bool = False):
    return render_phantom(label, np.random.default_rng(seed), size=size, style=style, hair=hair)


def altered_copy(rgb: np.ndarray) -> np.ndarray:
    """Slightly smaller, mirrored and JPEG re-compressed: what a memorised sample can look like."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (int(w * 0.9), int(h * 0.9)), interpolation=cv2.INTER_AREA)[:, ::-1]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(small[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def textured_skin(size: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), 1.0)
    n = n / n.std() * 14
    return np.clip(np.array([200, 150, 130])[None, None] + n[..., None], 0, 255).astype(np.uint8)


def bad_images() -> dict[str, np.ndarray]:
    good = phantom()
    rng = np.random.default_rng(0)
    saturated = good.copy()
    saturated[:, : int(good.shape[1] * 0.7)] = 255
    return {
        "blank": np.full((128, 128, 3), 180, np.uint8),
        "low-contrast": (good.astype(np.float32) * 0.05 + 150).astype(np.uint8),
        "saturated": saturated,
        "noise": rng.integers(0, 256, (128, 128, 3)).astype(np.uint8),
        "blur": cv2.GaussianBlur(good, (0, 0), 4),
        "no-lesion": textured_skin(),
    }


EXPECTED = {"blank": "blank", "low-contrast": "blank", "saturated": "saturated", "noise": "noise", "blur": "blur",
            "no-lesion": "no-lesion"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_check_rejects_its_bad_image(name):
    reason, metrics = check_image(bad_images()[name], Q)
    assert reason_code(reason) == EXPECTED[name], reason
    assert {"grey_std", "saturated_fraction", "high_frequency_ratio", "sharpness", "lesion_fraction",
            "lesion_contrast"} <= set(metrics)


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("style", ["isic", "ham"])
@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_phantom_lesions_pass_every_check(label, style, size):
    for seed, hair in ((1, False), (2, True)):
        reason, m = check_image(phantom(label, seed, size, style, hair), Q)
        assert reason is None, (label, style, size, hair, m)


def test_the_gate_follows_its_thresholds():
    good = phantom()
    _, m = check_image(good, Q)
    strict = Q.model_copy(update={"min_sharpness": m["sharpness"] + 1})
    assert reason_code(check_image(good, strict)[0]) == "blur"
    assert reason_code(check_image(good, Q.model_copy(update={"max_lesion_fraction": 0.01}))[0]) == "no-lesion"


def test_real_dermoscopy_passes_the_gate(real_dermoscopy):
    """The gate should not reject real lesions: 130 ISIC images, centre-cropped to 512 like preprocess."""
    from PIL import Image

    labels = pd.read_csv(real_dermoscopy / "labels.csv")
    rejected = []
    for f in labels["file"]:
        with Image.open(real_dermoscopy / "images" / f) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        s = min(h, w)
        rgb = cv2.resize(rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s], (256, 256),
                         interpolation=cv2.INTER_AREA)
        reason, _ = check_image(rgb, Q)
        if reason:
            rejected.append((f, reason))
    assert len(rejected) <= 0.05 * len(labels), rejected


def test_perceptual_hash_and_embedding_are_robust_to_small_changes():
    a, b = phantom("benign", 1), phantom("benign", 2)
    resized = cv2.resize(cv2.resize(a, (100, 100), interpolation=cv2.INTER_AREA), (128, 128))
    h = hamming_matrix([phash(a), phash(resized), phash(b)])
    assert h[0, 1] <= Q.near_duplicate_hamming < h[0, 2]
    d_copy = np.linalg.norm(embed(altered_copy(a)[:, ::-1]) - embed(a))
    d_other = np.linalg.norm(embed(b) - embed(a))
    assert d_copy < Q.memorisation_threshold < d_other


# ---------------------------------------------------------------------------------------------
# assess over a workdir


def seed_workdir(workdir, n_seeds: int = 4, size: int = 96, held_out: int = 0) -> list[tuple[str, np.ndarray]]:
    """An accepted seeds manifest with processed PNGs (phantoms), as preprocess leaves it; the last
    ``held_out`` of them in the ``val`` split, the others in ``train``."""
    rows, seeds = [], []
    for i in range(n_seeds):
        label = ("benign", "malignant")[i % 2]
        rgb = phantom(label, 1000 + i, size)
        data = encode_png(rgb)
        sid = sha256_bytes(data)
        path = workdir.processed / f"{sid}.png"
        atomic_write_bytes(path, data)
        rows.append({"sample_id": sid, "source_path": f"/seeds/{i}.png", "label": label, "status": "accepted",
                     "split": "val" if i >= n_seeds - held_out else "train", "processed_path": str(path)})
        seeds.append((sid, rgb))
    write_seeds(workdir.seeds_manifest, rows)
    return seeds


def synthetic_workdir(workdir, images: dict[str, np.ndarray], sampler: str = "euler") -> pd.DataFrame:
    """A synthetic manifest as generation leaves it (status 'rendered'), from the given images."""
    rows = []
    for i, (key, rgb) in enumerate(images.items()):
        label = key.split("-")[0]
        data = encode_png(rgb, {"dermt2im": "{}"})
        path = workdir.synthetic / label / f"{key}.png"
        atomic_write_bytes(path, data)
        rows.append({"sample_key": key, "label": label, "index": int(key.split("-")[1]), "prompt": f"a {label} lesion",
                     "sampler": ("euler", "euler_a", "plms")[i % 3] if sampler == "mixed" else sampler,
                     "steps": 20, "guidance_scale": 7.0, "lora_scale": 0.8, "seed": i, "width": rgb.shape[1],
                     "height": rgb.shape[0], "shard": 0, "path": str(path), "sha256": sha256_bytes(data),
                     "status": "rendered", "render_key": f"rk{i}"})
    write_manifest(pd.DataFrame(rows), workdir.synthetic_manifest, SYNTHETIC)
    return read_manifest(workdir.synthetic_manifest, SYNTHETIC)


def test_assess_gates_dedupes_audits_and_reports(workdir):
    seeds = seed_workdir(workdir)
    bad = bad_images()
    good = {f"benign-{i:06d}": phantom("benign", 10 + i) for i in range(4)}
    good.update({f"malignant-{i:06d}": phantom("malignant", 20 + i) for i in range(4)})
    images = dict(good)
    images["benign-000010"] = bad["noise"]
    images["malignant-000011"] = bad["blur"]
    images["benign-000012"] = good["benign-000001"].copy()  # identical pixels, another file
    near = np.clip(good["malignant-000002"].astype(int) + 2, 0, 255).astype(np.uint8)
    images["malignant-000013"] = near  # near duplicate: slightly brighter
    images["benign-000014"] = altered_copy(seeds[0][1])  # a memorised seed: resized, flipped, JPEG
    synthetic_workdir(workdir, images, sampler="mixed")

    report = assess(workdir, tiny_with_full_gate().quality)
    df = synthetic_view(workdir).set_index("sample_key")
    assert report.accepted == 8 and report.rejected == 5 and report.memorised == 1
    assert report.reasons == {"noise": 1, "blur": 1, "duplicate": 1, "near-duplicate": 1, "memorised": 1}
    assert set(df.loc[list(good), "status"]) == {"accepted"}
    assert df.loc["benign-000012", "duplicate_of"] == "benign-000001"
    assert df.loc["malignant-000013", "reason"].startswith("near-duplicate") and \
        df.loc["malignant-000013", "duplicate_of"] == "malignant-000002"
    memo = df.loc["benign-000014"]
    assert memo["status"] == "rejected" and memo["reason"].startswith(f"near-copy of seed {seeds[0][0]} (")
    assert bool(memo["memorised"]) and memo["nearest_seed"] == seeds[0][0]
    assert memo["nearest_seed_distance"] < 0.1 < df.loc[list(good), "nearest_seed_distance"].min()
    assert not df.loc[list(good), "memorised"].any()
    assert df.loc[list(good), ["sharpness", "high_frequency_ratio", "lesion_fraction", "phash"]].notna().all().all()
    # nothing is deleted
    assert all((workdir.synthetic / k.split("-")[0] / f"{k}.png").is_file() for k in images)

    files = report.files
    for name in ("quality_md", "quality_json", "audit_md", "audit_json", "audit_histogram", "audit_pairs",
                 "grid_benign", "grid_malignant", "grid_overview"):
        assert files[name].is_file() and files[name].stat().st_size > 0, name
    audit = json.loads(files["audit_json"].read_text())
    assert audit["flagged"] == 1 and audit["closest"][0]["sample_key"] == "benign-000014"
    q = json.loads(files["quality_json"].read_text())
    assert q["overall"][0]["accepted"] == 8 and {r["label"] for r in q["by_label"]} == {"benign", "malignant"}
    assert "near-copy" in files["audit_md"].read_text() or "flagged" in files["audit_md"].read_text()
    assert "memorisation audit: 1 near-copies" in report.summary()

    # re-assessing is stable
    again = assess(workdir, tiny_with_full_gate().quality)
    assert (again.accepted, again.rejected, again.reasons) == (report.accepted, report.rejected, report.reasons)


def test_memorised_images_can_be_kept_when_configured(workdir):
    seeds = seed_workdir(workdir, n_seeds=2)
    synthetic_workdir(workdir, {"benign-000000": altered_copy(seeds[1][1]), "benign-000001": phantom("benign", 77)})
    cfg = tiny_with_full_gate(["quality.exclude_memorised=false"])
    report = assess(workdir, cfg.quality)
    df = synthetic_view(workdir).set_index("sample_key")
    assert report.memorised == 1 and report.accepted == 2
    assert bool(df.loc["benign-000000", "memorised"]) and df.loc["benign-000000", "status"] == "accepted"


def test_assess_without_seeds_or_images(workdir):
    empty = assess(workdir, tiny_with_full_gate().quality)
    assert (empty.accepted, empty.rejected) == (0, 0)
    synthetic_workdir(workdir, {"benign-000000": phantom()})
    report = assess(workdir, tiny_with_full_gate().quality)
    assert report.accepted == 1 and report.seeds_compared == 0 and "no seed images" in report.summary()
    # nothing compared, nothing to picture: the audit says it was skipped, without histogram or pairs
    assert "Skipped" in report.files["audit_md"].read_text() and "audit_histogram" not in report.files
    assert not (workdir.reports / "audit" / "inlier_histogram.png").exists()
