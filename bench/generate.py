"""Generation: the whole ``dermt2im generate`` command against the plain loop a user writes.

The peer is ``bench/peers/plain_generate.py``: StableDiffusionPipeline from the local folder, the
LoRA loaded, fused and unloaded, batches of 8, one seeded generator per image, ``image.save``. Both
render the same plan rows (prompts, negative prompts, seeds, sampler, steps, guidance, LoRA scale)
from the same local model folder and LoRA file, each as a whole process as a user waits for it:
``dermt2im generate`` also plans, writes PNG metadata and manifests, and runs the quality gate and
memorisation audit. Runs are interleaved (peer, ours, peer, ours ...), one torch thread each unless
``--threads`` says otherwise. Printed: wall time min / median / max, the ratio of medians (above 1:
ours is faster), each process's peak resident memory, and the pixel difference between the two
sets of images (ours renders in bf16 on a CPU with native bf16, the plain loop in fp32 as a user
writes it; ``--dtype fp32`` makes ours fp32 too).

    python bench/generate.py                                   # tiny model, 64 px, 64 images, 6 Euler steps
    python bench/generate.py --arch sd15 --size 128 --n 16 --steps 10
    python bench/generate.py --arch sd15 --size 512 --n 64 --steps 25 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_lora(pipe, folder: Path, meta: dict, rank: int = 4) -> Path:
    """A random LoRA for this UNet, saved in diffusers format with the base model in its header."""
    import copy

    import torch
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
                           metadata=meta, kohya=False)["diffusers"]


def overrides(args, model: str) -> list[str]:
    per_class = max(1, args.n // 2)
    dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "auto")
    return [f"train.base_model={model}", f"generate.per_class={per_class}", f"generate.shard_size={per_class}",
            f"generate.width={args.size}", f"generate.height={args.size}", f"generate.steps_min={args.steps}",
            f"generate.steps_max={args.steps}", f"generate.samplers=[{args.sampler}]",
            f"runtime.generate.batch_size={args.batch}", f"runtime.generate.device={args.device}",
            f"runtime.generate.dtype={dtype}"]


def prepare(tmp: Path, args) -> tuple[str, Path, list[dict]]:
    """The model folder, the LoRA and the plan rows both render."""
    import torch

    from dermt2im.core.config import load_config
    from dermt2im.diffusion.models import base_model_identity, build_sd15_random_pipeline, build_tiny_pipeline
    from dermt2im.generate.plan import update_plan

    pipe = build_sd15_random_pipeline() if args.arch == "sd15" else build_tiny_pipeline(0)
    folder = tmp / f"{args.arch}-model"
    pipe.save_pretrained(folder, safe_serialization=True)
    meta = {"base_model": str(folder), "base_model_identity": base_model_identity(str(folder)), "instance_token": "sks"}
    lora = make_lora(pipe, tmp / "lora", meta)
    del pipe
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides(args, str(folder)))
    rows = update_plan(tmp / "plan.parquet", cfg.generate, token=cfg.train.instance_token).to_dict("records")
    return str(folder), lora, rows


def peer_job(args, model: str, lora: Path, rows: list[dict]) -> dict:
    first = rows[0]
    for col in ("sampler", "steps", "guidance_scale", "lora_scale", "width", "height"):
        if any(r[col] != first[col] for r in rows):
            sys.exit(f"the plain loop takes one {col}; the plan has several")
    return {"base_model": model, "lora": str(lora), "lora_scale": float(first["lora_scale"]),
            "sampler": first["sampler"], "steps": int(first["steps"]), "guidance_scale": float(first["guidance_scale"]),
            "width": int(first["width"]), "height": int(first["height"]), "batch": 8, "dtype": "float32",
            "threads": 0, "rows": [{"name": r["sample_key"], "prompt": r["prompt"],
                                    "negative_prompt": r["negative_prompt"] or "", "seed": int(r["seed"])} for r in rows]}


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one whole process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-4000:]}")
    return wall, usage.ru_maxrss / 1024


def pixel_difference(ours: Path, peer: Path, rows: list[dict]) -> tuple[float, int]:
    """Mean and maximum absolute difference (grey levels) between the two runs' images."""
    import numpy as np
    from PIL import Image

    diffs = []
    for r in rows:
        a = np.asarray(Image.open(ours / r["label"] / f"{r['sample_key']}.png").convert("RGB"), dtype=int)
        b = np.asarray(Image.open(peer / f"{r['sample_key']}.png").convert("RGB"), dtype=int)
        diffs.append(np.abs(a - b))
    d = np.stack(diffs)
    return float(d.mean()), int(d.max())


def _spread(xs: list[float]) -> str:
    return f"min {min(xs):7.1f}  median {statistics.median(xs):7.1f}  max {max(xs):7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images (half per class)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sampler", default="euler", choices=["euler", "euler_a", "plms"])
    ap.add_argument("--batch", type=int, default=8, help="ours (the plain loop always renders batches of 8)")
    ap.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="ours; default: runtime.generate's auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each process (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.prepare:
        model, lora, rows = prepare(Path(args.prepare), args)
        (Path(args.prepare) / "prepared.json").write_text(json.dumps({"model": model, "lora": str(lora), "rows": rows}))
        return
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_name:
        tmp = Path(tmp_name)
        # in a process of its own: a child's peak RSS counts the parent's pages at fork
        subprocess.run([sys.executable, __file__, "--prepare", str(tmp), *sys.argv[1:]], check=True, cwd=ROOT)
        prepared = json.loads((tmp / "prepared.json").read_text())
        model, lora, rows = prepared["model"], Path(prepared["lora"]), prepared["rows"]
        job = tmp / "job.json"
        job.write_text(json.dumps(peer_job(args, model, lora, rows)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        dermt2im = str(Path(sys.executable).with_name("dermt2im"))
        walls: dict[str, list[float]] = {"peer": [], "ours": []}
        rss: dict[str, list[float]] = {"peer": [], "ours": []}
        for i in range(args.repeats):
            work, out = tmp / f"work-{i}", tmp / f"plain-{i}"
            sets = [a for o in overrides(args, model) for a in ("--set", o)]
            # the workdir's config first, as a user sets one up (not timed): generate needs a workdir
            subprocess.run([dermt2im, "config", "--workdir", str(work), "--config", "tiny", *sets, "--save"],
                           check=True, env=env, capture_output=True)
            cmds = {"peer": [sys.executable, str(ROOT / "bench" / "peers" / "plain_generate.py"), str(job), str(out)],
                    "ours": [dermt2im, "generate", "--workdir", str(work), "--lora", str(lora)]}
            for who in ("peer", "ours"):
                wall, peak = _timed(cmds[who], env)
                walls[who].append(wall)
                rss[who].append(peak)
            if i == 0:
                mean, worst = pixel_difference(work / "synthetic", out, rows)
            else:
                shutil.rmtree(work), shutil.rmtree(out)
        n = len(rows)
        print(f"{args.arch} model, {n} images {args.size}x{args.size}, {args.steps} {args.sampler} steps, ours batch "
              f"{args.batch} (dtype {args.dtype or 'auto'}), plain batch 8 fp32, {args.device}, "
              f"{args.threads or 'default'} torch thread(s); {args.repeats} interleaved runs each")
        print(f"plain diffusers loop (whole process) wall s: {_spread(walls['peer'])}  "
              f"= {n / statistics.median(walls['peer']):.2f} images/s   peak RSS MB {max(rss['peer']):6.0f}")
        print(f"dermt2im generate    (whole command) wall s: {_spread(walls['ours'])}  "
              f"= {n / statistics.median(walls['ours']):.2f} images/s   peak RSS MB {max(rss['ours']):6.0f}")
        print(f"ratio plain / ours (median wall): {statistics.median(walls['peer']) / statistics.median(walls['ours']):.2f}x")
        print(f"pixel difference ours vs plain: mean {mean:.2f}, max {worst} grey levels")


if __name__ == "__main__":
    main()
