"""Scale-out on Ray: rendering throughput with 1 and 2 renderer actors against rendering in this
process, the overhead Ray adds per shard, and what loading the pipeline once per actor saves.

* in-process: ``GenerateStage`` run by the CLI's runner, pipeline loaded before the clock starts;
* ray-1 / ray-2: the same plan through ``dermt2im.runners.ray_runner.on_ray`` on a local Ray
  (loopback only, two CPUs), one and two CPU renderer actors of one CPU each, each actor warmed
  (pipeline loaded) before the clock starts. Each variant renders a fresh workdir.

Every renderer uses one torch thread (the actors get ``OMP_NUM_THREADS=1`` from Ray), so ray-1
and in-process render with the same resources and their difference is Ray's cost per shard:
shipping the call, the actor's own manifest reads and writes (identical to in-process), returning
the summary.

``--sd15-load`` also measures, in fresh processes, what a renderer pays once at start: importing
torch + diffusers + dermt2im, then loading Stable Diffusion v1.5's architecture with random weights
from a local diffusers folder (safetensors, fp32, CPU) and fusing a rank-4 LoRA into it: the time a
renderer that loaded per shard would pay again for every shard.

    python bench/scaleout.py                       # tiny model, 8 shards of 4 images, 64 px, 4 steps, 3 runs
    python bench/scaleout.py --sd15-load           # plus the SD v1.5 load (writes ~4 GB to a temp dir)
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

# Before Ray is imported: listen on 127.0.0.1 only, no usage statistics, a token of this run.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _config(tmp: Path, args, actors: int = 1):
    from dermt2im.core.workdir import open_workdir

    per_class = args.shards * args.shard_size // 2
    overrides = [f"generate.per_class={per_class}", f"generate.shard_size={args.shard_size}",
                 f"generate.width={args.size}", f"generate.height={args.size}", f"generate.steps_min={args.steps}",
                 f"generate.steps_max={args.steps}", f"runtime.generate.batch_size={args.shard_size}",
                 "runtime.generate.writer_threads=1", "scale.ray_address=local", "scale.gpus_per_actor=0",
                 "scale.cpus_per_actor=1", f"scale.actors_per_node={actors}"]
    return open_workdir(tmp, "tiny", overrides)


def _stage(w, cfg):
    from dermt2im import pipelines

    (render,) = pipelines.generate(w, cfg, base_model_only=True, gated=False)  # the base model alone, as asked
    return render


def in_process(tmp: Path, args) -> dict:
    import torch

    from dermt2im.generate.pipeline import clear_pipeline_cache
    from dermt2im.runners.sequential import run_stage

    clear_pipeline_cache()  # loaded afresh, like every renderer actor
    torch.set_num_threads(1)
    w, cfg = _config(tmp, args)
    stage = _stage(w, cfg)
    t0 = time.perf_counter()
    stage.warm()
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run_stage(stage)
    seconds = time.perf_counter() - t0
    return {"images": out.closing["rendered"], "seconds": seconds, "load_seconds": load}


def on_ray(tmp: Path, args, actors: int) -> dict:
    from dermt2im.runners.ray_runner import on_ray as place
    from dermt2im.runners.sequential import run_stage

    w, cfg = _config(tmp, args, actors)
    stage = _stage(w, cfg)
    t0 = time.perf_counter()
    with place(stage, cfg.scale) as placed:
        start = time.perf_counter() - t0
        assert len(placed.stage.pool) == actors
        t0 = time.perf_counter()
        out = run_stage(placed.stage, workers=placed.concurrency)
        seconds = time.perf_counter() - t0
        loads = placed.stage.pool.load_seconds
    return {"images": out.closing["rendered"], "seconds": seconds, "start_seconds": start,
            "load_seconds": max(loads)}


_LOAD = """
import json, sys, time
t0 = time.perf_counter()
import torch, diffusers  # noqa: F401
from dermt2im.core.runtime import GenerateRuntime
from dermt2im.generate.model import RenderModel
from dermt2im.generate.pipeline import prepared_pipeline
imports = time.perf_counter() - t0
folder, lora = sys.argv[1], sys.argv[2]
model = RenderModel(folder, None, "bench-sd15-random", "sks", None)
from dermt2im.generate.model import LoraChoice
from pathlib import Path
t0 = time.perf_counter()
prep = prepared_pipeline(model, GenerateRuntime(device="cpu"), LoraChoice(Path(lora), "bench"), 0.8)
load = time.perf_counter() - t0
print("RESULT " + json.dumps({"imports": imports, "load": load}))
"""


def sd15_load(tmp: Path, runs: int = 2) -> list[dict]:
    """Build the random SD v1.5 folder and a LoRA for it, then load + fuse in ``runs`` fresh processes."""
    from bench.generate import make_lora
    from dermt2im.diffusion.models import build_sd15_random_pipeline

    folder = tmp / "sd15-random"
    pipe = build_sd15_random_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    lora = make_lora(pipe, tmp / "lora")
    del pipe
    out = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", _LOAD, str(folder), str(lora)], cwd=ROOT, capture_output=True,
                              text=True, timeout=1800, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out.append(json.loads(proc.stdout.rsplit("RESULT ", 1)[1]))
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 2**30
    for o in out:
        o["weights_gib"] = round(size, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sd15-load", action="store_true", help="also time SD v1.5 load + LoRA fuse in fresh processes")
    args = ap.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        runs: dict[str, list[dict]] = {"in": [], "one": [], "two": []}
        for r in range(args.repeats):  # interleaved, so that a busy spell of the machine hits every variant
            runs["in"].append(in_process(tmp / f"in-{r}", args))
            runs["one"].append(on_ray(tmp / f"one-{r}", args, 1))
            runs["two"].append(on_ray(tmp / f"two-{r}", args, 2))
        ray.shutdown()
        n = args.shards * args.shard_size
        assert all(x["images"] == n for v in runs.values() for x in v)
        med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
        spread = {k: f"{min(x['seconds'] for x in v):.2f}-{max(x['seconds'] for x in v):.2f} s" for k, v in runs.items()}
        start = {k: statistics.median(x.get("start_seconds", x["load_seconds"]) for x in v) for k, v in runs.items()}
        print(f"setup: tiny model, CPU, {args.shards} shards of {args.shard_size} images, {args.size}x{args.size}, "
              f"{args.steps} steps, one torch thread per renderer, local Ray with 2 CPUs; median of {args.repeats} "
              f"interleaved runs, load average {os.getloadavg()[0]:.1f} at the end")
        for key, label, before in (("in", "in-process       ", "pipeline loaded"),
                                   ("one", "ray, 1 CPU actor ", "actor placed and loaded"),
                                   ("two", "ray, 2 CPU actors", "actors placed and loaded")):
            print(f"{label}: {n / med[key]:6.2f} images/s ({med[key]:.2f} s, runs {spread[key]}; {before} in "
                  f"{start[key]:.2f} s before the clock)")
        print(f"ratio 2 actors / 1 actor: {med['one'] / med['two']:.2f}x images/s")
        print(f"ratio ray 1 actor / in-process: {med['one'] / med['in']:.2f}x time; overhead per shard "
              f"{1000 * (med['one'] - med['in']) / args.shards:+.0f} ms")
        if args.sd15_load:
            loads = sd15_load(tmp)
            for i, r in enumerate(loads, start=1):
                print(f"SD v1.5 (random weights, {r['weights_gib']} GiB safetensors fp32, CPU) process {i}: imports "
                      f"{r['imports']:.1f} s, load + LoRA fuse {r['load']:.1f} s")
            best = min(r["load"] for r in loads)
            from dermt2im.core.config import load_config

            paper = load_config("paper").generate
            shards = 2 * -(-paper.per_class // paper.shard_size)
            print(f"a renderer that loaded per shard would pay {best:.1f} s more per shard (CPU measurement, warm "
                  f"page cache; a fresh process per shard adds its imports); the paper preset's {shards} shards "
                  f"(2 x {paper.per_class} images, shard_size {paper.shard_size}) would load {shards} times "
                  f"({shards * best:.0f} s) instead of once per GPU ({best:.1f} s each)")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
