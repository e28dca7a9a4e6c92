"""Whether channels-last (NHWC) and torch.compile pay for SD v1.5's UNet on this CPU: the reason
``runtime.*.channels_last`` and ``runtime.*.compile`` are ``auto`` = CUDA only.

    python bench/unet_cpu.py [--repeats 4] [--latent 16] [--no-compile]

SD v1.5's UNet architecture with random weights (speed does not depend on the weight values), one
torch thread, batch 2 (a CFG pair), fp32. Eager NCHW and NHWC forwards alternate; then the UNet is
compiled (the first call, compilation included, is timed apart). Prints medians and ratios to eager.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--latent", type=int, default=16, help="latent side: 16 is 128 px")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=a.latent, cross_attention_dim=768, attention_head_dim=8).eval()
    x, t, emb = torch.randn(2, 4, a.latent, a.latent), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    nhwc = UNet2DConditionModel.from_config(unet.config).eval()
    nhwc.load_state_dict(unet.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    x_nhwc = x.to(memory_format=torch.channels_last)

    def once(model, inp) -> float:
        start = time.perf_counter()
        model(inp, t, emb)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"eager NCHW": [], "eager NHWC": []}
    with torch.no_grad():
        once(unet, x), once(nhwc, x_nhwc)  # warm-up
        for _ in range(a.repeats):  # interleaved
            times["eager NCHW"].append(once(unet, x))
            times["eager NHWC"].append(once(nhwc, x_nhwc))
        if not a.no_compile:
            compiled = torch.compile(unet)
            first = once(compiled, x)
            times["compiled NCHW"] = [once(compiled, x) for _ in range(a.repeats)]
    base = statistics.median(times["eager NCHW"])
    print(f"SD v1.5 UNet, latent {a.latent}x{a.latent}, batch 2, fp32, 1 thread, {a.repeats} runs each")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:14s} s per forward: min {min(ts):.3f}  median {m:.3f}  max {max(ts):.3f}   "
              f"time / eager NCHW {m / base:.2f}x")
    if not a.no_compile:
        print(f"compilation (the first compiled call): {first:.1f} s")


if __name__ == "__main__":
    main()
