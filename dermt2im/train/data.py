"""The training data, computed once before the loop: VAE latent posteriors of the training (and
prior-preservation class) images and the text embeddings of the prompts (the VAE and the text
encoder are frozen, so neither changes during training)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text
from dermt2im.core.specs import LABELS
from dermt2im.train.inputs import TrainingImage, class_prompt, instance_prompt
from dermt2im.train.state import CLASS_IMAGES, TrainContext, TrainingData

LOG = logging.getLogger(__name__)


def _load_rgb(path: Path, size: int):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.fit(im.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def _encode_images(ctx: TrainContext, paths: list[Path]):
    """VAE posterior mean and std for each image (float32, on device), computed once."""
    import torch

    vae = ctx.pipe.vae
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(paths), 8):
            x = torch.stack([_load_rgb(p, ctx.train.resolution) for p in paths[i : i + 8]])
            dist = vae.encode(x.to(ctx.device, dtype=vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _tokenize(ctx: TrainContext, prompt: str):
    tok = ctx.pipe.tokenizer
    return tok(
        [prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(ctx.device)


def _encode_prompts(ctx: TrainContext, prompts: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    ids = {label: _tokenize(ctx, p) for label, p in prompts.items()}
    if ctx.train.train_text_encoder:
        return {}, ids
    with torch.no_grad():
        embeds = {label: ctx.pipe.text_encoder(i)[0].to(ctx.weight_dtype) for label, i in ids.items()}
    return embeds, {}


def _class_images(ctx: TrainContext, label: str) -> list[Path]:
    """Prior-preservation images of ``label`` made by the base model (before any LoRA is added),
    kept in the run folder so a resumed run reuses them."""
    import torch

    folder = ctx.lora_dir / CLASS_IMAGES / label
    stamp = folder / ".cache_key"
    if folder.is_dir() and (not stamp.is_file() or stamp.read_text() != ctx.key):
        shutil.rmtree(folder)  # made for other inputs (a reused run_id)
    if not stamp.is_file():
        atomic_write_text(stamp, ctx.key)
    want = ctx.train.num_class_images
    paths = [folder / f"class-{i:05d}.png" for i in range(want)]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        LOG.info("generating %d class images for %s with the base model", len(todo), label)
        prompt = class_prompt(ctx.train, label)
        for start in range(0, len(todo), 4):
            chunk = todo[start : start + 4]
            gens = [torch.Generator("cpu").manual_seed(ctx.train.seed * 7919 + LABELS.index(label) * 100_003 + i) for i in chunk]
            with torch.no_grad(), ctx.accelerator.autocast():
                images = ctx.pipe(
                    [prompt] * len(chunk),
                    num_inference_steps=ctx.train.class_image_steps,
                    height=ctx.train.resolution,
                    width=ctx.train.resolution,
                    generator=gens,
                ).images
            for i, img in zip(chunk, images):
                _save_png(img, paths[i])
    return paths


def _save_png(img, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _build_data(ctx: TrainContext, images: dict[str, list[TrainingImage]], labels: list[str]) -> TrainingData:
    items = [img for label in labels for img in images[label]]
    mean, std = _encode_images(ctx, [i.path for i in items])
    embeds, ids = _encode_prompts(ctx, {label: instance_prompt(ctx.train, label) for label in labels})
    data = TrainingData(labels=[i.label for i in items], lat_mean=mean, lat_std=std, embeds=embeds, input_ids=ids)
    if ctx.train.prior_preservation:
        class_paths = {label: _class_images(ctx, label) for label in labels}
        flat = [(label, p) for label in labels for p in class_paths[label]]
        data.class_mean, data.class_std = _encode_images(ctx, [p for _, p in flat])
        data.class_labels = [label for label, _ in flat]
        data.class_by_label = {lab: [j for j, x in enumerate(data.class_labels) if x == lab] for lab in labels}
        data.class_embeds, data.class_ids = _encode_prompts(ctx, {label: class_prompt(ctx.train, label) for label in labels})
    return data
