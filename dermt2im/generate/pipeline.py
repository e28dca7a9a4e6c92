"""The pipeline to render with, loaded once per process with the LoRA fused at its scale, and one
batched call of it.

Switching sampler swaps ``pipe.scheduler`` for a cached instance (``samplers.SamplerSwitch``), never
reloads. A batch is rows sharing ``GROUP_COLUMNS``, one CPU ``torch.Generator`` per image, so an
image does not depend on its batch.

A loaded pipeline is made fast once (``speed_up``): the LoRA is fused and its adapter layers
unloaded (the fused weights stay, the per-layer adapter calls go), query / key / value projections
fused, NHWC convolutions and the UNet and VAE decoder compiled where they pay
(``dermt2im.diffusion.accel``), and the text embeddings of each distinct prompt computed once
(``PromptCache``; a plan has a few dozen distinct prompts for thousands of images). Classifier-free
guidance runs as one batch and the VAE decodes the whole batch at once (diffusers does both).
Tolerances on the tiny model, asserted in ``tests/generate/test_speed.py``: fused projections,
NHWC, cached embeddings and compiled modules within 2 grey levels of the plain pipeline; bf16 within
a mean of 2 and a maximum of 16 grey levels of fp32.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermt2im.core.runtime import GenerateRuntime
from dermt2im.generate.model import LoraChoice, RenderModel
from dermt2im.generate.samplers import SamplerSwitch

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("sampler", "steps", "width", "height", "guidance_scale", "lora_scale", "label")


class PromptCache:
    """Text embeddings by prompt, computed once per pipeline (the LoRA may have changed the text
    encoder, so a cache belongs to one prepared pipeline); the oldest are dropped beyond ``size``."""

    def __init__(self, pipe: Any, size: int = 256) -> None:
        self.pipe, self.size = pipe, size
        self._embeds: OrderedDict[str, Any] = OrderedDict()

    def embeddings(self, texts: list[str]):
        """[len(texts), tokens, width] embeddings, encoding only the texts not seen before, each on its
        own, so that a prompt's embedding never depends on which others it first came with."""
        import torch

        for text in dict.fromkeys(t for t in texts if t not in self._embeds):
            with torch.no_grad():
                self._embeds[text] = self.pipe.encode_prompt([text], self.pipe.device, 1, False)[0]
        for t in texts:
            self._embeds.move_to_end(t)
        out = torch.cat([self._embeds[t] for t in texts])
        while len(self._embeds) > self.size:
            self._embeds.popitem(last=False)
        return out


@dataclass
class Prepared:
    pipe: Any
    switch: SamplerSwitch
    lora_sha256: str | None
    lora_scale: float | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    prompts: PromptCache | None = None


_CACHE: dict[tuple, Prepared] = {}
_CACHE_LOCK = threading.Lock()
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipelines passed in -> their state


def resolve_dtype(pref: str, device: str, unet_width: int | None = None):
    """``runtime.generate.dtype`` on ``device``: auto is fp16 on CUDA, bf16 on a CPU with native bf16
    for a wide UNet (``unet_width``: its widest block, ``models.unet_width``), else fp32
    (``dermt2im.diffusion.accel.half_dtype``)."""
    import torch

    if pref == "auto":
        from dermt2im.diffusion.accel import half_dtype

        return half_dtype(device, unet_width) or torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[pref]


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fuse(pipe, lora: LoraChoice, scale: float, *, keep_adapter: bool = True) -> None:
    """Merge the LoRA into the weights at ``scale``; without ``keep_adapter`` its layers are unloaded
    afterwards (the merged weights stay), so inference no longer passes through them."""
    from dermt2im.diffusion.lora_files import load_lora

    load_lora(pipe, lora.weights, scale, fuse=True)
    if not keep_adapter:
        pipe.unload_lora_weights()
    log.info("fused LoRA %s (sha256 %s) at scale %g", lora.weights, (lora.sha256 or "")[:12], scale)


def speed_up(pipe, runtime: GenerateRuntime, device: str) -> list[str]:
    """Apply ``runtime``'s speed settings to a freshly loaded pipeline (its LoRA fused and unloaded);
    returns what was applied."""
    import torch

    from dermt2im.diffusion import accel

    done = []
    if runtime.fuse_qkv:
        pipe.fuse_qkv_projections()  # the UNet's and the VAE's attention
        done.append("fused qkv")
    if accel.wanted(runtime.channels_last, device):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if accel.wanted(runtime.compile, device):
        # one graph each per process: every batch is padded to runtime.batch_size (render_batch) and the
        # UNet sees float32 timesteps whatever the sampler
        pipe.unet = accel.compiled_denoiser(pipe.unet)
        pipe.vae.decoder = accel.compiled(pipe.vae.decoder, what="VAE decoder")
        done.append("compiled")
    return done


def _lora_state(sha256: str | None, scale: float | None) -> tuple:
    return (sha256, scale) if sha256 else (None, None)


def _given_pipeline(pipe, lora: LoraChoice, scale: float) -> Prepared:
    """A pipeline passed in (tests, benchmarks), taken as the base model; the LoRA is fused once."""
    with _CACHE_LOCK:
        prep = _PASSED.get(pipe)
        if prep is None:
            prep = Prepared(pipe, SamplerSwitch(pipe), None, None)
            _PASSED[pipe] = prep
    if _lora_state(prep.lora_sha256, prep.lora_scale) != _lora_state(lora.sha256, scale):
        if prep.lora_sha256 is not None:
            log.warning("replacing the LoRA fused into the given pipeline (unfuse is not bit-exact)")
            from dermt2im.diffusion.lora_files import unload_lora

            unload_lora(pipe)
        if lora.weights is not None:
            _fuse(pipe, lora, scale)
        prep.lora_sha256, prep.lora_scale = lora.sha256, scale
    return prep


def prepared_pipeline(model: RenderModel, runtime: GenerateRuntime, lora: LoraChoice, scale: float, *,
                      pipe=None) -> Prepared:
    """The pipeline to render with, LoRA fused at ``scale``.

    Without ``pipe``, a per-process cache holds one pipeline: asking for another LoRA (per-class
    LoRAs) or scale loads a fresh base model rather than unfusing, because unfusing in fp16 does not
    restore the base weights bit for bit.
    """
    scale = float(scale)
    if pipe is not None:
        return _given_pipeline(pipe, lora, scale)

    from dermt2im.core.loading import first_import, without_unused_libraries

    # the first call imports torch here, with the collector paused (load_pipeline pauses it too)
    with first_import("torch"):
        from dermt2im.diffusion.models import load_pipeline, resolve_device, unet_width

        device = resolve_device(runtime.device)
        dtype = resolve_dtype(runtime.dtype, device, unet_width(model.base_model, model.base_config))
    key = (model.identity, model.revision, device, str(dtype), *_lora_state(lora.sha256, scale))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if _CACHE:
            log.info("releasing the cached pipeline to load %s", key)
            _CACHE.clear()
            gc.collect()
            empty_cuda_cache()
        t0 = time.perf_counter()
        import torch

        # fp32 is every loader's default: passing it would only make diffusers warn about casting
        torch_dtype = None if dtype == torch.float32 else dtype
        with without_unused_libraries():  # what diffusers imports and rendering never calls
            base = load_pipeline(model.base_model, model.revision, base_config=model.base_config,
                                 torch_dtype=torch_dtype, device=device)
            base.set_progress_bar_config(disable=True)
            if lora.weights is not None:
                _fuse(base, lora, scale, keep_adapter=False)
        applied = speed_up(base, runtime, device)
        log.info("loaded %s on %s (%s%s) in %.1f s", model.base_model, device, dtype_name(dtype),
                 "".join(f", {a}" for a in applied), time.perf_counter() - t0)
        prep = Prepared(base, SamplerSwitch(base), lora.sha256, scale, prompts=PromptCache(base))
        _CACHE[key] = prep
        return prep


def clear_pipeline_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
    gc.collect()
    empty_cuda_cache()


def empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)
    except AttributeError:  # pragma: no cover
        return False


def render_batch(pipe, switch: SamplerSwitch, rows: list[dict], prompts: PromptCache | None = None,
                 pad_to: int | None = None) -> list[np.ndarray]:
    """Render rows that share GROUP_COLUMNS in one pipeline call, one generator per image; with
    ``prompts``, text embeddings come from that cache. With ``pad_to``, a short batch is filled up to
    that many images with copies of its last row (rendered, then dropped), so that every call has one
    shape: a compiled UNet and VAE then trace one graph per process instead of one per batch size.
    An image's pixels depend on the batch's size and its position in it (slightly: the kernels block
    the work by shape), so both are recorded with each image (``batch_size``, ``batch_position``)."""
    import torch

    first = rows[0]
    for r in rows[1:]:
        for c in GROUP_COLUMNS:
            if r[c] != first[c]:
                raise ValueError(f"rows in one batch must share {c}: {r[c]!r} != {first[c]!r}")
    n = len(rows)
    if pad_to is not None and pad_to > n:
        rows = rows + [rows[-1]] * (pad_to - n)
    switch.use(first["sampler"])
    generators = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows]
    texts = {"prompt": [r["prompt"] for r in rows], "negative_prompt": [r["negative_prompt"] or "" for r in rows]}
    if prompts is not None:
        texts = {f"{k}_embeds": prompts.embeddings(v) for k, v in texts.items()}
    out = pipe(
        **texts,
        num_inference_steps=int(first["steps"]),
        guidance_scale=float(first["guidance_scale"]),
        height=int(first["height"]),
        width=int(first["width"]),
        generator=generators,
        output_type="np",
    )
    images = np.asarray(out.images)[:n]
    return list((images * 255.0).round().clip(0, 255).astype(np.uint8))


def render_as_recorded(pipe, switch: SamplerSwitch, row: dict, prompts: PromptCache | None = None) -> np.ndarray:
    """One manifest row's image again: rendered at the batch size and position it was made at (the
    other places hold copies of the row), so that it comes out as the same pixels."""
    size = int(row.get("batch_size") or 1)
    position = int(row.get("batch_position") or 0)
    return render_batch(pipe, switch, [row] * size, prompts)[position]
