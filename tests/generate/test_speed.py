"""What makes generation fast, and how far each speed-up may move the images (tiny model, CPU).

Stated tolerances (grey levels, 0-255), measured on the tiny model at 32 px: fused query / key /
value projections, NHWC, cached text embeddings and torch.compile stay within 2 of the plain
pipeline (measured: at most 1); bf16 stays within a mean of 2 and a maximum of 16 of fp32
(measured: mean 1.05, maximum 8).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from dermt2im.core.config import load_config
from dermt2im.core.runtime import GenerateRuntime
from dermt2im.diffusion import accel
from dermt2im.diffusion.models import build_tiny_pipeline
from dermt2im.generate import pipeline, shards
from dermt2im.generate.model import LoraChoice, RenderModel
from dermt2im.generate.samplers import SamplerSwitch
from tests.generate.generate_fixtures import plan, render

EXACT_ENOUGH = 2  # grey levels: reorderings of float sums, nothing more
BF16_MEAN, BF16_MAX = 2.0, 16


def _rows(n: int = 6, sampler: str = "euler_a") -> list[dict]:
    return [{"label": "benign", "negative_prompt": "blurry", "sampler": sampler, "steps": 3, "guidance_scale": 7.0,
             "lora_scale": 0.8, "seed": 100 + i, "width": 32, "height": 32,
             "prompt": "a dermoscopic image of sks benign skin lesion" + (", tiny mole" if i % 2 else "")}
            for i in range(n)]


@pytest.fixture(scope="module")
def base():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def reference(base):
    return np.stack(pipeline.render_batch(base, SamplerSwitch(base), _rows())).astype(int)


def _render(pipe, prompts=None) -> np.ndarray:
    return np.stack(pipeline.render_batch(pipe, SamplerSwitch(pipe), _rows(), prompts)).astype(int)


def test_fused_projections_nhwc_and_cached_embeddings_stay_within_two_levels(base, reference):
    fast = copy.deepcopy(base)
    applied = pipeline.speed_up(fast, GenerateRuntime(channels_last="on", compile="off"), "cpu")
    assert applied == ["fused qkv", "channels_last"]
    assert fast.unet.attn_processors and all("Fused" in type(p).__name__ for p in fast.unet.attn_processors.values())
    cache = pipeline.PromptCache(fast)
    diff = np.abs(_render(fast, cache) - reference)
    assert diff.max() <= EXACT_ENOUGH
    assert np.abs(reference[0] - reference[2]).max() > 10  # a real comparison: other seeds differ a lot


def test_bf16_stays_within_the_stated_tolerance(base, reference):
    half = copy.deepcopy(base).to(dtype=torch.bfloat16)
    diff = np.abs(_render(half) - reference)
    assert diff.mean() <= BF16_MEAN and diff.max() <= BF16_MAX
    assert diff.max() > 0  # bf16 does round: the tolerance is not vacuous


def test_compiled_unet_and_decoder_stay_within_two_levels(base, reference):
    compiled = copy.deepcopy(base)
    assert pipeline.speed_up(compiled, GenerateRuntime(compile="on", fuse_qkv=False), "cpu") == ["compiled"]
    assert "forward" in vars(compiled.unet)  # the UNet itself, its forward compiled
    assert np.abs(_render(compiled) - reference).max() <= EXACT_ENOUGH


def test_the_prompt_cache_encodes_each_distinct_prompt_once_and_alone(base):
    cache = pipeline.PromptCache(base, size=2)
    calls: list[list[str]] = []
    real = base.encode_prompt

    def counting(prompt, *a, **k):
        calls.append(list(prompt))
        return real(prompt, *a, **k)

    base.encode_prompt = counting
    try:
        first = cache.embeddings(["a", "b", "a"])
        again = cache.embeddings(["b", "a"])
        cache.embeddings(["c"])  # beyond size 2: the least recently used ("b") goes
        cache.embeddings(["a"])
        cache.embeddings(["b"])
    finally:
        del base.encode_prompt
    assert calls == [["a"], ["b"], ["c"], ["b"]]
    assert first.shape[0] == 3 and torch.equal(first[0], first[2]) and torch.equal(again[1], first[0])


def test_auto_dtype_is_fp16_on_cuda_and_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    assert pipeline.resolve_dtype("auto", "cuda") == torch.float16
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(accel, "native_bf16_cpu", lambda native=native: native)
        assert pipeline.resolve_dtype("auto", "cpu") == expected
    assert pipeline.resolve_dtype("fp32", "cuda") == torch.float32


def test_auto_dtype_keeps_narrow_unets_in_fp32_on_a_cpu(monkeypatch, tmp_path):
    from dermt2im.diffusion.models import build_tiny_pipeline, unet_width

    monkeypatch.setattr(accel, "native_bf16_cpu", lambda: True)
    folder = tmp_path / "model"
    build_tiny_pipeline(0).save_pretrained(folder, safe_serialization=True)
    assert unet_width("tiny") == unet_width(str(folder)) == 64 and unet_width("mini") == 128
    assert unet_width("some/hub-model") is None  # not known: taken as wide
    for narrow in ("tiny", "mini", str(folder)):
        assert pipeline.resolve_dtype("auto", "cpu", unet_width(narrow)) == torch.float32
        assert pipeline.resolve_dtype("auto", "cuda", unet_width(narrow)) == torch.float16
    assert pipeline.resolve_dtype("auto", "cpu", 1280) == pipeline.resolve_dtype("auto", "cpu", None) == torch.bfloat16
    assert pipeline.resolve_dtype("bf16", "cpu", 64) == torch.bfloat16  # asked for: kept


def test_compile_and_nhwc_are_on_for_cuda_only_unless_asked():
    assert accel.wanted("auto", "cuda") and accel.wanted("auto", "cuda:1")
    assert not accel.wanted("auto", "cpu") and accel.wanted("on", "cpu") and not accel.wanted("off", "cuda")


def _lora(folder: Path) -> Path:
    from tests.generate.test_generation import _make_lora

    return _make_lora(folder)


def test_the_prepared_pipeline_is_fused_unloaded_and_renders_like_a_given_one(tmp_path, workdir):
    """The cached pipeline merges the LoRA and drops its adapter layers (nothing of PEFT is left on
    the inference path); its images match the LoRA fused into a pipeline passed in."""
    lora = _lora(tmp_path / "lora")
    model = RenderModel("tiny", None, "tiny@test", "sks", lora)
    runtime = GenerateRuntime(device="cpu", dtype="fp32", channels_last="off", compile="off")
    choice = LoraChoice(lora, "sha")
    try:
        prep = pipeline.prepared_pipeline(model, runtime, choice, 0.8)
        assert pipeline.prepared_pipeline(model, runtime, choice, 0.8) is prep  # looked up, not loaded again
        assert not any("lora" in name for name, _ in prep.pipe.unet.named_modules())
        fast = np.stack(pipeline.render_batch(prep.pipe, prep.switch, _rows(), prep.prompts)).astype(int)
    finally:
        pipeline.clear_pipeline_cache()
    given = build_tiny_pipeline(0)
    slow = pipeline.prepared_pipeline(model, runtime, choice, 0.8, pipe=given)
    plain = np.stack(pipeline.render_batch(slow.pipe, slow.switch, _rows())).astype(int)
    assert np.abs(fast - plain).max() <= EXACT_ENOUGH


def test_a_shard_is_recorded_once_not_once_per_batch(workdir, monkeypatch, base):
    cfg = load_config("tiny", ["generate.per_class=6", "generate.shard_size=6", "generate.width=32",
                                "generate.height=32", "generate.steps_min=2", "generate.steps_max=2",
                                "runtime.generate.batch_size=2", "generate.samplers=[euler]"])
    plan(workdir, cfg)
    writes: list[int] = []
    real = shards.record_rows
    monkeypatch.setattr(shards, "record_rows", lambda path, rows, kind: writes.append(len(rows)) or real(path, rows, kind))
    assert len(render(workdir, cfg, 0, pipe=base)) == 6
    assert writes == [6]  # three batches of two, one manifest write


def test_compiled_generation_traces_one_graph_per_module_over_a_shard_of_three_samplers(workdir, monkeypatch):
    """A 10-image shard over Euler, Euler a and PLMS in batches of 4 renders as batches of 4, 3 and 3;
    Euler passes float timesteps and PLMS integer ones. Compiled, that traced a UNet graph per batch
    shape and timestep dtype (and a VAE graph per shape): minutes each on a GPU, and past dynamo's
    recompile limit a silent fall back to eager. Now the whole shard traces what one full batch does."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(accel, "BACKEND", "eager")  # dynamo's tracing and guards, without inductor's codegen
    cfg = load_config("tiny", ["generate.per_class=10", "generate.shard_size=10", "generate.width=32",
                                "generate.height=32", "generate.steps_min=3", "generate.steps_max=3",
                                "runtime.generate.batch_size=4", "runtime.generate.compile=on",
                                "runtime.generate.dtype=fp32", "generate.samplers=[euler, euler_a, plms]"])
    plan(workdir, cfg)

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    torch._dynamo.reset()
    counters.clear()
    pipeline.clear_pipeline_cache()
    try:
        rows = render(workdir, cfg, 0)
        whole_shard = graphs()
        assert sorted({r["sampler"] for r in rows}) == ["euler", "euler_a", "plms"] and len(rows) == 10
        # one full batch of one sampler, on a fresh dynamo: the graphs any compiled run must trace
        pipeline.clear_pipeline_cache()
        torch._dynamo.reset()
        counters.clear()
        prep = pipeline.prepared_pipeline(RenderModel("tiny", None, "tiny@graphs", "sks", None), cfg.runtime.generate,
                                          LoraChoice(None, None), 1.0)
        pipeline.render_batch(prep.pipe, prep.switch, [dict(r, sampler="euler") for r in rows[:4]], prep.prompts)
        one_batch = graphs()
        assert one_batch >= 2  # the UNet and the VAE decoder were traced
        assert whole_shard == one_batch
        assert {r["batch_size"] for r in rows} == {4}
        assert sorted(r["batch_position"] for r in rows) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]

        # a row from the middle of a batch renders again as the same bytes
        from dermt2im.core.fileio import sha256_bytes
        from dermt2im.core.imaging import encode_png
        from dermt2im.core.manifest import SYNTHETIC, read_manifest
        from dermt2im.generate.pngmeta import png_text

        recorded = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
        row = {k: None if v is None or (isinstance(v, float) and np.isnan(v)) else v
               for k, v in recorded[recorded["batch_position"] == 1].iloc[0].to_dict().items()}
        again = pipeline.render_as_recorded(prep.pipe, prep.switch, row, prep.prompts)
        assert sha256_bytes(encode_png(again, png_text(row))) == row["sha256"]
    finally:
        pipeline.clear_pipeline_cache()
        torch._dynamo.reset()


def test_a_padded_batch_out_of_memory_is_split_and_each_part_rendered_at_its_own_size(workdir, monkeypatch):
    cfg = load_config("tiny", ["generate.per_class=3", "generate.shard_size=3", "generate.width=32",
                                "generate.height=32", "generate.steps_min=2", "generate.steps_max=2",
                                "runtime.generate.batch_size=4", "runtime.generate.compile=on",
                                "generate.samplers=[euler]"])
    plan(workdir, cfg)
    real, sizes = shards.render_batch, []

    def out_of_memory_above_two(pipe, switch, rows, prompts=None, pad_to=None):
        sizes.append(pad_to)
        if (pad_to or len(rows)) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(pipe, switch, rows, prompts, pad_to=pad_to)

    monkeypatch.setattr(shards, "render_batch", out_of_memory_above_two)
    rows = render(workdir, cfg, 0, pipe=build_tiny_pipeline(0))
    assert sizes == [4, 1, 2]  # 3 rows padded to 4, then 1 + 2 unpadded
    assert sorted((r["batch_size"], r["batch_position"]) for r in rows) == [(1, 0), (2, 0), (2, 1)]
