"""Benchmark: ``dermt2im``'s LoRA trainer against diffusers' own DreamBooth-LoRA script.

The peer is ``bench/peers/train_dreambooth_lora.py``, a pinned copy of diffusers'
``examples/dreambooth/train_dreambooth_lora.py``, run unchanged as a subprocess with its own
``--pre_compute_text_embeddings``. Both train a LoRA of the same rank on the same UNet attention
projections, from the same local model folder (the tiny model saved to disk, or SD v1.5's
architecture with random weights), on the same images, at the same resolution, batch, steps,
learning rate, warm-up, precision and optimizer, reporting to MLflow. Each run is a whole process,
as a user waits for it (imports, loading, caching, training, saving); the two are interleaved
(peer, ours, peer, ours ...) so that machine drift falls on both, with one torch thread each
(``--threads``). Printed: wall time min / median / max, the ratio of medians (above 1: ours is
faster), the processes' peak resident memory (``ru_maxrss``), and on CUDA nothing more (use
``bench/gpu.sh`` for VRAM).

    python bench/train.py                                   # tiny model, 64 px, 60 steps
    python bench/train.py --arch sd15 --resolution 128 --steps 20 --repeats 3
    python bench/train.py --arch sd15 --paper --device cuda --resolution 512 --steps 50   # paper preset, GPU

When torchvision is not installed (its PyPI wheels are CUDA builds), the peer gets a stand-in for
the transforms it uses from ``bench/peers/torchvision_transforms.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers"
sys.path.insert(0, str(ROOT))
PROMPT = "a dermoscopic image of sks skin lesion"


def _config(args, model: str):
    from tests.train.train_fixtures import tiny_config

    precision = "fp16" if args.paper else args.precision
    optimizer = "auto" if args.paper else "adamw"
    return tiny_config(
        base_model=model, resolution=args.resolution, train_batch_size=args.batch, max_steps=args.steps,
        lr_warmup_steps=5, learning_rate=1e-3, checkpoint_every=10**6, validation_images_per_class=0,
        device=args.device, optimizer=optimizer, mixed_precision=precision, gradient_checkpointing=args.paper,
    )


def prepare(tmp: Path, args) -> tuple[str, Path]:
    """The local model folder and a folder of training images, shared by both trainers."""
    from dermt2im.core.workdir import Workdir
    from tests.train.train_fixtures import make_seed_manifest

    folder = tmp / f"{args.arch}-model"
    if args.arch == "sd15":
        from dermt2im.diffusion.models import build_sd15_random_pipeline

        build_sd15_random_pipeline().save_pretrained(folder, safe_serialization=True)
    else:
        from dermt2im.diffusion.models import build_tiny_pipeline

        build_tiny_pipeline(0).save_pretrained(folder, safe_serialization=True)
    w = Workdir.at(tmp / "seed-work")
    make_seed_manifest(w, n_per_class=args.images, size=args.resolution, extra_val=False)
    return str(folder), Path(w.processed)


def run_ours(tmp: Path, args) -> dict:
    """One whole trainer process: a seeds manifest over the shared images, then ``train_lora``."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    from dermt2im.core.workdir import Workdir
    from tests.train.train_fixtures import make_seed_manifest, train

    w = Workdir.at(tmp / "work")
    make_seed_manifest(w, n_per_class=args.images, size=args.resolution, extra_val=False)
    r = train(w, _config(args, args.model), run_id="bench")
    meta = json.loads(r.lora_json.read_text())
    return {"steps": r.steps, "loop_steps_per_s": meta["steps_per_second"], "final_loss": r.final_loss}


def peer_command(args, model: str, images: Path, out: Path) -> list[str]:
    cmd = [sys.executable, str(PEERS / "train_dreambooth_lora.py"), "--pretrained_model_name_or_path", model,
           "--instance_data_dir", str(images), "--instance_prompt", PROMPT, "--output_dir", str(out),
           "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
           "--max_train_steps", str(args.steps), "--learning_rate", "1e-3", "--lr_warmup_steps", "5",
           "--lr_scheduler", "constant_with_warmup", "--rank", "4", "--seed", "0",
           "--checkpointing_steps", str(10**6), "--report_to", "mlflow", "--pre_compute_text_embeddings",
           "--center_crop", "--mixed_precision", "fp16" if args.paper else (args.peer_precision or args.precision)]
    if args.paper:
        cmd += ["--gradient_checkpointing", "--use_8bit_adam"]
    return _with_torchvision(cmd)


def _timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak resident MB of the process, and its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return wall, usage.ru_maxrss / 1024, out


def _env(args, tmp: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}
    return env


def _with_torchvision(cmd: list[str]) -> list[str]:
    """``cmd`` (a peer script) as is where torchvision loads, else through ``without_torchvision.py``."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a CUDA build that does not load beside CPU torch
        return [cmd[0], str(PEERS / "without_torchvision.py"), *cmd[1:]]
    return cmd


def _spread(xs: list[float]) -> str:
    return f"min {min(xs):7.1f}  median {statistics.median(xs):7.1f}  max {max(xs):7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--images", type=int, default=6, help="training images per class")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for both)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--paper", action="store_true",
                    help="the paper preset for both: fp16, 8-bit AdamW, gradient checkpointing (CUDA)")
    ap.add_argument("--precision", choices=["no", "bf16"], default="no",
                    help="mixed precision of both (bf16: autocast; ours uses it only on a CPU with native bf16)")
    ap.add_argument("--peer-precision", choices=["no", "bf16"], help="the peer's, where it should differ")
    ap.add_argument("--variant", choices=["ours", "prepare"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.variant == "prepare":
        model, images = prepare(Path(args.model), args)
        (Path(args.model) / "prepared.json").write_text(json.dumps({"model": model, "images": str(images)}))
        return
    if args.variant:
        with tempfile.TemporaryDirectory(prefix="bench-train-ours-") as tmp:
            print("RESULT " + json.dumps(run_ours(Path(tmp), args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        # in a process of its own: a child's peak RSS counts the parent's pages at fork
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", "prepare", "--model", str(tmp)],
                       check=True, cwd=ROOT)
        prepared = json.loads((tmp / "prepared.json").read_text())
        model, images = prepared["model"], Path(prepared["images"])
        env = _env(args, tmp)
        ours_cmd = [sys.executable, __file__, "--variant", "ours", "--model", model] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "model", "paper", "repeats", "peer_precision")
        ] + (["--paper"] if args.paper else [])
        walls: dict[str, list[float]] = {"peer": [], "ours": []}
        rss: dict[str, list[float]] = {"peer": [], "ours": []}
        loop_rate = []
        for i in range(args.repeats):
            for who in ("peer", "ours"):
                cmd = peer_command(args, model, images, tmp / f"peer-out-{i}") if who == "peer" else ours_cmd
                wall, peak, out = _timed(cmd, env, ROOT)
                walls[who].append(wall)
                rss[who].append(peak)
                if who == "ours":
                    loop_rate.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0])["loop_steps_per_s"])
        print(f"{args.arch} model, {args.resolution} px, batch {args.batch}, {args.steps} steps, {2 * args.images} images, "
              f"{args.device}, {args.threads} torch thread(s), {'paper preset' if args.paper else f'precision ours {args.precision}, peer {args.peer_precision or args.precision}, AdamW'}; "
              f"{args.repeats} interleaved runs each")
        print(f"diffusers train_dreambooth_lora.py  wall s: {_spread(walls['peer'])}   peak RSS MB {max(rss['peer']):7.0f}")
        print(f"dermt2im train_lora                 wall s: {_spread(walls['ours'])}   peak RSS MB {max(rss['ours']):7.0f}")
        print(f"  (its training loop alone: median {statistics.median(loop_rate):.2f} steps/s)")
        ratio = statistics.median(walls["peer"]) / statistics.median(walls["ours"])
        print(f"ratio peer / ours (median wall): {ratio:.2f}x; peak RSS ours / peer: "
              f"{max(rss['ours']) / max(rss['peer']):.2f}x")


if __name__ == "__main__":
    main()
