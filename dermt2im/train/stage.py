"""DreamBooth + LoRA fine-tuning of Stable Diffusion v1.x on the accepted training-split seeds.

The steps of diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` as small functions over a
typed config (paper, Table II): instance prompts per class; one LoRA for both classes (class in the
prompt) or one per class; optional prior preservation with class images from the base model; PEFT
LoRA on the UNet attention projections (optionally the text encoder); frozen VAE and text encoder;
DDPM noise; 8-bit AdamW (bitsandbytes, on CUDA and on a CPU) or torch AdamW; accelerate mixed precision on CUDA with LoRA
parameters kept in fp32; gradient checkpointing; constant-with-warmup; clipping; min-SNR weighting
and offset noise.

Where things are: ``inputs`` (training images, prompts, checks, the key), ``data`` (latents and text
embeddings cached before the loop), ``loop`` (one step, the loop), ``checkpoints``, ``outputs``
(loss curve, weight digests, metrics), ``results`` (LoRA files, ``lora.json``, finished runs).

Determinism: the data order of epoch ``e`` is a permutation drawn from ``(seed, e)``; noise,
timesteps and latent samples come from one CPU generator whose state is checkpointed. A run is a
pure function of its inputs on CPU: the same config gives the same weights, and resuming from a
checkpoint gives the same weights as not stopping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermt2im.core import identity
from dermt2im.core.fileio import sha256_file
from dermt2im.core.progress import task as progress_task
from dermt2im.core.runtime import TrackingConfig, TrainRuntime
from dermt2im.core.specs import LABELS, TrainConfig
from dermt2im.core.tracking import open_tracker
from dermt2im.core.workdir import Workdir
from dermt2im.diffusion import lora_files as lora_io
from dermt2im.train.inputs import (
    TrainingImage,
    check_config,
    check_inputs,
    git_revision,
    instance_prompt,
    planned_steps,
    seeds_digest,
    train_key,
    trainer_code,
)
from dermt2im.train.loop import (
    _accelerator,
    _choose_optimizer,
    _remove_adapters,
    _train_one,
)
from dermt2im.train.outputs import _final_loss, _flat_params, _write_loss_curve
from dermt2im.train.results import _finish_one
from dermt2im.train.runs import (
    TrainResult,
    base_identity,
    current_key,
    default_run_id,
    record_run,
    result_summary,
    trained_for,
)
from dermt2im.train.state import VALIDATION, Preview, TrainContext, TrainingError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    """Everything decided before a model loads: inputs, key, folder, device, precision, optimizer."""

    images: dict[str, list[TrainingImage]]
    key: str
    run_id: str
    lora_dir: Path
    device: str
    mixed_precision: str
    optimizer: str
    groups: list[tuple[str, list[str]]]  # (LoRA name, its labels): [("all", both)] or one per class
    warnings: list[str]
    header_meta: dict[str, Any]


def plan_training(workdir: Workdir, spec: TrainConfig, runtime: TrainRuntime, run_id: str | None = None) -> TrainingPlan:
    """Check everything that can be checked without a model and fix the run's key and folder."""
    import torch

    from dermt2im.diffusion.models import resolve_device

    warnings = check_config(spec, runtime)
    images = check_inputs(workdir)
    base_id = base_identity(spec)
    seeds = seeds_digest(images)
    key = train_key(seeds, spec, base_id)
    run_id = run_id or default_run_id(key)
    if not run_id or any(c in run_id for c in "/\\") or run_id.startswith("."):
        raise TrainingError(f"run_id {run_id!r} must be a plain folder name")
    device = resolve_device(runtime.device)
    mixed = _mixed_precision(spec.mixed_precision, device, warnings)
    if mixed == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        warnings.append("bf16 is not supported by this GPU; using fp16")
        mixed = "fp16"
    optimizer = _choose_optimizer(spec, device, warnings)
    groups = [(label, [label]) for label in LABELS] if spec.lora_per_class else [("all", list(LABELS))]
    header_meta = {
        "run_id": run_id, "cache_key": key, "trainer_code": trainer_code(),
        "base_model": spec.base_model, "revision": spec.revision, "base_model_identity": base_id,
        "base_config": spec.base_config, "resolved_revision": _resolved_revision(spec),
        "instance_token": spec.instance_token, "seeds_digest": seeds, "config": spec.model_dump(mode="json"),
        "seed": spec.seed, "git_revision": git_revision(), "library_versions": identity.library_versions(),
        "training_images": {label: len(images[label]) for label in LABELS},
    }
    return TrainingPlan(images, key, run_id, workdir.lora / run_id, device, mixed, optimizer, groups, warnings,
                        header_meta)


def _mixed_precision(asked: str, device: str, warnings: list[str]) -> str:
    """The precision training runs in: as asked on CUDA. On a CPU, half precision only where it is
    native (AVX512-BF16, AMX; elsewhere oneDNN emulates it, slower than fp32), and as bf16: a CPU has
    no fast fp16 kernels, and accelerate runs fp16 on a CPU without autocast or a grad scaler. So
    fp16 asked on such a CPU trains in bf16 autocast, the nearest it has, and says so."""
    if device.startswith("cuda") or asked == "no":
        return asked
    from dermt2im.diffusion.accel import native_bf16_cpu

    if native_bf16_cpu():
        if asked == "fp16":
            warnings.append(f"mixed_precision fp16 needs CUDA; training in bf16 autocast on {device} (native bf16)")
        return "bf16"
    needs = "CUDA" if asked == "fp16" else "CUDA or a CPU with native bf16 (AVX512-BF16, AMX)"
    warnings.append(f"mixed_precision {asked} needs {needs}; training in fp32 on {device}")
    return "no"


def _resolved_revision(spec: TrainConfig) -> str | None:
    """The hub commit ``train.revision`` stands for, as the local cache knows it (generation then loads
    exactly that commit; None for local models or an uncached one)."""
    from dermt2im.diffusion.models import resolved_revision

    return resolved_revision(spec.base_model, spec.revision)


def load_models(plan: TrainingPlan, spec: TrainConfig, runtime: TrainRuntime, preview: Preview) -> TrainContext:
    """The pipeline on the device: frozen UNet, VAE and text encoder in the training precision."""
    import torch
    from diffusers import DDPMScheduler

    from dermt2im.diffusion.models import load_pipeline

    from dermt2im.diffusion import accel

    accelerator = _accelerator(plan.device, plan.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.mixed_precision, torch.float32)
    pipe = load_pipeline(spec.base_model, spec.revision, base_config=spec.base_config, device="cpu")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.to(accelerator.device, **cast)
    if runtime.tf32 and accel.enable_tf32(plan.device):
        LOG.info("TF32 matmuls and convolutions on")
    if accel.wanted(runtime.channels_last, plan.device):
        pipe.unet.to(memory_format=torch.channels_last)
    if runtime.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if spec.train_text_encoder:
            te = pipe.text_encoder
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    return TrainContext(
        train=spec, runtime=runtime, preview=preview, run_id=plan.run_id, key=plan.key, lora_dir=plan.lora_dir,
        device=accelerator.device, accelerator=accelerator, weight_dtype=weight_dtype,
        mixed_precision=plan.mixed_precision, optimizer_name=plan.optimizer, pipe=pipe,
        noise_scheduler=noise_scheduler, warnings=plan.warnings, header_meta=plan.header_meta,
    )


def _train_groups(ctx: TrainContext, plan: TrainingPlan, resume: str | None,
                  progress: Callable[[int, int, float], None] | None) -> tuple[list, dict[str, dict[str, Any]]]:
    """Train every LoRA of the plan (one shared, or one per class) and write each one's files."""
    planned = {name: planned_steps(ctx.train, sum(len(plan.images[lab]) for lab in labs)) for name, labs in plan.groups}
    grand_total = sum(planned.values())
    runs, finished, offset = [], {}, 0
    with progress_task(f"train LoRA {plan.run_id}", total=grand_total, unit="steps") as bar:
        for i, (name, labels) in enumerate(plan.groups):
            out_dir = plan.lora_dir if name == "all" else plan.lora_dir / name

            def _progress(step: int, loss: float, _offset: int = offset) -> None:
                bar.update(_offset + step, note=f"loss {loss:.4f}")
                if progress is not None:
                    progress(_offset + step, grand_total, loss)

            run = _train_one(ctx, plan.images, name, labels, out_dir, ctx.train.seed + i, resume, _progress)
            runs.append(run)
            ctx.pipe.unet.eval()
            finished[name] = _finish_one(ctx, run, labels)
            ctx.tracker.log_metrics(ctx.tracker_run,
                                    {f"final_loss{'' if name == 'all' else '_' + name}": _final_loss(run)})
            if ctx.train.lora_per_class:
                _remove_adapters(ctx, name)
            offset += run.total
    return runs, finished

def _peak_memory(device: str) -> tuple[float, str]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _write_run(ctx: TrainContext, plan: TrainingPlan, runs: list, finished: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The loss curve and ``lora.json`` of a finished training; returns what ``lora.json`` holds."""
    loop_time = sum(r.loop_seconds for r in runs)
    steps_done = sum(r.step - r.start_step for r in runs)
    steps_per_s = steps_done / loop_time if loop_time > 0 else float("nan")
    peak_mb, peak_kind = _peak_memory(plan.device)
    csv, png = _write_loss_curve(runs, plan.lora_dir)

    def rel(p: Path) -> str:
        return p.relative_to(plan.lora_dir).as_posix()

    weights = {name: f["paths"]["diffusers"] for name, f in finished.items()}
    kohya = {name: f["paths"]["kohya"] for name, f in finished.items()}
    meta = {
        **plan.header_meta,
        "layout": "per_class" if ctx.train.lora_per_class else "shared",
        "weights": {k: rel(p) for k, p in weights.items()},
        "kohya": {k: rel(p) for k, p in kohya.items()},
        "sha256": {name: sha256_file(p) for name, p in weights.items()},
        "kohya_sha256": {name: sha256_file(p) for name, p in kohya.items()},
        "weights_sha256": {name: f["meta"]["weights_sha256"] for name, f in finished.items()},
        "instance_prompts": {label: instance_prompt(ctx.train, label) for label in LABELS},
        "steps": sum(r.step for r in runs),
        "steps_per_lora": {r.name: r.step for r in runs},
        "final_loss": float(sum(_final_loss(r) for r in runs) / len(runs)),
        "optimizer": plan.optimizer,
        "device": plan.device,
        "mixed_precision": plan.mixed_precision,
        "micro_batch": {r.name: r.micro_batch for r in runs},
        "skipped_steps": {r.name: r.skipped for r in runs},
        "oom_events": {r.name: r.oom_events for r in runs},
        "warnings": ctx.warnings,
        "loss_csv": rel(csv),
        "loss_png": rel(png),
        "validation_images": [rel(p) for f in finished.values() for p in f["validation"]],
        "steps_per_second": steps_per_s,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "mlflow_run_id": ctx.tracker_run,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta_path = lora_io.write_run_meta(plan.lora_dir, meta)
    tracker, run = ctx.tracker, ctx.tracker_run
    tracker.log_metrics(run, {"steps_per_second": steps_per_s, "peak_memory_mb": peak_mb,
                              "final_loss": meta["final_loss"]})
    for p in [meta_path, csv, png, *weights.values(), *kohya.values()]:
        tracker.log_file(run, p, str(Path(rel(p)).parent) if rel(p).count("/") else None)
    for f in finished.values():
        for p in f["validation"]:
            tracker.log_file(run, p, VALIDATION)
    if ctx.warnings:
        tracker.log_text(run, "\n".join(ctx.warnings), "warnings.txt")
    return meta


def train_lora(
    workdir: Workdir,
    spec: TrainConfig,
    runtime: TrainRuntime,
    *,
    tracking: TrackingConfig,
    preview: Preview = Preview(),
    resume: str | None = None,
    run_id: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    force: bool = False,
) -> TrainResult:
    """Train the LoRA(s) of ``spec`` on the workdir's training seeds into ``W/lora/<run_id>/``.

    ``resume``: None starts fresh (old checkpoints of the run are removed); "latest" continues from
    the newest checkpoint when there is one; a path continues from that checkpoint. ``run_id``
    defaults to a short hash of the inputs, so the same inputs land in the same folder, and a
    finished folder for the same inputs is returned at once (``cached=True``) unless ``force``.
    ``progress(step, total, loss)`` is called after every optimizer step (steps counted over all
    LoRAs of the call).
    """
    import torch

    plan = plan_training(workdir, spec, runtime, run_id)
    if not force:
        cached = trained_for(workdir.lora, plan.key, run_id)
        if cached is not None:
            LOG.info("LoRA for these inputs already trained: %s", cached.lora_dir)
            record_run(workdir.lora, plan.key, cached.run_id)
            return cached
    elif (plan.lora_dir / lora_io.RUN_META).is_file():
        (plan.lora_dir / lora_io.RUN_META).unlink()
    for w in plan.warnings:
        LOG.warning(w)
    ctx = load_models(plan, spec, runtime, preview)
    plan.lora_dir.mkdir(parents=True, exist_ok=True)
    ctx.tracker = open_tracker(workdir, tracking, experiment=f"{tracking.experiment}-train")
    ctx.tracker_run = ctx.tracker.start(f"train-{plan.run_id}", tags={
        "dermt2im.stage": "train", "dermt2im.run_id": plan.run_id, "dermt2im.cache_key": plan.key})
    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        ctx.tracker.log_params(ctx.tracker_run, {
            **_flat_params(spec), "device": plan.device, "optimizer_used": plan.optimizer,
            "mixed_precision_used": plan.mixed_precision, "base_model_identity": plan.header_meta["base_model_identity"],
            "seeds_digest": plan.header_meta["seeds_digest"], "resume": str(resume),
            **{f"images_{label}": len(plan.images[label]) for label in LABELS}})
        runs, finished = _train_groups(ctx, plan, resume, progress)
        meta = _write_run(ctx, plan, runs, finished)
    except BaseException:
        ctx.tracker.finish(ctx.tracker_run, "FAILED")
        raise
    ctx.tracker.finish(ctx.tracker_run)
    record_run(workdir.lora, plan.key, plan.run_id)
    return TrainResult(
        run_id=plan.run_id, lora_dir=plan.lora_dir, weights={n: f["paths"]["diffusers"] for n, f in finished.items()},
        sha256=meta["sha256"], steps=meta["steps"], final_loss=meta["final_loss"], optimizer=plan.optimizer,
        device=plan.device, cached=False, kohya={n: f["paths"]["kohya"] for n, f in finished.items()},
        cache_key=plan.key,
    )


# --------------------------------------------------------------------------------------------------
# the stage


class TrainStage:
    """Train: one unit, the LoRA run of these inputs; done when the run folder recorded for the unit's
    key (``runs``: ``W/lora/runs.json``, or ``--run-id``'s folder) holds a ``lora.json`` of that key
    and every weights file matches its sha256."""

    name = "train"
    tags = ("gpu",)  # its task runs count against Prefect's `gpu` concurrency limit

    def __init__(self, workdir: Workdir, spec: TrainConfig, runtime: TrainRuntime, *, tracking: TrackingConfig,
                 preview: Preview = Preview(), resume: str | None = "latest", run_id: str | None = None,
                 progress: Callable[[int, int, float], None] | None = None) -> None:
        self.workdir, self.spec, self.runtime, self.tracking = workdir, spec, runtime, tracking
        self.preview, self.resume, self.run_id, self.progress = preview, resume, run_id, progress

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any, *, resume: str | None = "latest", run_id: str | None = None) -> "TrainStage":
        """The stage as a factory config (``dermt2im.core.config.FactoryConfig``) sets it up."""
        return cls(workdir, cfg.train, cfg.runtime.train, tracking=cfg.tracking, preview=Preview.of(cfg.generate),
                   resume=resume, run_id=run_id)

    def units(self) -> list[str]:
        return ["lora"]

    def describe(self, unit: str) -> str:
        return f"train LoRA on {self.spec.base_model}"

    def key(self, unit: str) -> str:
        return current_key(self.workdir, self.spec)

    def finished(self, unit: str, key: str) -> dict[str, Any] | None:
        try:
            found = trained_for(self.workdir.lora, key, self.run_id)
        except TrainingError:
            return None  # the folder named holds another run: run() says so
        return result_summary(found) if found is not None else None

    def run(self, unit: str, key: str) -> dict[str, Any]:
        result = train_lora(self.workdir, self.spec, self.runtime, tracking=self.tracking, preview=self.preview,
                            resume=self.resume, run_id=self.run_id, progress=self.progress)
        return result_summary(result)

    def close(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return results[0]
