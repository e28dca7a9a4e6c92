"""What a lent GPU does with SD v1.5's architecture (random weights, no download): run by bench/gpu.sh.

* train: ``dermt2im``'s trainer with the paper preset (512 px, batch 2, fp16 mixed precision, 8-bit
  AdamW, gradient checkpointing, rank 4): optimizer steps/s over the loop and peak VRAM
  (``torch.cuda.max_memory_allocated``), and what they make of paper-scale training (2,800 images x
  120 epochs at batch 2 = 168,000 steps).
* generate: the prepared pipeline (fp16, LoRA fused, fused QKV, cached prompt embeddings) at 512 px,
  25 Euler steps, CFG 7, batches of 8: images/s after a warm-up batch, eager and compiled
  (``runtime.generate.compile``), with the compile time and the pixel difference between the two.

    python bench/gpu.py                 # CUDA, the figures above
    python bench/gpu.py --dry-run       # the same code on the tiny model, CPU, 64 px, a few steps
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.generate import make_lora  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def train(tmp: Path, model: str, a) -> dict:
    import torch

    from dermt2im.core.workdir import Workdir
    from tests.train.train_fixtures import make_seed_manifest, tiny_config
    from tests.train.train_fixtures import train as train_lora

    w = Workdir.at(tmp / "train-work")
    make_seed_manifest(w, n_per_class=4, size=a.size, extra_val=False)
    paper = {"mixed_precision": "fp16", "optimizer": "auto", "gradient_checkpointing": True} if not a.dry_run else \
        {"mixed_precision": "no", "optimizer": "adamw", "gradient_checkpointing": True}
    cfg = tiny_config(base_model=model, resolution=a.size, train_batch_size=2, max_steps=a.train_steps, rank=4,
                      lr_warmup_steps=5, learning_rate=1e-4, checkpoint_every=10**6, validation_images_per_class=0,
                      device=a.device, **paper)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    r = train_lora(w, cfg, run_id="gpu")
    meta = json.loads(r.lora_json.read_text())
    rate = meta["steps_per_second"]
    return {"steps": r.steps, "steps_per_s": rate, "peak_vram_mb": _peak_mb(a.device), "optimizer": meta.get("optimizer"),
            "paper_scale_hours": 2800 * 120 / 2 / rate / 3600}


def generate(tmp: Path, model: str, lora: Path, a, compile_: str) -> tuple[dict, np.ndarray]:
    import torch

    from dermt2im.core.runtime import GenerateRuntime
    from dermt2im.diffusion.models import base_model_identity
    from dermt2im.generate.model import LoraChoice, RenderModel
    from dermt2im.generate.pipeline import clear_pipeline_cache, prepared_pipeline, render_batch

    dtype = "fp16" if a.device.startswith("cuda") else "fp32"
    runtime = GenerateRuntime(device=a.device, dtype=dtype, batch_size=8, compile=compile_)
    render_model = RenderModel(model, None, base_model_identity(model), "sks", lora)
    rows = [{"label": "benign", "prompt": f"a dermoscopic image of sks benign skin lesion, case {i % 4}",
             "negative_prompt": "blurry", "sampler": "euler", "steps": a.gen_steps, "guidance_scale": 7.0,
             "lora_scale": 0.8, "seed": i, "width": a.size, "height": a.size} for i in range(8 * (a.batches + 1))]
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    prep = prepared_pipeline(render_model, runtime, LoraChoice(lora, "bench"), 0.8)
    first = render_batch(prep.pipe, prep.switch, rows[:8], prep.prompts)  # warm-up (and compilation)
    _sync(a.device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = list(first)
    for i in range(1, a.batches + 1):
        images += render_batch(prep.pipe, prep.switch, rows[8 * i: 8 * i + 8], prep.prompts)
    _sync(a.device)
    elapsed = time.perf_counter() - t0
    clear_pipeline_cache()
    return ({"images_per_s": 8 * a.batches / elapsed, "load_and_first_batch_s": warm, "peak_vram_mb": _peak_mb(a.device)},
            np.stack(images).astype(int))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, 64 px, a few steps")
    ap.add_argument("--only", choices=["train", "generate"])
    a = ap.parse_args()
    a.device = "cpu" if a.dry_run else "cuda"
    a.size, a.train_steps, a.gen_steps, a.batches = (64, 4, 2, 1) if a.dry_run else (512, 60, 25, 4)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the script on the CPU")
    from dermt2im.diffusion.models import build_sd15_random_pipeline, build_tiny_pipeline

    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "none (dry run on the CPU)"
    print(f"device: {gpu}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        pipe = build_tiny_pipeline(0) if a.dry_run else build_sd15_random_pipeline()
        model = str(tmp / "model")
        pipe.save_pretrained(model, safe_serialization=True)
        lora = make_lora(pipe, tmp / "lora", {})
        del pipe
        if a.only in (None, "train"):
            t = train(tmp, model, a)
            print(f"train ({a.size} px, batch 2, {'paper preset' if not a.dry_run else 'fp32 dry run'}, optimizer "
                  f"{t['optimizer']}): {t['steps_per_s']:.2f} steps/s, peak VRAM {t['peak_vram_mb'] or 0:.0f} MB; "
                  f"paper scale (168,000 steps) {t['paper_scale_hours']:.2f} h")
        if a.only in (None, "generate"):
            results = {}
            for mode in ("off", "on"):
                results[mode], images = generate(tmp, model, lora, a, mode)
                results[mode]["images"] = images
                r = results[mode]
                print(f"generate ({a.size} px, {a.gen_steps} steps, CFG 7, batch 8, compile {mode}): "
                      f"{r['images_per_s']:.2f} images/s, load + first batch {r['load_and_first_batch_s']:.1f} s, "
                      f"peak VRAM {r['peak_vram_mb'] or 0:.0f} MB")
            d = np.abs(results["on"]["images"] - results["off"]["images"])
            print(f"compiled vs eager: mean {d.mean():.2f}, max {d.max()} grey levels; "
                  f"speed-up {results['on']['images_per_s'] / results['off']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
