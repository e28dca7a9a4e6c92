"""What the device can do fast, decided in one place for training and generation.

* Half precision: fp16 on CUDA; bf16 on a CPU only where it is native (AVX512-BF16 or AMX). Without
  those instructions oneDNN emulates bf16 and it is slower than fp32, so such CPUs stay in fp32.
* ``torch.compile`` and NHWC (channels_last) memory format: "auto" means on CUDA only. On the 2-core
  development CPU (``bench/unet_cpu.py``: SD 1.5's UNet, 128 px, fp32, 1 thread) the compiled UNet took
  1.55x the eager time per forward and NHWC 1.04x, so a CPU uses them only when asked ("on").
* TF32 matmuls and convolutions on Ampere and newer GPUs (compute capability 8 and up).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Literal

log = logging.getLogger(__name__)

# What torch.compile lowers graphs with: inductor, unless DERMT2IM_COMPILE_BACKEND names another.
# The CPU rehearsal of the paper preset uses "aot_eager" (dynamo's tracing and AOTAutograd's joint
# graphs as inductor receives them, without its C++ code generation, minutes per graph on two cores);
# tests that only count graphs or call a compiled module set "eager".
BACKEND = os.environ.get("DERMT2IM_COMPILE_BACKEND") or "inductor"

Switch = Literal["auto", "on", "off"]


@functools.lru_cache(maxsize=1)
def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


# bf16 pays on a CPU for a wide UNet only. Measured on this project's development CPU (AVX512-BF16, one
# thread): SD v1.5's architecture (widest block 1280 channels) renders much faster in bf16 than in fp32
# (the whole `bench/generate.py --arch sd15 --size 128` command 1.81x the plain fp32 loop, 2026-11-30),
# while narrow UNets render slower in bf16 (2026-12-07, 16 images at 64 px, CPU seconds of three runs):
# the tiny test model (64 channels, 6 steps) 3.4-3.7 s against 2.9-3.2 s in fp32, the miniature model
# (128 channels, 10 steps) 2.1-2.6 s against 1.8-1.9 s. On narrow layers the casts cost more than the
# faster products save.
BF16_CPU_MIN_WIDTH = 320  # SD 1.x / 2.x and wider


def half_dtype(device: str, unet_width: int | None = None):
    """The half-precision dtype worth using on ``device``, or None (stay in fp32); on a CPU, for a
    UNet whose widest block has ``unet_width`` channels (None: not known, taken as wide)."""
    import torch

    if device.startswith("cuda"):
        return torch.float16
    if unet_width is not None and unet_width < BF16_CPU_MIN_WIDTH:
        return None
    return torch.bfloat16 if native_bf16_cpu() else None


def wanted(choice: Switch, device: str) -> bool:
    """A speed setting ("auto" / "on" / "off") on ``device``: auto is on for CUDA only."""
    return choice == "on" or (choice == "auto" and device.startswith("cuda"))


def enable_tf32(device: str) -> bool:
    """TF32 for matmuls and cuDNN convolutions on an Ampere or newer GPU; returns whether it is on."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability()[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def compiled_denoiser(unet: Any) -> Any:
    """``unet`` with its forward compiled, timesteps always reaching the graph as float32.

    The schedulers hand the UNet timesteps of their own dtype (Euler float, PLMS integer) and dynamo
    guards on it: one graph per dtype, on top of one per batch shape. The UNet turns a timestep into a
    float embedding at once, so the cast changes nothing in the output. The module stays the
    UNet itself (its config, dtype and device as before; only ``forward`` is replaced), so a pipeline
    or a loop uses it exactly as the eager one."""
    import torch

    log.info("compiling the UNet with torch.compile (the first call takes a while)")
    inner = torch.compile(unet.forward, fullgraph=False, dynamic=False, backend=BACKEND)

    def forward(sample, timestep, *args, **kwargs):
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep)
        return inner(sample, timestep.to(device=sample.device, dtype=torch.float32), *args, **kwargs)

    unet.forward = forward
    return unet


def compiled(module: Any, *, what: str) -> Any:
    """``module`` compiled with inductor (graphs are cached on disk by torch across processes)."""
    import torch

    log.info("compiling the %s with torch.compile (the first call takes a while)", what)
    return torch.compile(module, fullgraph=False, dynamic=False, backend=BACKEND)
