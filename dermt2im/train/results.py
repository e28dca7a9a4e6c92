"""A finished training: the LoRA files of each sub-run with their preview images (the run's
``lora.json`` is written by ``stage``; recognising a finished run is ``runs``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dermt2im.diffusion import lora_files as lora_io
from dermt2im.train.data import _save_png
from dermt2im.train.inputs import instance_prompt
from dermt2im.train.loop import _lora_state_dicts
from dermt2im.train.outputs import _tensor_digest
from dermt2im.train.state import VALIDATION, LoraRun, TrainContext, TrainingError

LOG = logging.getLogger(__name__)


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
