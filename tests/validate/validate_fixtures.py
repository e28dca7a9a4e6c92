"""Small, learnable data for the validation tests: a seeds manifest (train / val / test splits with
lesion ids), a synthetic manifest (accepted, rejected and memorised rows) and two external test sets
in two acquisition styles (a colour shift), all as PNGs under the workdir.

Images come from ``dermt2im.phantoms.render_phantom`` when it is there; otherwise from a numpy
drawing (benign: small round dark disc; malignant: large irregular darker blob)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core.config import FactoryConfig, config_from_dict
from dermt2im.core.imaging import encode_png
from dermt2im.core.specs import LABELS
from dermt2im.core.workdir import Workdir
from tests.manifests import write_seeds, write_synthetic

STYLE_CAST = {"isic": (1.0, 0.97, 0.98), "ham": (1.08, 0.9, 0.7)}


def _drawn(label: str, rng: np.random.Generator, size: int, style: str) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    skin = np.array([225, 180, 160], np.float32) + rng.normal(0, 4, 3)
    img = np.ones((size, size, 3), np.float32) * skin
    cx, cy = size / 2 + rng.normal(0, size * 0.04, 2)
    angle = np.arctan2(yy - cy, xx - cx)
    if label == "benign":
        radius = size * rng.uniform(0.12, 0.18)
        r = np.full_like(angle, radius)
        colour = np.array([150, 100, 80], np.float32)
    else:
        radius = size * rng.uniform(0.30, 0.38)
        k = rng.integers(3, 6)
        r = radius * (1 + 0.25 * np.sin(k * angle + rng.uniform(0, 6.28)))
        colour = np.array([60, 35, 35], np.float32)
    inside = np.hypot(xx - cx, yy - cy) < r
    img[inside] = colour + rng.normal(0, 6, (int(inside.sum()), 3))
    img *= np.array(STYLE_CAST[style], np.float32)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(label: str, rng: np.random.Generator, size: int, style: str, kind: str = "auto") -> np.ndarray:
    if kind in ("auto", "phantom"):
        try:
            from dermt2im.phantoms import render_phantom
        except ImportError:
            if kind == "phantom":
                raise
        else:
            return render_phantom(label, rng, size=size, style=style, hair=False)
    return _drawn(label, rng, size, style)


@dataclass(frozen=True)
class FixtureData:
    workdir: Workdir
    seeds: pd.DataFrame
    synthetic: pd.DataFrame
    test_sets: dict[str, Path]


def _write(path: Path, rgb: np.ndarray) -> tuple[str, str]:
    data = encode_png(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest()


def make_validation_data(
    workdir: Workdir,
    *,
    n_train: int = 12,
    n_val: int = 4,
    n_test: int = 4,
    n_synthetic: int = 12,
    n_external: int = 8,
    size: int = 32,
    styles: tuple[str, ...] = ("isic", "ham"),
    kind: str = "drawn",
    synthetic_status: str = "accepted",
    extra_rejected: int = 2,
    extra_memorised: int = 2,
    seed: int = 0,
) -> FixtureData:
    """Per class: ``n_train`` / ``n_val`` / ``n_test`` seed images (isic style), ``n_synthetic``
    synthetic ones (plus rejected and memorised extras that must never be used), and
    ``n_external`` images in each external test set (one per style). All counts are per class."""
    root = workdir.data / "fixture"
    counter = iter(range(10**6))
    seed_rows = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for label in LABELS:
            for _ in range(n):
                i = next(counter)
                rng = np.random.default_rng([seed, 1, i])
                lesion = f"LES-{i:05d}"
                path, sha = _write(root / "seeds" / split / f"{lesion}.png", render(label, rng, size, styles[0], kind))
                seed_rows.append({"sample_id": sha, "source_path": path, "source_root": str(root / "seeds"),
                                  "dataset": "fixture", "label": label,
                                  "diagnosis": "melanoma" if label == "malignant" else "nevus",
                                  "lesion_id": lesion, "width": size, "height": size, "mode": "RGB",
                                  "exif_rotated": False, "status": "accepted", "split": split,
                                  "processed_path": path, "preprocess_key": "fixture", "hair_fraction": 0.0})
    seeds = write_seeds(workdir.seeds_manifest, seed_rows)

    syn_rows = []
    for label in LABELS:
        total = n_synthetic + extra_rejected + extra_memorised
        for j in range(total):
            rng = np.random.default_rng([seed, 2, LABELS.index(label), j])
            key = f"{label}-{j:06d}"
            path, sha = _write(root / "synthetic" / f"{key}.png", render(label, rng, size, styles[0], kind))
            status, memorised, reason = synthetic_status, False, None
            if j >= n_synthetic + extra_memorised:
                status, reason = "rejected", "blank"
            elif j >= n_synthetic:
                memorised, reason = True, "near-copy of a seed"
            syn_rows.append({"sample_key": key, "label": label, "index": j, "prompt": f"{label} lesion",
                             "sampler": "euler", "steps": 4, "seed": j, "width": size, "height": size, "shard": 0,
                             "path": path, "sha256": sha, "status": status, "reason": reason, "memorised": memorised})
    synthetic = write_synthetic(workdir, syn_rows)

    test_sets = {}
    for s, style in enumerate(styles):
        rows = []
        for label in LABELS:
            for j in range(n_external):
                rng = np.random.default_rng([seed, 3, s, LABELS.index(label), j])
                lesion = f"EXT-{style}-{label}-{j:04d}"
                path, sha = _write(root / f"test-{style}" / f"{lesion}.png", render(label, rng, size, style, kind))
                rows.append({"sample_id": sha, "source_path": path, "source_root": str(root), "dataset": "fixture",
                             "label": label, "lesion_id": lesion, "status": "accepted", "split": "test",
                             "processed_path": path, "width": size, "height": size})
        manifest = workdir.test_set_manifest(f"phantom-{style}")
        write_seeds(manifest, rows)
        test_sets[f"phantom-{style}"] = manifest
    return FixtureData(workdir, seeds, synthetic, test_sets)


def tiny_config(experiment: str = "test-validation", **validate: object) -> FactoryConfig:
    """A FactoryConfig for fast CPU tests; keyword arguments override the ``validate`` section."""
    section = {
        "tiny": True,
        "models": ["vit"],
        "regimes": ["baseline", "hybrid"],
        "seeds": [0],
        "epochs": 2,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "early_stopping_patience": 2,
        "image_size": 32,
        "mixed_precision": "no",
        "segmentation_samples": 0,
    }
    section.update(validate)
    runtime = {"device": section.pop("device", "cpu")}
    return config_from_dict({"name": "test", "validate": section, "runtime": {"validate": runtime},
                             "tracking": {"experiment": experiment}})


def run_validation(workdir, cfg, **kw):
    """The validate stage of a factory config, run in this process; its report."""
    from dermt2im.runners.sequential import run_stage
    from dermt2im.validate.stage import ValidateStage

    stage = ValidateStage(workdir, cfg.validation, cfg.runtime.validation, cfg.tracking, **kw)
    run_stage(stage)
    return stage.report


