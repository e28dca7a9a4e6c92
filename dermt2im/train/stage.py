"""DreamBooth + LoRA fine-tuning of Stable Diffusion v1.x on the accepted training-split seeds.

The steps of diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` as small functions over a
typed config (paper, Table II): instance prompts per class; one LoRA for both classes (class in the
prompt) or one per class; optional prior preservation with class images from the base model; PEFT
LoRA on the UNet attention projections (optionally the text encoder); frozen VAE and text encoder;
DDPM noise; 8-bit AdamW on CUDA, torch AdamW on CPU; accelerate mixed precision on CUDA with LoRA
parameters kept in fp32; gradient checkpointing; constant-with-warmup; clipping; min-SNR weighting
and offset noise. Latents (the VAE posterior's mean and std) and text embeddings are computed once
before the loop, since the VAE and text encoder are frozen.

Determinism: the data order of epoch ``e`` is a permutation drawn from ``(seed, e)``; noise,
timesteps and latent samples come from one CPU generator whose state is checkpointed. A run is a
pure function of its inputs on CPU: the same config gives the same weights, and resuming from a
checkpoint gives the same weights as not stopping.

Every optimizer step sees ``train_batch_size * gradient_accumulation_steps`` examples, processed in
micro-batches of ``train_batch_size``; the loss is the example-weighted mean over micro-batches, so
halving the micro-batch after a CUDA out-of-memory error (and doubling accumulation) computes the
same update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermt2im.diffusion import lora_files as lora_io
from dermt2im.train.checkpoints import _load_checkpoint, _save_checkpoint, latest_checkpoint
from dermt2im.core.config import LABELS, FactoryConfig, TrainConfig
from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from dermt2im.core.manifest import SEEDS, read_manifest
from dermt2im.train.outputs import (
    _final_loss,
    _flat_params,
    _mlflow_flush,
    _mlflow_log_step,
    _tensor_digest,
    _write_loss_curve,
)
from dermt2im.train.state import (  # noqa: F401  (re-exported: tests and callers use training.*)
    CHECKPOINTS,
    CLASS_IMAGES,
    LOSS_CSV,
    LOSS_PNG,
    VALIDATION,
    TrainingError,
    _Batch,
    _Ctx,
    _Data,
    _Run,
)
from dermt2im.core.workdir import Workdir

LOG = logging.getLogger(__name__)

# Bump when a change to this module changes what a given config trains (cache keys include it).
TRAINER_VERSION = 1

# Columns of the seeds manifest that decide what is trained on.
SEED_COLUMNS = ["sample_id", "label", "split", "status", "processed_path", "preprocess_key"]
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MAX_CONSECUTIVE_SKIPS = 20


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


@dataclass(frozen=True)
class TrainingImage:
    sample_id: str
    label: str
    path: Path


# ---------------------------------------------------------------------------------------------
# inputs: images, config checks, identities


def training_images(workdir: Workdir) -> dict[str, list[TrainingImage]]:
    """Accepted, train-split rows with a processed image, by label, in sample_id order."""
    df = read_manifest(workdir.seeds_manifest, SEEDS)
    df = df[(df["status"] == "accepted") & (df["split"] == "train") & df["processed_path"].notna()]
    out: dict[str, list[TrainingImage]] = {label: [] for label in LABELS}
    for row in df.sort_values(["label", "sample_id", "processed_path"]).itertuples(index=False):
        if row.label in out:
            out[row.label].append(TrainingImage(str(row.sample_id), str(row.label), Path(row.processed_path)))
    return out


def check_inputs(workdir: Workdir) -> dict[str, list[TrainingImage]]:
    """Every class has at least one training image and every file exists (before any model loads)."""
    images = training_images(workdir)
    empty = [label for label, items in images.items() if not items]
    if empty:
        counts = ", ".join(f"{k}: {len(v)}" for k, v in images.items())
        raise TrainingError(
            f"no training images for class {' and '.join(repr(e) for e in empty)} "
            f"(accepted, split=train, processed_path set in {workdir.seeds_manifest}; found {counts}). "
            "Run ingest and preprocess first, or add seed images of that class."
        )
    missing = [str(i.path) for items in images.values() for i in items if not i.path.is_file()]
    if missing:
        raise TrainingError(f"{len(missing)} processed training image(s) are missing, e.g. {missing[:3]}; re-run preprocess")
    return images


def seeds_digest(workdir: Workdir, images: dict[str, list[TrainingImage]] | None = None) -> str:
    """Content digest of what training reads: the training rows (sample_id, label, split, status,
    preprocess_key) and the sha256 of each processed file. Paths do not enter it, so moving the
    workdir keeps cache keys; rows outside the training split do not either."""
    images = images if images is not None else training_images(workdir)
    df = read_manifest(workdir.seeds_manifest, SEEDS)
    keys = dict(zip(df["processed_path"].astype("string"), df["preprocess_key"].astype("string")))
    h = hashlib.sha256(b"dermt2im.train.seeds.v1\n")
    for label in sorted(images):
        for img in images[label]:
            pk = keys.get(str(img.path))
            pk = "" if pk is None or str(pk) == "<NA>" else str(pk)
            content = sha256_file(img.path) if img.path.is_file() else "missing"
            h.update(f"{img.sample_id}\t{label}\ttrain\taccepted\t{pk}\t{content}\n".encode())
    return h.hexdigest()


def _placeholders(template: str) -> set[str]:
    import string

    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_config(train: TrainConfig) -> list[str]:
    """Raise TrainingError for settings that cannot work; return warnings for dubious ones."""
    warnings: list[str] = []
    for name in ("instance_prompt", "class_prompt"):
        unknown = _placeholders(getattr(train, name)) - {"token", "label"}
        if unknown:
            raise TrainingError(f"train.{name} uses unknown placeholder(s) {sorted(unknown)}; allowed: {{token}}, {{label}}")
    if not train.lora_per_class and "label" not in _placeholders(train.instance_prompt):
        raise TrainingError(
            "train.instance_prompt has no {label} placeholder, but one LoRA is trained for both classes "
            "(lora_per_class: false): the classes would share one prompt. Add {label} or set lora_per_class: true."
        )
    if train.prior_preservation and "label" not in _placeholders(train.class_prompt) and not train.lora_per_class:
        raise TrainingError("train.class_prompt needs a {label} placeholder for prior preservation with a shared LoRA")
    if "token" not in _placeholders(train.instance_prompt):
        warnings.append("train.instance_prompt has no {token}: the LoRA is not tied to a rare identifier")
    if train.resolution % 8:
        raise TrainingError(f"train.resolution must be a multiple of 8 (got {train.resolution})")
    if train.prior_preservation and train.prior_loss_weight == 0:
        warnings.append("prior_preservation is on with prior_loss_weight 0: class images have no effect")
    try:
        from dermt2im.diffusion.models import resolve_device

        resolve_device(train.device)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    return warnings


def instance_prompt(train: TrainConfig, label: str) -> str:
    return train.instance_prompt.format(token=train.instance_token, label=label)


def class_prompt(train: TrainConfig, label: str) -> str:
    return train.class_prompt.format(token=train.instance_token, label=label)


def cache_key(seeds: str, cfg: FactoryConfig, base_identity: str) -> str:
    blob = json.dumps(
        {"trainer": TRAINER_VERSION, "seeds": seeds, "train": cfg.digest("train"), "base": base_identity}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def default_run_id(key: str) -> str:
    return key[:12]


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors", "bitsandbytes", "dermt2im"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def planned_steps(train: TrainConfig, n_examples: int) -> int:
    per_step = train.train_batch_size * train.gradient_accumulation_steps
    return train.max_steps or max(1, math.ceil(train.epochs * n_examples / per_step))


# ---------------------------------------------------------------------------------------------
# setup


def _accelerator(device: str, mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    kwargs = {"mixed_precision": mixed_precision, "cpu": device == "cpu"}
    try:
        return Accelerator(**kwargs)
    except ValueError as err:
        # A long-lived worker trained before with another precision: reset the single-process state.
        if "already been initialized" not in str(err) or PartialState().num_processes != 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _choose_optimizer(train: TrainConfig, device: str, warnings: list[str]) -> str:
    if device.startswith("cuda") and train.optimizer in ("auto", "adamw8bit"):
        try:
            import bitsandbytes  # noqa: F401

            return "adamw8bit"
        except Exception as err:  # missing or broken CUDA build
            if train.optimizer == "adamw8bit":
                warnings.append(f"adamw8bit requested but bitsandbytes is unusable ({err}); using torch AdamW")
            return "adamw"
    if train.optimizer == "adamw8bit":
        warnings.append(f"adamw8bit requested but device is {device}; 8-bit AdamW needs CUDA, using torch AdamW")
    return "adamw"


def _make_optimizer(name: str, groups: list[dict], train: TrainConfig):
    import torch

    kwargs = {"betas": (0.9, 0.999), "weight_decay": train.adam_weight_decay, "eps": 1e-8}
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _load_rgb(path: Path, size: int):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.fit(im.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def _encode_images(ctx: _Ctx, paths: list[Path]):
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


def _tokenize(ctx: _Ctx, prompt: str):
    tok = ctx.pipe.tokenizer
    return tok(
        [prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(ctx.device)


def _encode_prompts(ctx: _Ctx, prompts: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    ids = {label: _tokenize(ctx, p) for label, p in prompts.items()}
    if ctx.train.train_text_encoder:
        return {}, ids
    with torch.no_grad():
        embeds = {label: ctx.pipe.text_encoder(i)[0].to(ctx.weight_dtype) for label, i in ids.items()}
    return embeds, {}


def _class_images(ctx: _Ctx, label: str) -> list[Path]:
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


def _build_data(ctx: _Ctx, images: dict[str, list[TrainingImage]], labels: list[str]) -> _Data:
    items = [img for label in labels for img in images[label]]
    mean, std = _encode_images(ctx, [i.path for i in items])
    embeds, ids = _encode_prompts(ctx, {label: instance_prompt(ctx.train, label) for label in labels})
    data = _Data(labels=[i.label for i in items], lat_mean=mean, lat_std=std, embeds=embeds, input_ids=ids)
    if ctx.train.prior_preservation:
        class_paths = {label: _class_images(ctx, label) for label in labels}
        flat = [(label, p) for label in labels for p in class_paths[label]]
        data.class_mean, data.class_std = _encode_images(ctx, [p for _, p in flat])
        data.class_labels = [label for label, _ in flat]
        data.class_by_label = {lab: [j for j, x in enumerate(data.class_labels) if x == lab] for lab in labels}
        data.class_embeds, data.class_ids = _encode_prompts(ctx, {label: class_prompt(ctx.train, label) for label in labels})
    return data


def _add_adapters(ctx: _Ctx, name: str, seed: int) -> list:
    """Fresh LoRA adapters (seeded) on the UNet (and text encoder); returns the trainable params."""
    import torch
    from peft import LoraConfig

    t = ctx.train
    devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        ctx.pipe.unet.add_adapter(
            LoraConfig(r=t.rank, lora_alpha=t.alpha, target_modules=list(t.target_modules), init_lora_weights="gaussian"),
            adapter_name=name,
        )
        if t.train_text_encoder:
            ctx.pipe.text_encoder.add_adapter(
                LoraConfig(r=t.rank, lora_alpha=t.alpha, target_modules=list(TEXT_ENCODER_TARGETS), init_lora_weights="gaussian"),
                adapter_name=name,
            )
    models = [ctx.pipe.unet] + ([ctx.pipe.text_encoder] if t.train_text_encoder else [])
    if ctx.weight_dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        cast_training_params(models, dtype=torch.float32)
    return [p for m in models for p in m.parameters() if p.requires_grad]


def _remove_adapters(ctx: _Ctx, name: str) -> None:
    ctx.pipe.unet.delete_adapters(name)
    if ctx.train.train_text_encoder:
        ctx.pipe.text_encoder.delete_adapter(name)


def _lora_state_dicts(ctx: _Ctx, name: str) -> dict[str, dict]:
    from peft.utils import get_peft_model_state_dict

    out = {"unet": get_peft_model_state_dict(ctx.pipe.unet, adapter_name=name)}
    if ctx.train.train_text_encoder:
        out["text_encoder"] = get_peft_model_state_dict(ctx.pipe.text_encoder, adapter_name=name)
    return out


# ---------------------------------------------------------------------------------------------
# one step


def _prepare_batch(ctx: _Ctx, run: _Run, step: int) -> _Batch:
    """All randomness of optimizer step ``step`` (1-based), drawn up front from the run's CPU
    generator so an out-of-memory retry replays exactly the same step."""
    import torch

    t = ctx.train
    g = run.generator
    n_per_step = t.train_batch_size * t.gradient_accumulation_steps
    first = (step - 1) * n_per_step
    idx = [run.example(first + i, t.seed) for i in range(n_per_step)]
    sf = ctx.pipe.vae.config.scaling_factor
    shift = getattr(ctx.pipe.vae.config, "shift_factor", None) or 0.0
    T = ctx.noise_scheduler.config.num_train_timesteps

    def draw(mean, std):
        eps = torch.randn(mean.shape, generator=g).to(ctx.device)
        latents = (mean + std * eps - shift) * sf
        noise = torch.randn(latents.shape, generator=g)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
        ts = torch.randint(0, T, (latents.shape[0],), generator=g)
        return latents, noise.to(ctx.device), ts.to(ctx.device)

    sel = torch.tensor(idx, device=ctx.device)
    latents, noise, ts = draw(run.data.lat_mean[sel], run.data.lat_std[sel])
    batch = _Batch(step, idx, latents, noise, ts, [run.data.labels[i] for i in idx])
    if t.prior_preservation:
        # class image for each instance example: same label, cycling through that label's class images
        cidx = []
        for i, pos in zip(idx, range(first, first + n_per_step)):
            same = run.data.class_by_label[run.data.labels[i]]
            cidx.append(same[pos % len(same)])
        csel = torch.tensor(cidx, device=ctx.device)
        batch.prior_latents, batch.prior_noise, batch.prior_timesteps = draw(
            run.data.class_mean[csel], run.data.class_std[csel]
        )
        batch.prior_labels = [run.data.class_labels[j] for j in cidx]
    return batch


def _conditioning(ctx: _Ctx, embeds: dict, ids: dict, labels: list[str]):
    import torch

    if ctx.train.train_text_encoder:
        return ctx.pipe.text_encoder(torch.cat([ids[label] for label in labels]))[0]
    return torch.cat([embeds[label] for label in labels])


def _mse_per_example(ctx: _Ctx, latents, noise, ts, cond):
    import torch.nn.functional as F

    sched = ctx.noise_scheduler
    noisy = sched.add_noise(latents, noise, ts)
    with ctx.accelerator.autocast():
        pred = ctx.pipe.unet(noisy.to(ctx.weight_dtype), ts, cond.to(ctx.weight_dtype)).sample
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, ts)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def _step_loss(ctx: _Ctx, run: _Run, batch: _Batch, sl: slice):
    """Mean loss of the examples ``sl`` of ``batch`` (instance term, min-SNR weighted when
    configured, plus the weighted prior-preservation term)."""
    import torch

    t = ctx.train
    d = run.data
    labels = batch.labels[sl]
    per = _mse_per_example(
        ctx, batch.latents[sl], batch.noise[sl], batch.timesteps[sl], _conditioning(ctx, d.embeds, d.input_ids, labels)
    )
    if t.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(ctx.noise_scheduler, batch.timesteps[sl])
        w = torch.stack([snr, t.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        w = w / (snr + 1) if ctx.noise_scheduler.config.prediction_type == "v_prediction" else w / snr
        per = per * w
    loss = per.mean()
    if t.prior_preservation:
        prior = _mse_per_example(
            ctx,
            batch.prior_latents[sl],
            batch.prior_noise[sl],
            batch.prior_timesteps[sl],
            _conditioning(ctx, d.class_embeds, d.class_ids, batch.prior_labels[sl]),
        )
        loss = loss + t.prior_loss_weight * prior.mean()
    return loss


class _NonFinite(Exception):
    def __init__(self, value: float):
        self.value = value


def _forward_backward(ctx: _Ctx, run: _Run, batch: _Batch) -> float:
    """Accumulate gradients over micro-batches; the example-weighted mean loss."""
    total = 0.0
    for start in range(0, batch.size, run.micro_batch):
        sl = slice(start, min(start + run.micro_batch, batch.size))
        loss = _step_loss(ctx, run, batch, sl)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _NonFinite(value)
        frac = (sl.stop - sl.start) / batch.size
        ctx.accelerator.backward(loss * frac)
        total += value * frac
    return total


def _optimizer_step(ctx: _Ctx, run: _Run, batch: _Batch) -> float:
    import torch

    while True:
        run.optimizer.zero_grad(set_to_none=True)
        try:
            loss = _forward_backward(ctx, run, batch)
            break
        except torch.cuda.OutOfMemoryError:
            run.optimizer.zero_grad(set_to_none=True)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            if run.micro_batch == 1:
                raise TrainingError(
                    f"CUDA out of memory at step {batch.step} even with micro-batch 1 "
                    f"(resolution {ctx.train.resolution}); lower the resolution or enable gradient_checkpointing"
                ) from None
            run.micro_batch = max(1, run.micro_batch // 2)
            run.oom_events.append(batch.step)
            msg = (
                f"CUDA out of memory at step {batch.step}: micro-batch now {run.micro_batch}, "
                f"accumulating {math.ceil(batch.size / run.micro_batch)} micro-batches per step"
            )
            LOG.warning(msg)
            ctx.warnings.append(msg)
    ctx.accelerator.clip_grad_norm_(run.params, ctx.train.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


# ---------------------------------------------------------------------------------------------
# outputs


def _validation_images(ctx: _Ctx, labels: list[str]) -> list[Path]:
    import torch

    n = ctx.train.validation_images_per_class
    out: list[Path] = []
    if n == 0:
        return out
    ctx.pipe.unet.eval()
    g = ctx.cfg.generate
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


# ---------------------------------------------------------------------------------------------
# the sub-run


def _train_one(
    ctx: _Ctx,
    images: dict[str, list[TrainingImage]],
    name: str,
    labels: list[str],
    out_dir: Path,
    seed: int,
    resume: str | None,
    progress: Callable[[int, float], None] | None,
) -> _Run:
    import torch
    from diffusers.optimization import get_scheduler

    t = ctx.train
    data = _build_data(ctx, images, labels)
    total = planned_steps(t, len(data.labels))
    params = _add_adapters(ctx, name, seed)
    ctx.pipe.unet.train()
    if t.train_text_encoder:
        ctx.pipe.text_encoder.train()
    unet_params = [p for p in ctx.pipe.unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": t.learning_rate}]
    if t.train_text_encoder:
        te_params = [p for p in ctx.pipe.text_encoder.parameters() if p.requires_grad]
        groups.append({"params": te_params, "lr": t.text_encoder_learning_rate})
    optimizer = _make_optimizer(ctx.optimizer_name, groups, t)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=total)
    optimizer, lr_scheduler = ctx.accelerator.prepare(optimizer, lr_scheduler)
    run = _Run(
        name=name,
        out_dir=out_dir,
        data=data,
        total=total,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        generator=torch.Generator("cpu").manual_seed(seed),
        micro_batch=t.train_batch_size,
    )
    if resume is None:
        shutil.rmtree(run.ckpt_root, ignore_errors=True)
    else:
        ckpt = latest_checkpoint(run.ckpt_root) if resume == "latest" else Path(resume)
        if ckpt is not None and not (ckpt / "state.json").is_file():
            raise TrainingError(f"resume checkpoint {ckpt} not found (or incomplete)")
        if ckpt is not None:
            _load_checkpoint(ctx, run, ckpt)
        else:
            LOG.info("no checkpoint under %s: starting %s from step 0", run.ckpt_root, name)

    LOG.info(
        "training %s: %d images, %d steps (%d per step, micro-batch %d), optimizer %s, precision %s, device %s",
        name, len(data.labels), total, t.train_batch_size * t.gradient_accumulation_steps,
        run.micro_batch, ctx.optimizer_name, ctx.mixed_precision, ctx.device,
    )
    consecutive_skips = 0
    run.start_step = run.step
    t0 = time.perf_counter()
    while run.step < total:
        step = run.step + 1
        batch = _prepare_batch(ctx, run, step)
        lr = float(run.lr_scheduler.get_last_lr()[0])
        try:
            loss = _optimizer_step(ctx, run, batch)
            consecutive_skips = 0
        except _NonFinite as bad:
            run.optimizer.zero_grad(set_to_none=True)
            where = f"step {step} of {total}" + ("" if name == "all" else f" (LoRA for {name})")
            if t.nan_policy == "stop":
                last = latest_checkpoint(run.ckpt_root)
                raise TrainingError(
                    f"loss is {bad.value} at {where}; stopped, no LoRA written"
                    + (f" (last good checkpoint: {last})" if last else "")
                    + ". Lower the learning rate, disable fp16, or set train.nan_policy: skip."
                ) from None
            consecutive_skips += 1
            run.skipped.append(step)
            msg = f"loss is {bad.value} at {where}; step skipped (nan_policy: skip)"
            LOG.warning(msg)
            ctx.warnings.append(msg)
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingError(f"{consecutive_skips} consecutive non-finite losses up to {where}; stopped, no LoRA written") from None
            loss = float("nan")
        run.step = step
        run.losses.append((step, loss, lr))
        _mlflow_log_step(ctx, name, step, loss, lr)
        if progress is not None:
            progress(step, loss)
        if step % t.checkpoint_every == 0 and step < total:
            _save_checkpoint(ctx, run)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    run.loop_seconds = time.perf_counter() - t0
    _mlflow_flush(ctx)
    return run


def _finish_one(ctx: _Ctx, run: _Run, labels: list[str]) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# entry point


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


def find_trained(workdir: Workdir, cfg: FactoryConfig, run_id: str | None = None) -> TrainResult | None:
    """The finished, intact LoRA for these inputs, if there is one (no model is loaded)."""
    from dermt2im.diffusion.models import base_model_identity

    try:
        images = check_inputs(workdir)
        key = cache_key(seeds_digest(workdir, images), cfg, base_model_identity(cfg.train.base_model, cfg.train.revision))
        return _cached_result(workdir.lora / (run_id or default_run_id(key)), key)
    except (TrainingError, ValueError, OSError, KeyError):
        return None


def train_lora(
    workdir: Workdir,
    cfg: FactoryConfig,
    *,
    resume: str | None = None,
    run_id: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    force: bool = False,
) -> TrainResult:
    """Train the LoRA(s) of ``cfg.train`` on the workdir's training seeds into ``W/lora/<run_id>/``.

    ``resume``: None starts fresh (old checkpoints of the run are removed); "latest" continues from
    the newest checkpoint when there is one; a path continues from that checkpoint. ``run_id``
    defaults to a short hash of the inputs, so the same inputs land in the same folder, and a
    finished folder for the same inputs is returned at once (``cached=True``) unless ``force``.
    ``progress(step, total, loss)`` is called after every optimizer step (steps counted over all
    LoRAs of the call).
    """
    import torch

    from dermt2im.diffusion.models import base_model_identity, load_pipeline, resolve_device

    t = cfg.train
    # -- everything that can be checked without a model --
    warnings = check_config(t)
    images = check_inputs(workdir)
    try:
        base_id = base_model_identity(t.base_model, t.revision)
    except ValueError as err:
        raise TrainingError(f"train.base_model: {err}") from None
    seeds = seeds_digest(workdir, images)
    key = cache_key(seeds, cfg, base_id)
    run_id = run_id or default_run_id(key)
    if not run_id or any(c in run_id for c in "/\\") or run_id.startswith("."):
        raise TrainingError(f"run_id {run_id!r} must be a plain folder name")
    lora_dir = workdir.lora / run_id
    if not force:
        cached = _cached_result(lora_dir, key)
        if cached is not None:
            LOG.info("LoRA for these inputs already trained: %s", lora_dir)
            return cached
    elif (lora_dir / lora_io.RUN_META).is_file():
        (lora_dir / lora_io.RUN_META).unlink()

    device = resolve_device(t.device)
    mixed = t.mixed_precision
    if not device.startswith("cuda") and mixed != "no":
        warnings.append(f"mixed_precision {mixed} needs CUDA; training in fp32 on {device}")
        mixed = "no"
    if mixed == "bf16" and not torch.cuda.is_bf16_supported():
        warnings.append("bf16 is not supported by this GPU; using fp16")
        mixed = "fp16"
    optimizer_name = _choose_optimizer(t, device, warnings)
    for w in warnings:
        LOG.warning(w)

    per_class = t.lora_per_class
    groups = [(label, [label]) for label in LABELS] if per_class else [("all", list(LABELS))]
    header_meta = {
        "run_id": run_id,
        "cache_key": key,
        "trainer_version": TRAINER_VERSION,
        "base_model": t.base_model,
        "revision": t.revision,
        "base_model_identity": base_id,
        "seeds_digest": seeds,
        "config": t.model_dump(mode="json"),
        "seed": t.seed,
        "git_revision": git_revision(),
        "library_versions": library_versions(),
        "training_images": {label: len(images[label]) for label in LABELS},
    }

    # -- models --
    accelerator = _accelerator(device, mixed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    pipe = load_pipeline(t.base_model, t.revision, device="cpu")
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.to(accelerator.device, **cast)
    if t.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if t.train_text_encoder:
            te = pipe.text_encoder
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    ctx = _Ctx(
        cfg=cfg,
        train=t,
        run_id=run_id,
        key=key,
        lora_dir=lora_dir,
        device=accelerator.device,
        accelerator=accelerator,
        weight_dtype=weight_dtype,
        mixed_precision=mixed,
        optimizer_name=optimizer_name,
        pipe=pipe,
        noise_scheduler=noise_scheduler,
        warnings=warnings,
        header_meta=header_meta,
    )
    lora_dir.mkdir(parents=True, exist_ok=True)

    # -- tracking --
    import mlflow

    from dermt2im.core.tracking import use_tracking

    use_tracking(workdir, cfg.tracking, experiment=f"{cfg.tracking.experiment}-train")
    planned = {name: planned_steps(t, sum(len(images[lab]) for lab in labs)) for name, labs in groups}
    grand_total = sum(planned.values())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    with mlflow.start_run(run_name=f"train-{run_id}") as active:
        ctx.mlflow_run = active.info.run_id
        mlflow.set_tags({"dermt2im.stage": "train", "dermt2im.run_id": run_id, "dermt2im.cache_key": key})
        mlflow.log_params(
            {
                **_flat_params(t),
                "device": device,
                "optimizer_used": optimizer_name,
                "mixed_precision_used": mixed,
                "base_model_identity": base_id,
                "seeds_digest": seeds,
                "resume": str(resume),
                **{f"images_{label}": len(images[label]) for label in LABELS},
            }
        )
        runs: list[_Run] = []
        finished: dict[str, dict[str, Any]] = {}
        loop_time = 0.0
        steps_done = 0
        offset = 0
        for i, (name, labels) in enumerate(groups):
            out_dir = lora_dir if name == "all" else lora_dir / name

            def _progress(step: int, loss: float, _offset: int = offset) -> None:
                if progress is not None:
                    progress(_offset + step, grand_total, loss)

            run = _train_one(ctx, images, name, labels, out_dir, t.seed + i, resume, _progress)
            loop_time += run.loop_seconds
            steps_done += run.step - run.start_step
            runs.append(run)
            ctx.pipe.unet.eval()
            finished[name] = _finish_one(ctx, run, labels)
            mlflow.log_metric(f"final_loss{'' if name == 'all' else '_' + name}", _final_loss(run))
            if per_class:
                _remove_adapters(ctx, name)
            offset += run.total

        steps_per_s = steps_done / loop_time if loop_time > 0 else float("nan")
        if device.startswith("cuda"):
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
            peak_kind = "cuda_max_memory_allocated"
        else:
            import resource

            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            peak_kind = "process_max_rss"
        csv, png = _write_loss_curve(runs, lora_dir)
        final_loss = float(sum(_final_loss(r) for r in runs) / len(runs))

        def rel(p: Path) -> str:
            return p.relative_to(lora_dir).as_posix()

        weights = {name: f["paths"]["diffusers"] for name, f in finished.items()}
        kohya = {name: f["paths"]["kohya"] for name, f in finished.items()}
        sha = {name: sha256_file(p) for name, p in weights.items()}
        run_meta = {
            **header_meta,
            "layout": "per_class" if per_class else "shared",
            "weights": {k: rel(p) for k, p in weights.items()},
            "kohya": {k: rel(p) for k, p in kohya.items()},
            "sha256": sha,
            "kohya_sha256": {name: sha256_file(p) for name, p in kohya.items()},
            "weights_sha256": {name: f["meta"]["weights_sha256"] for name, f in finished.items()},
            "instance_prompts": {label: instance_prompt(t, label) for label in LABELS},
            "steps": sum(r.step for r in runs),
            "steps_per_lora": {r.name: r.step for r in runs},
            "final_loss": final_loss,
            "optimizer": optimizer_name,
            "device": device,
            "mixed_precision": mixed,
            "micro_batch": {r.name: r.micro_batch for r in runs},
            "skipped_steps": {r.name: r.skipped for r in runs},
            "oom_events": {r.name: r.oom_events for r in runs},
            "warnings": warnings,
            "loss_csv": rel(csv),
            "loss_png": rel(png),
            "validation_images": [rel(p) for f in finished.values() for p in f["validation"]],
            "steps_per_second": steps_per_s,
            "peak_memory_mb": peak_mb,
            "peak_memory_kind": peak_kind,
            "mlflow_run_id": ctx.mlflow_run,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        meta_path = lora_io.write_run_meta(lora_dir, run_meta)
        mlflow.log_metrics({"steps_per_second": steps_per_s, "peak_memory_mb": peak_mb, "final_loss": final_loss})
        for p in [meta_path, csv, png, *weights.values(), *kohya.values()]:
            mlflow.log_artifact(str(p), artifact_path=str(Path(rel(p)).parent) if rel(p).count("/") else None)
        vals = [p for f in finished.values() for p in f["validation"]]
        for p in vals:
            mlflow.log_artifact(str(p), artifact_path=VALIDATION)
        if warnings:
            mlflow.log_text("\n".join(warnings), "warnings.txt")

    return TrainResult(
        run_id=run_id,
        lora_dir=lora_dir,
        weights=weights,
        sha256=sha,
        steps=run_meta["steps"],
        final_loss=final_loss,
        optimizer=optimizer_name,
        device=device,
        cached=False,
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
