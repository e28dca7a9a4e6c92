"""Generation throughput: this generator vs a naive loop, on the same plan rows.

* ours: ``dermt2im.generate.stage.render_shard``: batches of ``--batch`` rows sharing settings, one
  generator per image, the LoRA fused at its scale, cached schedulers, PNGs encoded and written
  atomically by writer threads while the next batch renders, manifest upserted per batch;
* naive: one pipeline call per image, the LoRA loaded as an unfused adapter (weighted by the
  scale), a new scheduler per image, a synchronous ``PIL.Image.save`` per image.

Both start from an already-built base pipeline; LoRA loading / fusing is inside the timing.

    python bench/generate.py                      # tiny model, CPU, 64 px, 4 steps, 32 images
    python bench/generate.py --arch sd15 --size 512 --steps 25 --device cuda --n 64 --batch 8
      (SD v1.5's architecture with random weights: speed only, no download)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermt2im.core.config import load_config
from dermt2im.core.workdir import Workdir  # noqa: E402
from dermt2im.diffusion.models import build_tiny_pipeline  # noqa: E402
from dermt2im.generate.model import RenderModel  # noqa: E402
from dermt2im.generate.pipeline import clear_pipeline_cache, render_batch  # noqa: E402
from dermt2im.generate.plan import shards_of, update_plan  # noqa: E402
from dermt2im.generate.samplers import (
    SAMPLERS,  # noqa: E402
    SamplerSwitch,  # noqa: E402
)
from dermt2im.generate.shards import render_shard  # noqa: E402


def sd15_pipeline(device: str, dtype):
    from dermt2im.diffusion.models import build_sd15_random_pipeline

    return build_sd15_random_pipeline().to(device, dtype)


def make_lora(pipe, folder: Path, rank: int = 4) -> Path:
    """A random LoRA for this UNet architecture, saved in diffusers format."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dermt2im.diffusion.lora_files import save_lora_files

    unet = copy.deepcopy(pipe.unet).to("cpu", torch.float32)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save_lora_files(folder, {"unet": get_peft_model_state_dict(unet)}, rank=rank, alpha=rank,
                           kohya=False)["diffusers"]


def naive(pipe, rows, lora: Path, out: Path) -> list[np.ndarray]:
    from PIL.PngImagePlugin import PngInfo

    from dermt2im.diffusion.lora_files import load_lora

    load_lora(pipe, lora, rows[0]["lora_scale"], fuse=False)
    images = []
    for r in rows:
        pipe.scheduler = SAMPLERS[r["sampler"]](pipe.scheduler.config)
        img = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"], num_inference_steps=int(r["steps"]),
                   guidance_scale=float(r["guidance_scale"]), height=int(r["height"]), width=int(r["width"]),
                   generator=torch.Generator("cpu").manual_seed(int(r["seed"]))).images[0]
        info = PngInfo()
        info.add_text("parameters", json.dumps({k: str(v) for k, v in r.items()}))
        img.save(out / f"{r['sample_key']}.png", pnginfo=info)
        images.append(np.asarray(img))
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="images (per class: n / 2)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samplers", default="euler,euler_a,plms")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); default: torch's")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    per_class = max(1, args.n // 2)
    overrides = [
        f"generate.per_class={per_class}", f"generate.shard_size={per_class}", f"generate.width={args.size}",
        f"generate.height={args.size}", f"generate.steps_min={args.steps}", f"generate.steps_max={args.steps}",
        f"runtime.generate.batch_size={args.batch}", f"runtime.generate.writer_threads={args.writers}",
        f"generate.samplers=[{args.samplers}]",
        f"runtime.generate.device={'cuda' if args.device.startswith('cuda') else 'cpu'}",
        f"runtime.generate.dtype={'fp16' if dtype == torch.float16 else 'fp32'}",
    ]
    cfg = load_config("smoke", overrides)
    build = (lambda: sd15_pipeline(args.device, dtype)) if args.arch == "sd15" else \
        (lambda: build_tiny_pipeline(0).to(args.device, dtype))
    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        w = Workdir.at(tmp / "work")
        plan = update_plan(w.plan_manifest, cfg.generate, token=cfg.train.instance_token)
        lora = make_lora(build(), tmp / "lora")
        rows = plan.to_dict("records")
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

        # warm-up (kernels, allocator) on a throwaway pipeline, not timed
        warm = build()
        render_batch(warm, SamplerSwitch(warm), [dict(rows[0])])
        del warm

        pipe = build()
        sync()
        t0 = time.perf_counter()
        model = RenderModel("tiny" if args.arch == "tiny" else "sd15-random", None, "bench", "sks", lora)
        for shard in shards_of(plan):
            render_shard(w, cfg.runtime.generate, model, shard, pipe=pipe)
        sync()
        ours = time.perf_counter() - t0

        pipe_naive = build()
        out = tmp / "naive"
        out.mkdir()
        sync()
        t0 = time.perf_counter()
        naive_images = naive(pipe_naive, rows, lora, out)
        sync()
        slow = time.perf_counter() - t0

        from PIL import Image

        ours_images = [np.asarray(Image.open(w.png_path(r["label"], r["sample_key"])).convert("RGB")) for r in rows]
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(ours_images, naive_images))
        n = len(rows)
        print(f"setup: {args.arch} model, {args.device} ({str(dtype).removeprefix('torch.')}), {n} images "
              f"{args.size}x{args.size}, {args.steps} steps, samplers {args.samplers}, batch {args.batch}, "
              f"{args.writers} writer threads, torch threads {torch.get_num_threads()}")
        print(f"ours  (batched, fused LoRA, threaded writer): {n / ours:8.2f} images/s  ({ours:.2f} s)")
        print(f"naive (1 call/image, unfused LoRA, sync save): {n / slow:8.2f} images/s  ({slow:.2f} s)")
        print(f"ratio: {slow / ours:.2f}x")
        print(f"max abs pixel difference ours vs naive: {diff} (fused vs adapter LoRA, batched vs single)")
    finally:
        clear_pipeline_cache()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
