"""The ranking on real images: 100 of the 130 real ISIC images are the seeds (70 train, 30 held out),
the other 30, blurred, colour-cast and grainier, stand in for an imperfect generator, and the
random-weight tiny model's noise is the ceiling. The distances rank held-out real < degraded < noise,
and density and coverage the other way round. (Precision is not asked to: with real outliers the
k-NN balls are wide enough to hold noise, the weakness density and coverage were made for.)"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pandas as pd
import pytest

from dermt2im.core.imaging import encode_png
from dermt2im.core.specs import FidelityConfig, GenerateConfig, QualityConfig
from dermt2im.fidelity.stage import FidelityStage
from tests.manifests import write_seeds, write_synthetic
from tests.real_images import real_images

pytestmark = pytest.mark.realdata
SIZE = 96


def _write(path, rgb) -> tuple[str, str]:
    data = encode_png(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest()


def strongly_degraded(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = cv2.GaussianBlur(rgb, (0, 0), 1.5).astype(np.float32) * np.array([1.12, 0.92, 0.85], np.float32)
    return np.clip(x + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)


def test_real_images_rank_below_a_degraded_set_below_noise(real_dermoscopy, workdir):
    labels, images = real_images(real_dermoscopy, 256)
    images = [cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for im in images]
    order = np.random.default_rng(0).permutation(len(images))
    seeds = []
    for k, i in enumerate(order[:100]):
        path, sha = _write(workdir.data / "seeds" / f"{i}.png", images[i])
        seeds.append({"sample_id": sha, "source_path": path, "source_root": "real", "dataset": "isic",
                      "label": labels["label"][i], "status": "accepted", "split": "train" if k < 70 else "test",
                      "processed_path": path, "preprocess_key": f"real-{sha[:12]}", "license": "CC0-1.0"})
    write_seeds(workdir.seeds_manifest, seeds)
    rng = np.random.default_rng(1)
    made = []
    for j, i in enumerate(order[100:]):
        path, sha = _write(workdir.data / "degraded" / f"{i}.png", strongly_degraded(images[i], rng))
        made.append({"sample_key": f"{labels['label'][i]}-{j:06d}", "label": labels["label"][i], "index": j,
                     "prompt": "a dermoscopic image", "sampler": "euler", "width": SIZE, "height": SIZE, "shard": 0,
                     "path": path, "sha256": sha, "source": "dermt2im", "status": "accepted"})
    write_synthetic(workdir, made)  # accepted: a verdict in the gate's table

    cfg = FidelityConfig(bootstrap=30, frd_filters=("Original",), noise_images=12, strata=("label",))
    stage = FidelityStage(workdir, cfg, QualityConfig(), GenerateConfig())
    out = stage.run(stage.UNIT, stage.key(stage.UNIT))
    tab = pd.read_csv(out["csv"], keep_default_na=False, na_values=[""])
    every = tab[tab["stratum"] == "all"].set_index("kind")
    assert (every.loc["floor", "n"], every.loc["synthetic", "n"]) == (30, 30)
    for metric in ("kid.seed-cnn", "fid.seed-cnn", "frd"):
        floor, degraded, noise = (every.loc[k, metric] for k in ("floor", "synthetic", "ceiling"))
        assert floor < degraded < noise, (metric, floor, degraded, noise)
    for metric in ("density.seed-cnn", "coverage.seed-cnn"):
        floor, degraded, noise = (every.loc[k, metric] for k in ("floor", "synthetic", "ceiling"))
        assert floor > degraded > noise, (metric, floor, degraded, noise)
    assert every.loc["floor", "ita.share.very_light"] >= 0.6  # ISIC: mostly very light skin
