"""A finished training: the LoRA files of each sub-run with their preview images, the run's
``lora.json``, and recognising a finished run for the same key (so it is never trained twice)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermt2im.core.fileio import sha256_file
from dermt2im.diffusion import lora_files as lora_io
from dermt2im.train.data import _save_png
from dermt2im.train.inputs import instance_prompt
from dermt2im.train.loop import _lora_state_dicts
from dermt2im.train.outputs import _tensor_digest
from dermt2im.train.state import VALIDATION, LoraRun, TrainContext, TrainingError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    lora_dir: Path
    weights: dict[str, Path]  # {"all": p} or {"benign": p, "malignant": p}
    sha256: dict[str, str]
    steps: int
    final_loss: float
    optimizer: str
    device: str
    cached: bool = False
    kohya: dict[str, Path] = field(default_factory=dict)
    cache_key: str = ""

    @property
    def lora_json(self) -> Path:
        return self.lora_dir / lora_io.RUN_META


def _validation_images(ctx: TrainContext, labels: list[str]) -> list[Path]:
    import torch

    n = ctx.train.validation_images_per_class
    out: list[Path] = []
    if n == 0:
        return out
    ctx.pipe.unet.eval()
    g = ctx.preview
    for label in labels:
        prompt = instance_prompt(ctx.train, label)
        gens = [torch.Generator("cpu").manual_seed(ctx.train.seed + i) for i in range(n)]
        with torch.no_grad(), ctx.accelerator.autocast():
            images = ctx.pipe(
                [prompt] * n,
                negative_prompt=[g.negative_prompt] * n,
                num_inference_steps=ctx.train.validation_steps,
                guidance_scale=g.guidance_scale,
                height=ctx.train.resolution,
                width=ctx.train.resolution,
                generator=gens,
            ).images
        for i, img in enumerate(images):
            path = ctx.lora_dir / VALIDATION / f"{label}-{i:02d}.png"
            _save_png(img, path)
            out.append(path)
    return out


def _finish_one(ctx: TrainContext, run: LoraRun, labels: list[str]) -> dict[str, Any]:
    """Write the LoRA files of a finished sub-run (never non-finite ones) and its validation images."""
    import torch

    for p in run.params:
        if not torch.isfinite(p).all():
            raise TrainingError(f"LoRA weights of {run.name} became non-finite by step {run.step}; no LoRA written")
    sds = _lora_state_dicts(ctx, run.name)
    flat = lora_io.to_diffusers(sds)
    meta = dict(ctx.header_meta)
    meta.update(
        {
            "lora": run.name,
            "labels": labels,
            "instance_prompts": {label: instance_prompt(ctx.train, label) for label in labels},
            "steps": run.step,
            "weights_sha256": _tensor_digest(flat),
        }
    )
    try:
        paths = lora_io.save_lora_files(run.out_dir, sds, rank=ctx.train.rank, alpha=ctx.train.alpha, metadata=meta)
    except lora_io.LoraError as err:
        raise TrainingError(str(err)) from None
    validation = _validation_images(ctx, labels)
    return {"paths": paths, "meta": meta, "validation": validation}


def _cached_result(lora_dir: Path, key: str) -> TrainResult | None:
    meta_path = lora_dir / lora_io.RUN_META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("cache_key") != key:
        raise TrainingError(
            f"{lora_dir} already holds a LoRA trained from other inputs (cache key {meta.get('cache_key', '?')[:12]}); "
            "choose another run_id or delete the folder"
        )
    weights = {k: lora_dir / v for k, v in meta["weights"].items()}
    kohya = {k: lora_dir / v for k, v in meta.get("kohya", {}).items()}
    for k, p in weights.items():
        if not p.is_file() or sha256_file(p) != meta["sha256"][k]:
            LOG.warning("cached LoRA %s is missing or changed: training again", p)
            return None
    return TrainResult(
        run_id=meta["run_id"],
        lora_dir=lora_dir,
        weights=weights,
        sha256=dict(meta["sha256"]),
        steps=int(meta["steps"]),
        final_loss=float(meta["final_loss"]),
        optimizer=meta["optimizer"],
        device=meta["device"],
        cached=True,
        kohya=kohya,
        cache_key=key,
    )


def result_summary(result: TrainResult) -> dict[str, Any]:
    """A small JSON-able dict of a result (paths as strings), for tasks and the CLI."""
    d = dataclasses.asdict(result)
    d["lora_dir"] = str(result.lora_dir)
    d["lora_json"] = str(result.lora_json)
    d["weights"] = {k: str(v) for k, v in result.weights.items()}
    d["kohya"] = {k: str(v) for k, v in result.kohya.items()}
    return d
