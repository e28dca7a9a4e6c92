"""The DreamBooth + LoRA training loop: adapters, one optimizer step (micro-batches, min-SNR
weighting, prior preservation, clipping), CUDA out-of-memory recovery and the loop over steps.

Every optimizer step sees ``train_batch_size * gradient_accumulation_steps`` examples, processed in
micro-batches of ``train_batch_size``; the loss is the example-weighted mean over micro-batches, so
halving the micro-batch after a CUDA out-of-memory error (and doubling accumulation) computes the
same update. All randomness of a step is drawn up front from the run's CPU generator, whose state is
checkpointed: resuming gives the same weights as not stopping.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from dermt2im.core.specs import TrainConfig
from dermt2im.train.checkpoints import (
    _load_checkpoint,
    _save_checkpoint,
    latest_checkpoint,
    resume_point,
)
from dermt2im.train.data import _build_data
from dermt2im.train.inputs import TrainingImage, planned_steps
from dermt2im.train.outputs import _flush_metrics, _log_step
from dermt2im.train.state import LoraRun, StepBatch, TrainContext, TrainingError

LOG = logging.getLogger(__name__)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MAX_CONSECUTIVE_SKIPS = 20


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
    """``adamw8bit`` where asked (bitsandbytes 0.50 runs 8-bit AdamW on CUDA and on a CPU) or where
    ``auto`` meets CUDA; torch AdamW otherwise. Nothing asked for is swapped silently: a bitsandbytes
    that cannot step on ``device`` (missing, or a build without its kernels) is a warning naming why."""
    if train.optimizer == "adamw" or (train.optimizer == "auto" and not device.startswith("cuda")):
        return "adamw"
    try:
        _probe_adamw8bit(device)
        return "adamw8bit"
    except Exception as err:  # noqa: BLE001 - whatever bitsandbytes raises, the run must say it
        if train.optimizer == "adamw8bit":
            warnings.append(f"adamw8bit requested but bitsandbytes is unusable on {device} ({err}); using torch AdamW")
        return "adamw"


def _probe_adamw8bit(device: str) -> None:
    """One 8-bit AdamW step on a parameter big enough to get 8-bit state (bitsandbytes keeps 32-bit
    state below 4096 elements), so that an unusable build fails here, before any model loads."""
    import bitsandbytes as bnb
    import torch

    p = torch.nn.Parameter(torch.zeros(4096, device=device))
    p.grad = torch.ones_like(p)
    bnb.optim.AdamW8bit([p], lr=1e-3).step()


def _make_optimizer(name: str, groups: list[dict], train: TrainConfig, device: str = "cpu"):
    """8-bit AdamW (bitsandbytes) or torch's AdamW, fused into one kernel on CUDA (the same update)."""
    import torch

    kwargs = {"betas": (0.9, 0.999), "weight_decay": train.adam_weight_decay, "eps": 1e-8}
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, fused=device.startswith("cuda"))


def _add_adapters(ctx: TrainContext, name: str, seed: int) -> list:
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


def _choose_unet(ctx: TrainContext) -> None:
    """The UNet the loop calls: compiled (forward and backward) where ``runtime.train.compile`` says
    so, once its adapters are in place; it shares every parameter with ``ctx.pipe.unet``."""
    from dermt2im.diffusion import accel

    ctx.unet = ctx.pipe.unet
    if accel.wanted(ctx.runtime.compile, ctx.device.type):
        ctx.unet = accel.compiled(ctx.pipe.unet, what="UNet (training)")


def _remove_adapters(ctx: TrainContext, name: str) -> None:
    ctx.pipe.unet.delete_adapters(name)
    if ctx.train.train_text_encoder:
        ctx.pipe.text_encoder.delete_adapter(name)


def _lora_state_dicts(ctx: TrainContext, name: str) -> dict[str, dict]:
    from peft.utils import get_peft_model_state_dict

    out = {"unet": get_peft_model_state_dict(ctx.pipe.unet, adapter_name=name)}
    if ctx.train.train_text_encoder:
        out["text_encoder"] = get_peft_model_state_dict(ctx.pipe.text_encoder, adapter_name=name)
    return out


def _prepare_batch(ctx: TrainContext, run: LoraRun, step: int) -> StepBatch:
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
    batch = StepBatch(step, idx, latents, noise, ts, [run.data.labels[i] for i in idx])
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


def _conditioning(ctx: TrainContext, embeds: dict, ids: dict, labels: list[str]):
    import torch

    if ctx.train.train_text_encoder:
        return ctx.pipe.text_encoder(torch.cat([ids[label] for label in labels]))[0]
    return torch.cat([embeds[label] for label in labels])


def _mse_per_example(ctx: TrainContext, latents, noise, ts, cond):
    import torch.nn.functional as F

    sched = ctx.noise_scheduler
    noisy = sched.add_noise(latents, noise, ts)
    with ctx.accelerator.autocast():
        pred = ctx.denoiser(noisy.to(ctx.weight_dtype), ts, cond.to(ctx.weight_dtype)).sample
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, ts)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def _step_loss(ctx: TrainContext, run: LoraRun, batch: StepBatch, sl: slice):
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


def _forward_backward(ctx: TrainContext, run: LoraRun, batch: StepBatch) -> float:
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


def _optimizer_step(ctx: TrainContext, run: LoraRun, batch: StepBatch) -> float:
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


def _start_run(ctx: TrainContext, images: dict[str, list[TrainingImage]], name: str, labels: list[str],
               out_dir: Path, seed: int, resume: str | None) -> LoraRun:
    """A LoRA ready to train: cached data, fresh adapters, optimizer, schedule, and the checkpoint to
    resume from (``"latest"``, a folder, or None to start over)."""
    import torch
    from diffusers.optimization import get_scheduler

    t = ctx.train
    data = _build_data(ctx, images, labels)
    total = planned_steps(t, len(data.labels))
    params = _add_adapters(ctx, name, seed)
    _choose_unet(ctx)
    ctx.pipe.unet.train()
    if t.train_text_encoder:
        ctx.pipe.text_encoder.train()
    unet_params = [p for p in ctx.pipe.unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": t.learning_rate}]
    if t.train_text_encoder:
        te_params = [p for p in ctx.pipe.text_encoder.parameters() if p.requires_grad]
        groups.append({"params": te_params, "lr": t.text_encoder_learning_rate})
    optimizer = _make_optimizer(ctx.optimizer_name, groups, t, ctx.device.type)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=total)
    optimizer, lr_scheduler = ctx.accelerator.prepare(optimizer, lr_scheduler)
    run = LoraRun(name=name, out_dir=out_dir, data=data, total=total, params=params, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, generator=torch.Generator("cpu").manual_seed(seed),
                  micro_batch=t.train_batch_size)
    if resume is None:
        shutil.rmtree(run.ckpt_root, ignore_errors=True)
        return run
    ckpt, note = resume_point(run.ckpt_root, resume)
    if note is not None:
        LOG.warning("%s: %s", name, note)
        ctx.warnings.append(f"{name}: {note}")
    if ckpt is not None:
        _load_checkpoint(ctx, run, ckpt)
    else:
        LOG.info("no checkpoint under %s: starting %s from step 0", run.ckpt_root, name)
    return run


def _skip_or_stop(ctx: TrainContext, run: LoraRun, step: int, value: float, skips: int) -> None:
    """A non-finite loss at ``step``: stop (``nan_policy: stop``, or too many in a row) or skip it."""
    where = f"step {step} of {run.total}" + ("" if run.name == "all" else f" (LoRA for {run.name})")
    if ctx.train.nan_policy == "stop":
        last = latest_checkpoint(run.ckpt_root)
        raise TrainingError(
            f"loss is {value} at {where}; stopped, no LoRA written"
            + (f" (last good checkpoint: {last})" if last else "")
            + ". Lower the learning rate, disable fp16, or set train.nan_policy: skip."
        )
    if skips >= MAX_CONSECUTIVE_SKIPS:
        raise TrainingError(f"{skips} consecutive non-finite losses up to {where}; stopped, no LoRA written")
    run.skipped.append(step)
    msg = f"loss is {value} at {where}; step skipped (nan_policy: skip)"
    LOG.warning(msg)
    ctx.warnings.append(msg)


def _train_one(ctx: TrainContext, images: dict[str, list[TrainingImage]], name: str, labels: list[str],
               out_dir: Path, seed: int, resume: str | None,
               progress: Callable[[int, float], None] | None) -> LoraRun:
    """Train one LoRA (the shared one, or one class's) to its planned number of steps."""
    import torch

    t = ctx.train
    run = _start_run(ctx, images, name, labels, out_dir, seed, resume)
    LOG.info(
        "training %s: %d images, %d steps (%d per step, micro-batch %d), optimizer %s, precision %s, device %s",
        name, len(run.data.labels), run.total, t.train_batch_size * t.gradient_accumulation_steps,
        run.micro_batch, ctx.optimizer_name, ctx.mixed_precision, ctx.device,
    )
    skips = 0
    run.start_step = run.step
    t0 = time.perf_counter()
    while run.step < run.total:
        step = run.step + 1
        batch = _prepare_batch(ctx, run, step)
        lr = float(run.lr_scheduler.get_last_lr()[0])
        try:
            loss = _optimizer_step(ctx, run, batch)
            skips = 0
        except _NonFinite as bad:
            run.optimizer.zero_grad(set_to_none=True)
            skips += 1
            _skip_or_stop(ctx, run, step, bad.value, skips)
            loss = float("nan")
        run.step = step
        run.losses.append((step, loss, lr))
        _log_step(ctx, name, step, loss, lr)
        if progress is not None:
            progress(step, loss)
        if step % ctx.runtime.checkpoint_every == 0 and step < run.total:
            _save_checkpoint(ctx, run)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    run.loop_seconds = time.perf_counter() - t0
    _flush_metrics(ctx)
    return run
