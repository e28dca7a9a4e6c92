"""The method on the miniature model, as the tests drive it: phantom seeds at the smoke preset's
size, a DreamBooth + LoRA trained with the smoke preset's settings through ``train_lora``, images
rendered through the generation pipeline (LoRA fused at its scale), judged by the phantom judge."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from dermt2im.core.config import load_config
from dermt2im.core.specs import LABELS
from dermt2im.phantoms import render_phantom
from tests.manifests import write_seeds


def phantom_seeds(workdir, n_per_class: int, size: int = 64, seed: int = 0) -> pd.DataFrame:
    """Accepted ``train`` seeds: phantoms rendered at twice ``size`` and shrunk (as the smoke preset's
    preprocess does; no hair, so no hair removal is needed), one extra ``val`` image per class."""
    rows = []
    for label in LABELS:
        for i in range(n_per_class + 1):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 31, LABELS.index(label), i]))
            image = cv2.resize(render_phantom(label, rng, size=2 * size), (size, size), interpolation=cv2.INTER_AREA)
            path = Path(workdir.processed) / f"{label}-{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append({"sample_id": digest, "source_path": f"/seeds/{label}/{i}.png", "source_root": "/seeds",
                         "dataset": "folders", "label": label, "status": "accepted",
                         "split": "train" if i < n_per_class else "val", "processed_path": str(path),
                         "preprocess_key": hashlib.sha256(f"{digest}:test".encode()).hexdigest(),
                         "width": size, "height": size, "lesion_id": f"{label}-{i}"})
    return write_seeds(workdir.seeds_manifest, rows)


def smoke_config(overrides: list[str] | None = None):
    """The smoke preset (the miniature model, every check on), MLflow per test session."""
    return load_config("smoke", list(overrides or []))


def train(workdir, cfg, **kw):
    from dermt2im.train.stage import train_lora
    from dermt2im.train.state import Preview

    return train_lora(workdir, cfg.train, cfg.runtime.train, tracking=cfg.tracking, preview=Preview.of(cfg.generate),
                      **kw)


@dataclass(frozen=True)
class Rendered:
    labels: list[str]  # the class each image was generated as
    images: list[np.ndarray]


def render(cfg, lora_dir: Path | None, *, per_class: int, scale: float | None = None, prompt: str | None = None,
           pipe=None) -> Rendered:
    """``per_class`` images of each class from the plan of ``cfg.generate`` (its prompts, samplers,
    seeds), rendered through the generation pipeline with the LoRA of ``lora_dir`` fused at
    ``scale`` (the plan's by default); ``prompt`` replaces the plan's prompt template."""
    from dermt2im.generate.model import RenderModel
    from dermt2im.generate.pipeline import GROUP_COLUMNS, prepared_pipeline, render_batch
    from dermt2im.generate.plan import build_plan

    gen = cfg.generate if prompt is None else cfg.generate.model_copy(update={"prompt": prompt})
    plan = build_plan(gen, token=cfg.train.instance_token, per_class=per_class)
    if scale is not None:
        plan["lora_scale"] = float(scale)
    model = (RenderModel.from_lora(lora_dir) if lora_dir is not None
             else RenderModel.base_only(cfg.train.base_model, None, cfg.train.instance_token))
    labels, images = [], []
    for _, group in plan.groupby(list(GROUP_COLUMNS), sort=False):
        rows = group.to_dict("records")
        first = rows[0]
        prep = prepared_pipeline(model, cfg.runtime.generate, model.for_label(first["label"]), first["lora_scale"],
                                 pipe=pipe)
        for i in range(0, len(rows), 16):
            images += render_batch(prep.pipe, prep.switch, rows[i:i + 16], prep.prompts)
            labels += [r["label"] for r in rows[i:i + 16]]
    return Rendered(labels, images)


def agreement(judge, rendered: Rendered) -> tuple[float, dict[str, float]]:
    """Balanced accuracy of the judge against the intended classes (chance 0.5), and per class."""
    predicted = judge.predict(rendered.images)
    per = {label: float(np.mean([p == label for p, t in zip(predicted, rendered.labels) if t == label]))
           for label in LABELS}
    return float(np.mean(list(per.values()))), per
