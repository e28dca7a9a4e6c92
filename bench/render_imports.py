"""What a rendering process pays before its first step: importing diffusers and loading the tiny
pipeline with a LoRA fused, in a fresh process each time, with the libraries rendering never calls
in sight as installed, then without bitsandbytes, then without bitsandbytes and SciPy
(``dermt2im.core.loading.without_unused_libraries``, what ``dermt2im generate`` does).

    python bench/render_imports.py [--repeats 6]

Runs are interleaved (installed, without bitsandbytes, without both, installed ...). Printed: wall
seconds of each variant (min / median / max) and its median against the installed one's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"as installed": (), "without bitsandbytes": ("bitsandbytes",),
            "without bitsandbytes and SciPy": ("bitsandbytes", "scipy")}

PROCESS = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from dermt2im.core.loading import loading, without_unused_libraries
    hidden, folder, lora = tuple(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]
    with loading(), without_unused_libraries(hidden):
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, use_safetensors=True)
        pipe.load_lora_weights(lora)
        pipe.fuse_lora(lora_scale=0.8)
        pipe.unload_lora_weights()
    print(json.dumps({"seconds": time.perf_counter() - t0, "bitsandbytes": "bitsandbytes" in sys.modules,
                      "scipy": "scipy" in sys.modules}))
    """)


def prepare(tmp: Path) -> tuple[Path, Path]:
    """The tiny model saved as a hub-style folder, and a LoRA for it (as bench/generate.py makes)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from generate import make_lora  # bench/generate.py's

    from dermt2im.diffusion.models import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    folder = tmp / "tiny-model"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, make_lora(pipe, tmp / "lora", {"base_model": str(folder)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-render-imports-") as name:
        folder, lora = prepare(Path(name))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant, hidden in VARIANTS.items():
                done = subprocess.run([sys.executable, "-c", PROCESS, json.dumps(hidden), str(folder), str(lora)],
                                      capture_output=True, text=True, env=env, cwd=ROOT, check=True)
                seen = json.loads(done.stdout.strip().splitlines()[-1])
                if any(seen[h] for h in hidden):
                    sys.exit(f"{variant}: {', '.join(h for h in hidden if seen[h])} imported all the same")
                seconds[variant].append(seen["seconds"])
        base = statistics.median(seconds["as installed"])
        print(f"import diffusers, load the tiny pipeline, fuse a LoRA; fresh process each; {args.repeats} interleaved "
              f"runs each; {os.cpu_count()} cores")
        for variant, xs in seconds.items():
            print(f"{variant:32s} s: min {min(xs):5.2f}  median {statistics.median(xs):5.2f}  max {max(xs):5.2f}"
                  f"   median / as installed: {statistics.median(xs) / base:.2f}")


if __name__ == "__main__":
    main()
