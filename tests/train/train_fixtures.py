"""A tiny seeds manifest for training tests, built directly (no ingest, no phantoms module):
small PNGs of two visually different classes, accepted, split train, processed_path set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dermt2im.core.config import config_from_dict
from tests.manifests import write_seeds

# Fast, CPU-only training settings on the tiny model.
TINY_TRAIN = {
    "base_model": "tiny",
    "resolution": 32,
    "train_batch_size": 2,
    "max_steps": 12,
    "lr_warmup_steps": 2,
    "learning_rate": 1.0e-3,
    "mixed_precision": "no",
    "validation_images_per_class": 1,
    "validation_steps": 2,
    "optimizer": "auto",
}
TINY_TRAIN_RUNTIME = {"gradient_checkpointing": False, "checkpoint_every": 4, "checkpoints_keep": 2, "device": "cpu"}


def tiny_config(**train):
    """A factory config with the tiny training settings; ``train`` may set spec or runtime keys."""
    from dermt2im.core.runtime import TrainRuntime

    runtime = {**TINY_TRAIN_RUNTIME, **{k: v for k, v in train.items() if k in TrainRuntime.model_fields}}
    spec = {**TINY_TRAIN, **{k: v for k, v in train.items() if k not in TrainRuntime.model_fields}}
    return config_from_dict({"name": "test", "train": spec, "runtime": {"train": runtime}})


def train(workdir, cfg, **kw):
    """``train_lora`` with the train spec, runtime and tracking of a factory config."""
    from dermt2im.train.stage import train_lora
    from dermt2im.train.state import Preview

    return train_lora(workdir, cfg.train, cfg.runtime.train, tracking=cfg.tracking, preview=Preview.of(cfg.generate),
                      **kw)


def lesion_image(label: str, i: int, size: int = 32) -> np.ndarray:
    """benign: pale skin, small smooth round brown spot; malignant: darker skin, large irregular
    dark blob with a blue-grey patch."""
    rng = np.random.default_rng(1000 * (label == "malignant") + i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    if label == "benign":
        img[:] = (230, 190, 170)
        r = 0.18 + 0.03 * rng.random()
        cx, cy = 0.5 + 0.05 * rng.standard_normal(2)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img[mask] = (150, 95, 60)
    else:
        img[:] = (190, 140, 115)
        ang = np.arctan2(yy - 0.5, xx - 0.5)
        rad = 0.32 + 0.06 * np.sin(5 * ang + rng.random() * 6)
        mask = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < rad**2
        img[mask] = (60, 35, 30)
        patch = mask & (xx > 0.5) & (yy < 0.5)
        img[patch] = (90, 100, 130)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_seed_manifest(
    workdir, n_per_class: int = 3, size: int = 32, labels: tuple[str, ...] = ("benign", "malignant"), extra_val: bool = True
) -> pd.DataFrame:
    """Write PNGs under W/processed and accepted train rows (plus one val row per class that
    training must ignore) into W/manifests/seeds.parquet."""
    rows = []
    for label in labels:
        for i in range(n_per_class + (1 if extra_val else 0)):
            arr = lesion_image(label, i, size)
            path = Path(workdir.processed) / f"{label}-{i:03d}.png"
            Image.fromarray(arr).save(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append(
                {
                    "sample_id": digest,
                    "source_path": f"/seeds/{label}/{i}.png",
                    "source_root": "/seeds",
                    "dataset": "folders",
                    "label": label,
                    "status": "accepted",
                    "split": "train" if i < n_per_class else "val",
                    "processed_path": str(path),
                    "preprocess_key": hashlib.sha256(f"{digest}:test".encode()).hexdigest(),
                    "width": size,
                    "height": size,
                }
            )
    return write_seeds(workdir.seeds_manifest, rows)
