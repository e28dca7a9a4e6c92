"""A workdir for the fidelity tests, made of phantoms: seeds (train / val / test), a phantom test set in
the other acquisition style, and stand-ins for generated sets, honest about what they are:

* ``degraded``: phantoms of other seeds, blurred, colour-cast and noisier, whose skin follows the skin
  type the prompt asks for: an imperfect generator that follows skin-tone prompts (what the learned
  miniature Stable Diffusion is expected to be); written as the factory's own renders;
* the noise ceiling is the report's own (the random-weight tiny Stable Diffusion).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from dermt2im.core.imaging import encode_png
from dermt2im.core.specs import LABELS, GenerateConfig
from dermt2im.core.workdir import Workdir
from dermt2im.fidelity.skin_tone import requested_skin_type
from dermt2im.phantoms import render_phantom
from tests.manifests import write_seeds, write_synthetic

SIZE = 64
TRANSFORMATIONS = ("", ", on fair skin, Fitzpatrick type I", ", on medium skin, Fitzpatrick type III",
                   ", on dark brown skin, Fitzpatrick type VI")
SAMPLERS = ("euler", "euler_a")


def phantom(label: str, key: list[int], style: str = "isic", skin_type: int | None = None) -> np.ndarray:
    rgb = render_phantom(label, np.random.default_rng(key), size=128, style=style, skin_type=skin_type)
    return cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def degrade(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What an imperfect generator makes: softer, a colour cast, grainier."""
    x = cv2.GaussianBlur(rgb, (0, 0), 0.9).astype(np.float32) * np.array([1.06, 0.96, 0.92], np.float32)
    return np.clip(x + rng.normal(0, 5, x.shape), 0, 255).astype(np.uint8)


def _write(path: Path, rgb: np.ndarray) -> tuple[str, str]:
    data = encode_png(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest()


def seed_rows(root: Path, splits: dict[str, int], style: str = "isic", tag: int = 0, split_name: str | None = None):
    rows, i = [], 0
    for split, n in splits.items():
        for j in range(n):
            label = LABELS[j % 2]
            path, sha = _write(root / split / f"{label}-{i:04d}.png", phantom(label, [tag, i], style))
            rows.append({"sample_id": sha, "source_path": path, "source_root": str(root), "dataset": "fixture",
                         "label": label, "lesion_id": f"L{tag}-{i}", "width": SIZE, "height": SIZE, "mode": "RGB",
                         "status": "accepted", "split": split_name or split, "processed_path": path,
                         "preprocess_key": f"fixture-{sha[:12]}", "license": "CC0-1.0",
                         "license_note": "fixture: CC0 1.0"})
            i += 1
    return pd.DataFrame(rows)


def synthetic_rows(root: Path, n: int, source: str = "dermt2im", tag: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(tag)
    rows = []
    prompt = GenerateConfig().prompt
    for i in range(n):
        label = LABELS[i % 2]
        transformation = TRANSFORMATIONS[(i // 2) % len(TRANSFORMATIONS)]
        rgb = degrade(phantom(label, [tag, 100 + i], skin_type=requested_skin_type(transformation)), rng)
        key = f"{label}-{i:06d}"
        path, sha = _write(root / label / f"{key}.png", rgb)
        rows.append({"sample_key": key, "label": label, "index": i,
                     "prompt": prompt.format(token="sks", label=label, transformation=transformation),
                     "transformation": transformation, "sampler": SAMPLERS[(i // 8) % 2], "steps": 20,
                     "guidance_scale": 7.0, "lora_scale": 0.8, "seed": i, "width": SIZE, "height": SIZE, "shard": 0,
                     "path": path, "sha256": sha, "base_model": "stand-in: degraded phantoms", "lora_sha256": "0" * 64,
                     "source": source, "status": "rendered"})
    return pd.DataFrame(rows)


def fidelity_workdir(workdir: Workdir, *, n_synthetic: int = 32) -> Workdir:
    """Seeds (24 train, 6 val, 6 test), a 'ham' test set of 12 and ``n_synthetic`` degraded renders."""
    root = workdir.data / "fixture"
    write_seeds(workdir.seeds_manifest, seed_rows(root / "seeds", {"train": 24, "val": 6, "test": 6}))
    write_seeds(workdir.test_set_manifest("phantom-ham"), seed_rows(root / "test-ham", {"test": 12}, style="ham", tag=3))
    write_synthetic(workdir, synthetic_rows(root / "synthetic", n_synthetic))
    return workdir
