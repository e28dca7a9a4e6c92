"""Benchmark: dermt2im's LoRA trainer against a plain reference loop.

The reference does what diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` does every
step without ``--cache_latents``: VAE-encode the pixel batch, run the text encoder on the prompt
ids, add noise, UNet forward / backward, clip, AdamW, LR scheduler. The trainer caches the VAE
posterior and the text embeddings once before its loop. Both train the same LoRA (same rank,
targets, optimizer, batch, resolution) on the same tiny model and images; pixels for the reference
are decoded once up front, so it is not penalised for image decoding.

Each variant runs in its own process. steps/s is measured over the training loop only; peak memory
is CUDA ``max_memory_allocated`` on a GPU, else the process's peak resident set above its size just
before the run (sampled every 2 ms), model loading and caching included for both; the MLflow store
and matplotlib are initialised and the same libraries imported in both processes before that baseline.

    python bench/train.py [--steps 60] [--resolution 64] [--batch 2] [--threads 1] [--device cpu]
    python bench/train.py --arch sd15 --paper --device cuda --resolution 512 --steps 50   # paper preset on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    def __init__(self) -> None:
        self.base = _rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def above_base(self) -> float:
        return self.peak - self.base


def _setup(tmp: Path, args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    import torch

    torch.set_num_threads(args.threads)
    from dermt2im.core.workdir import Workdir
    from tests.train.train_fixtures import make_seed_manifest, tiny_config

    w = Workdir.at(tmp / "work")
    make_seed_manifest(w, n_per_class=args.images, size=args.resolution, extra_val=False)
    base = {}
    if args.arch == "sd15":  # SD v1.5's architecture, random weights, loaded from a local diffusers folder
        from dermt2im.diffusion.models import build_sd15_random_pipeline

        folder = tmp / "sd15-random"
        build_sd15_random_pipeline().save_pretrained(folder, safe_serialization=True)
        base = {"base_model": str(folder)}
    paper = {"optimizer": "auto", "mixed_precision": "fp16", "gradient_checkpointing": True} if args.paper else \
        {"optimizer": "adamw", "mixed_precision": "no" if args.device == "cpu" else "fp16"}
    cfg = tiny_config(
        resolution=args.resolution, train_batch_size=args.batch, max_steps=args.steps, lr_warmup_steps=5,
        learning_rate=1e-3, checkpoint_every=10**6, validation_images_per_class=0, device=args.device,
        **base, **paper,
    )
    # One-off costs outside the comparison, paid by both before the RSS baseline: imports (a few
    # hundred MB of Python modules), the MLflow store (SQLite schema migrations), matplotlib's fonts.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from diffusers.optimization import get_scheduler  # noqa: F401
    from diffusers.training_utils import compute_snr  # noqa: F401
    from matplotlib.figure import Figure

    from dermt2im.core.tracking import open_tracker

    open_tracker(w, cfg.tracking, experiment=f"{cfg.tracking.experiment}-train")
    Figure().add_subplot(1, 1, 1).plot([0, 1])
    return w, cfg


def _peak_gpu_mb():
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_trainer(tmp: Path, args) -> dict:
    w, cfg = _setup(tmp, args)
    import mlflow  # noqa: F401 - imported before the baseline, like everything else the trainer uses
    import torch

    from tests.train.train_fixtures import train

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with _PeakRss() as rss:
        r = train(w, cfg, run_id="bench")
    meta = json.loads(r.lora_json.read_text())
    return {"steps": r.steps, "steps_per_s": meta["steps_per_second"], "peak_rss_mb": rss.above_base,
            "peak_gpu_mb": _peak_gpu_mb(), "final_loss": r.final_loss}


def run_reference(tmp: Path, args) -> dict:
    """diffusers' DreamBooth-LoRA step, inline: no latent or text-embedding cache."""
    w, cfg = _setup(tmp, args)
    import mlflow  # noqa: F401 - same imports as the trainer, so the RSS baselines match
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from dermt2im.diffusion.models import load_pipeline
    from dermt2im.train.data import _load_rgb
    from dermt2im.train.inputs import instance_prompt, training_images

    t = cfg.train
    device = torch.device(args.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with _PeakRss() as rss:
        pipe = load_pipeline(t.base_model, device="cpu")
        unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        for m in (unet, vae, te):
            m.requires_grad_(False)
            m.to(device)
        torch.manual_seed(t.seed)
        unet.add_adapter(LoraConfig(r=t.rank, lora_alpha=t.alpha, target_modules=list(t.target_modules),
                                    init_lora_weights="gaussian"))
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(0.9, 0.999), weight_decay=t.adam_weight_decay, eps=1e-8)
        sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.lr_warmup_steps, num_training_steps=args.steps)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        images = training_images(w)
        items = [i for label in sorted(images) for i in images[label]]
        pixels = torch.stack([_load_rgb(i.path, t.resolution) for i in items])
        ids = {label: tok([instance_prompt(t, label)], padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt").input_ids for label in images}
        labels = [i.label for i in items]
        g = torch.Generator().manual_seed(t.seed)
        unet.train()
        losses = []
        start = time.perf_counter()
        for step in range(args.steps):
            sel = torch.randint(0, len(items), (t.train_batch_size,), generator=g).tolist()
            x = pixels[sel].to(device)
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            enc = te(torch.cat([ids[labels[i]] for i in sel]).to(device))[0]
            noise = torch.randn_like(latents)
            ts = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            pred = unet(noise_scheduler.add_noise(latents, noise, ts), ts, enc).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"steps": args.steps, "steps_per_s": args.steps / elapsed, "peak_rss_mb": rss.above_base,
            "peak_gpu_mb": _peak_gpu_mb(), "final_loss": sum(losses[-10:]) / len(losses[-10:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--images", type=int, default=6, help="training images per class")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for both)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", choices=["tiny", "sd15"], default="tiny",
                    help="sd15: Stable Diffusion v1.5's architecture with random weights (for GPU figures)")
    ap.add_argument("--paper", action="store_true",
                    help="the trainer with the paper preset's settings: fp16, 8-bit AdamW, gradient checkpointing (CUDA)")
    ap.add_argument("--variant", choices=["trainer", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.variant:
        with tempfile.TemporaryDirectory(prefix=f"bench-train-{args.variant}-") as tmp:
            fn = run_trainer if args.variant == "trainer" else run_reference
            print("RESULT " + json.dumps(fn(Path(tmp), args)))
        return

    results = {}
    for variant in ("reference", "trainer"):
        cmd = [sys.executable, __file__, "--variant", variant]
        for k, v in vars(args).items():
            if k == "variant" or v is False:
                continue
            cmd.append(f"--{k}" if v is True else f"--{k}={v}")
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{variant} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[variant] = json.loads(line[-1][7:])

    ref, tr = results["reference"], results["trainer"]
    mem = "peak_gpu_mb" if ref["peak_gpu_mb"] is not None else "peak_rss_mb"
    print(f"{args.arch} SD{' (paper settings)' if args.paper else ''}, {args.resolution}px, batch {args.batch}, {args.steps} steps, {2 * args.images} images, "
          f"device {args.device}, {args.threads} thread(s)")
    print(f"{'':<34}{'steps/s':>10}{mem + ' (MB)':>22}{'final loss':>12}")
    print(f"{'reference (encode every step)':<34}{ref['steps_per_s']:>10.2f}{ref[mem]:>22.1f}{ref['final_loss']:>12.4f}")
    print(f"{'dermt2im train_lora (cached)':<34}{tr['steps_per_s']:>10.2f}{tr[mem]:>22.1f}{tr['final_loss']:>12.4f}")
    print(f"ratio trainer / reference: steps/s x{tr['steps_per_s'] / ref['steps_per_s']:.2f}, "
          f"peak memory x{tr[mem] / max(ref[mem], 1e-9):.2f}")


if __name__ == "__main__":
    main()
