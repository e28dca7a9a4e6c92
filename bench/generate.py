"""Generation: the whole ``dermt2im generate`` command, gate included, against the plain loop a user
writes; and the gate's throughput, images/s per core.

The peer is ``bench/peers/plain_generate.py``: StableDiffusionPipeline from the local folder, the
LoRA loaded, fused and unloaded, batches of 8, one seeded generator per image, ``image.save``. Both
render the same plan rows (prompts, negative prompts, seeds, sampler, steps, guidance, LoRA scale)
from the same local model folder and LoRA file, each as a whole process as a user waits for it:
``dermt2im generate`` also plans, writes PNG metadata and manifests, and runs the quality gate and
memorisation audit (measuring each batch in worker processes while the next renders, then the
whole-set steps and reports). With ``--seeds N`` every workdir first gets N phantom seeds, ingested
and preprocessed (not timed), as a user's workdir has them (preprocess also prepares them for the
gate: measured, indexed, embedded; ``gate-seeds``): the gate then calibrates its cuts on them,
audits every image against them and measures typicality. ``--cold-seeds`` removes what gate-seeds
made from every copy, so each run makes it while rendering (as in a workdir whose seeds were
preprocessed before gate-seeds existed). Runs are interleaved (peer, ours,
peer, ours ...), one torch thread each unless ``--threads`` says otherwise. Printed: wall time
min / median / max, CPU seconds (user + system, worker processes included), the ratio of medians
(above 1: ours is faster) and the ratio run by run (each run against the plain loop's beside it),
each process's peak resident memory, and the pixel difference between the two sets of images
(ours renders in bf16 on a CPU with native bf16 for a wide UNet, the plain loop in fp32 as a user
writes it; ``--dtype fp32`` makes ours fp32 too).

Then the gate alone on the first run's images: the per-image measures (``quality.measures``: checks,
detectors, audit against the seeds, thumbnails, skin tone) in this process on one thread, and in
``--gate-workers`` worker processes (``quality.pool``, default one per core but one) with this process
measuring its share, as the gate does once rendering is over: images/s, and images/s per core.

    python bench/generate.py                                   # tiny model, 64 px, 64 images, 6 Euler steps
    python bench/generate.py --seeds 64                        # the same in a workdir with seeds
    python bench/generate.py --arch sd15 --size 128 --n 16 --steps 10
    python bench/generate.py --arch sd15 --size 512 --n 64 --steps 25 --device cuda

``--before /other/checkout`` runs that checkout's ``dermt2im generate`` (the code before a change)
interleaved with the two, on workdirs it sets up itself.
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


def _timed(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system, with the children it waited for) and peak resident MB
    of one whole process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-4000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def seeded_template(tmp: Path, n: int, dermt2im: str, env: dict, sets: list[str]) -> Path:
    """A workdir with ``n`` phantom seeds ingested and preprocessed (copied for every run)."""
    template, phantoms = tmp / "seeded", tmp / "phantoms"
    for cmd in ([dermt2im, "phantoms", str(phantoms), "--n", str(n), "--size", "128"],
                [dermt2im, "config", "--workdir", str(template), "--config", "tiny", *sets, "--save"],
                [dermt2im, "ingest", str(phantoms), "--workdir", str(template)],
                [dermt2im, "preprocess", "--workdir", str(template)]):
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    return template


def cold(work: Path) -> None:
    """Undo what gate-seeds made in a copied workdir: the seeds' measures, index, embedding, its stamp."""
    for path in (work / "quality" / "seed-index", work / "fidelity" / "embeddings", work / ".stamps" / "gate-seeds"):
        shutil.rmtree(path, ignore_errors=True)
    (work / ".stamps" / "quality" / "seed-measures.json").unlink(missing_ok=True)


def gate_throughput(work: Path, workers: int) -> str:
    """The gate's per-image measures on the images of ``work``: one thread here, then ``workers``
    processes (started and given the seeds before the clock starts)."""
    import cv2
    import pandas as pd

    from dermt2im.core.config import load_config
    from dermt2im.core.manifest import SYNTHETIC, read_manifest
    from dermt2im.core.workdir import Workdir
    from dermt2im.quality.pool import MeasurePool, measure_items
    from dermt2im.quality.seeds import load_seeds

    cfg = load_config(work / "config.yaml")
    w = Workdir.of(work, cfg)
    rows = read_manifest(w.synthetic_manifest, SYNTHETIC)
    items = [(k, Path(p), None) for k, p in zip(rows["sample_key"], rows["path"])]
    seeds = load_seeds(w, cfg.quality)
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    measure_items(w, cfg.quality, seeds.key, seeds.index, items)
    one = len(items) / (time.perf_counter() - t0)
    pool = MeasurePool(w, cfg.quality, workers)
    pool.start()
    pool.wait(take_back=False)  # the workers are up and have read the seeds
    pool.measure(items[: pool.workers], seeds.key, seeds.index)  # every worker has imported its detectors
    t0 = time.perf_counter()
    pool.measure(items, seeds.key, seeds.index)
    many = len(items) / (time.perf_counter() - t0)
    pool.shutdown()
    side = pd.Series(rows["width"]).iloc[0]
    cores = pool.workers + 1  # the gate's own process measures its share too
    return (f"gate measures ({len(items)} images {side} px, {seeds.index.size} seeds): one thread here "
            f"{one:.1f} images/s; {pool.workers} worker process(es) and this one {many:.1f} images/s = "
            f"{many / cores:.1f} images/s per core")


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
    ap.add_argument("--seeds", type=int, default=0, help="phantom seeds in every workdir (0: none)")
    ap.add_argument("--cold-seeds", action="store_true",
                    help="with --seeds: each run measures, indexes and embeds the seeds itself (gate-seeds undone)")
    ap.add_argument("--gate-workers", type=int, default=0, help="processes for the gate's throughput (0: cores - 1)")
    ap.add_argument("--before", help="another checkout (a folder): its `dermt2im generate` runs interleaved too")
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
        # ours, and with --before the same command from another checkout (its own workdirs: its config)
        envs = {"ours": env, **({"before": {**env, "PYTHONPATH": str(Path(args.before).resolve())}} if args.before
                                else {})}
        walls: dict[str, list[float]] = {who: [] for who in ("peer", *envs)}
        cpus: dict[str, list[float]] = {who: [] for who in walls}
        rss: dict[str, list[float]] = {who: [] for who in walls}
        sets = [a for o in overrides(args, model) for a in ("--set", o)]
        templates = {who: seeded_template(tmp / who, args.seeds, dermt2im, e, sets) for who, e in envs.items()} \
            if args.seeds else {}
        load = [os.getloadavg()[0]]
        for i in range(args.repeats):
            out = tmp / f"plain-{i}"
            cmds = {"peer": [sys.executable, str(ROOT / "bench" / "peers" / "plain_generate.py"), str(job), str(out)]}
            for who, e in envs.items():
                work = tmp / f"{who}-{i}"
                # the workdir first, as a user sets one up (not timed): its config, and the seeds if any
                if templates:
                    shutil.copytree(templates[who], work)
                    if args.cold_seeds:
                        cold(work)
                else:
                    subprocess.run([dermt2im, "config", "--workdir", str(work), "--config", "tiny", *sets, "--save"],
                                   check=True, env=e, capture_output=True)
                cmds[who] = [dermt2im, "generate", "--workdir", str(work), "--lora", str(lora)]
            for who in walls:
                wall, cpu, peak = _timed(cmds[who], envs.get(who, env))
                walls[who].append(wall)
                cpus[who].append(cpu)
                rss[who].append(peak)
            load.append(os.getloadavg()[0])
            if i == 0:
                mean, worst = pixel_difference(tmp / "ours-0" / "synthetic", out, rows)
                first = tmp / "ours-0"
            else:
                shutil.rmtree(out)
                for who in envs:
                    shutil.rmtree(tmp / f"{who}-{i}")
        n = len(rows)
        print(f"{args.arch} model, {n} images {args.size}x{args.size}, {args.steps} {args.sampler} steps, ours batch "
              f"{args.batch} (dtype {args.dtype or 'auto'}), plain batch 8 fp32, {args.device}, "
              f"{args.threads or 'default'} torch thread(s), {args.seeds} seeds{' (cold)' if args.cold_seeds else ''}; "
              f"{args.repeats} interleaved runs each; "
              f"load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
        names = {"peer": "plain diffusers loop (whole process)", "ours": "dermt2im generate    (whole command)",
                 "before": f"dermt2im generate of {Path(args.before or '.').name}"}
        for who in walls:
            print(f"{names[who]} wall s: {_spread(walls[who])}  = {n / statistics.median(walls[who]):.2f} images/s   "
                  f"CPU s {statistics.median(cpus[who]):6.1f}   peak RSS MB {max(rss[who]):6.0f}")
        for who in envs:
            ratio = statistics.median(walls['peer']) / statistics.median(walls[who])
            print(f"{who}: ratio plain / {who} (median wall): {ratio:.2f}x; whole command / plain loop: {1 / ratio:.2f}")
            # run by run (each beside the plain loop it was interleaved with): a slow spell of the host
            # moves both of a pair, and the medians of the two lists can fall in different spells
            paired = [w / p for p, w in zip(walls["peer"], walls[who])]
            print(f"{who}: whole command / plain loop run by run: {' '.join(f'{r:.2f}' for r in paired)} "
                  f"(median {statistics.median(paired):.2f})")
        print(f"pixel difference ours vs plain: mean {mean:.2f}, max {worst} grey levels")
        print(gate_throughput(first, args.gate_workers))


if __name__ == "__main__":
    main()
