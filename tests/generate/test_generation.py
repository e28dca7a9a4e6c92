"""Sampler registry and batched, resumable shard rendering on the tiny model (CPU, 32 px, 2-3 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermt2im.core.config import load_config
from dermt2im.core.errors import ConfigError
from dermt2im.core.fileio import atomic_path, sha256_file
from dermt2im.core.manifest import PLAN, SYNTHETIC, read_manifest, write_manifest
from dermt2im.diffusion.models import build_tiny_pipeline
from dermt2im.generate import pipeline, shards
from dermt2im.generate.model import GenerationError
from dermt2im.generate.plan import build_plan
from dermt2im.generate.samplers import SAMPLERS, SamplerSwitch, UnknownSamplerError
from tests.generate.generate_fixtures import complete, generate, missing, render
from tests.generate.generate_fixtures import plan as make_plan

TINY = [
    "generate.per_class=6",
    "generate.shard_size=6",
    "generate.width=32",
    "generate.height=32",
    "generate.steps_min=2",
    "generate.steps_max=3",
    "runtime.generate.batch_size=4",
    "runtime.generate.writer_threads=2",
    "generate.samplers=[euler, euler_a]",
]


def tiny_cfg(*extra: str):
    return load_config("tiny", TINY + list(extra))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


def _row(seed: int, sampler: str = "euler_a", steps: int = 2) -> dict:
    return {"label": "benign", "prompt": "a dermoscopic image of sks benign skin lesion", "negative_prompt": "blurry",
            "sampler": sampler, "steps": steps, "guidance_scale": 7.0, "lora_scale": 0.8, "seed": seed,
            "width": 32, "height": 32}


# ---------------------------------------------------------------------------------------------
# samplers


def test_every_sampler_builds_from_the_pipeline_config(pipe):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    expected = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "plms": PNDMScheduler,
                "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
    assert set(SAMPLERS) == set(expected)
    for name, cls in expected.items():
        s = SAMPLERS[name](pipe.scheduler.config)
        assert type(s) is cls
        assert s.config.beta_schedule == "scaled_linear" and s.config.num_train_timesteps == 1000
    assert SAMPLERS["plms"](pipe.scheduler.config).config.skip_prk_steps is True
    assert SAMPLERS["dpmpp_2m"](pipe.scheduler.config).config.algorithm_type == "dpmsolver++"


def test_unknown_sampler_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown sampler 'k_lms'; known samplers: ddim, dpmpp_2m, euler, euler_a, plms"):
        SAMPLERS["k_lms"]
    with pytest.raises(UnknownSamplerError):
        build_plan(tiny_cfg().generate.model_copy(update={"samplers": ("euler", "k_lms")}), token="sks")
    with pytest.raises(ConfigError, match="unknown sampler.*'k_lms'"):  # refused with the config, before a plan
        tiny_cfg("generate.samplers=[euler, k_lms]")


def test_switching_sampler_swaps_the_scheduler_never_the_model(pipe):
    switch = SamplerSwitch(pipe)
    unet, vae, te = id(pipe.unet), id(pipe.vae), id(pipe.text_encoder)
    euler = switch.use("euler")
    assert pipe.scheduler is euler
    plms = switch.use("plms")
    assert pipe.scheduler is plms and type(plms).__name__ == "PNDMScheduler"
    assert switch.use("euler") is euler  # cached instance, built once
    assert (id(pipe.unet), id(pipe.vae), id(pipe.text_encoder)) == (unet, vae, te)


# ---------------------------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("sampler", ["euler_a", "plms"])
def test_an_image_does_not_depend_on_its_batch(pipe, sampler):
    """One CPU generator per image: the same seed gives the same pixels alone or in a batch of 8.

    On CPU the batched convolutions round differently in the last float bits, so after conversion
    to 8 bits a few pixels may differ by one level (measured: at most 1); never more."""
    switch = SamplerSwitch(pipe)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    batch = pipeline.render_batch(pipe, switch, [_row(s, sampler) for s in seeds])
    for i in (0, 5):
        alone = pipeline.render_batch(pipe, switch, [_row(seeds[i], sampler)])[0]
        diff = np.abs(alone.astype(int) - batch[i].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).max() > 10  # different seeds, different images


def test_batches_group_identical_settings():
    rows = [dict(_row(i, "euler" if i % 2 else "plms"), index=i) for i in range(10)]
    batches = shards.batches(rows, 3)
    assert sum(len(b) for b in batches) == 10 and max(len(b) for b in batches) == 3
    assert all(len({r["sampler"] for r in b}) == 1 for b in batches)
    with pytest.raises(ValueError, match="share sampler"):
        pipeline.render_batch(None, None, [_row(1, "euler"), _row(2, "plms")])


# ---------------------------------------------------------------------------------------------
# rendering shards


def _plan(workdir, cfg):
    return make_plan(workdir, cfg)


def test_render_shard_writes_pngs_with_parameters_and_a_reproducible_manifest(workdir, pipe):
    cfg = tiny_cfg()
    plan = _plan(workdir, cfg)
    recorded = render(workdir, cfg, 0, pipe=pipe)
    assert len(recorded) == 6
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    assert len(df) == 6 and df["sample_key"].is_unique and set(df["status"]) == {"rendered"}
    row = df.iloc[0]
    planned = plan.set_index("sample_key").loc[row["sample_key"]]
    for c in ("prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "seed", "width", "height"):
        assert row[c] == planned[c]
    assert row["base_model"].startswith("tiny@") and pd.isna(row["lora_sha256"])
    versions = json.loads(row["library_versions"])
    assert {"torch", "diffusers", "transformers", "peft", "python"} <= set(versions)
    assert row["dtype"] == "float32" and row["device"] == "cpu"
    assert sha256_file(row["path"]) == row["sha256"]

    from PIL import Image

    with Image.open(row["path"]) as im:
        assert im.size == (32, 32)
        text = dict(im.text)
    meta = json.loads(text["dermt2im"])
    assert meta["seed"] == row["seed"] and meta["sampler"] == row["sampler"] and meta["render_key"] == row["render_key"]
    assert f"Seed: {row['seed']}" in text["parameters"] and "CFG scale: 7" in text["parameters"]
    assert str(workdir.root) not in json.dumps(text)  # parameters only: no paths, nothing about anyone

    # a second call renders nothing; the rows are identical
    assert render(workdir, cfg, 0, pipe=pipe) == []
    pd.testing.assert_frame_equal(read_manifest(workdir.synthetic_manifest, SYNTHETIC), df)


def test_interrupted_shard_resumes_to_exactly_the_plan(workdir, tmp_path, pipe, monkeypatch):
    """A writer fails mid-shard (half-written temporary file) and a killed run left a stale temporary:
    the re-run ends with exactly the planned images, no duplicates, no temporaries, and the same
    bytes as an uninterrupted run."""
    from dermt2im.core.workdir import Workdir

    cfg = tiny_cfg()
    _plan(workdir, cfg)
    real, calls = shards.write_png, {"n": 0}

    def flaky(target, data):
        calls["n"] += 1
        if calls["n"] == 3:
            with atomic_path(target) as tmp:
                tmp.write_bytes(data[: len(data) // 2])
                raise OSError("disk went away mid-write")
        return real(target, data)

    monkeypatch.setattr(shards, "write_png", flaky)
    stale = workdir.synthetic / "benign" / ".benign-000004.png.dead.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a png")
    with pytest.raises(OSError, match="mid-write"):
        render(workdir, cfg, 0, pipe=pipe)
    partial = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    assert 0 < len(partial) < 6
    # the half-written temporary was removed by the failing writer, the stale one at the start
    assert not list(workdir.synthetic.rglob("*.tmp"))

    monkeypatch.setattr(shards, "write_png", real)
    render(workdir, cfg, 0, pipe=pipe)
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    files = sorted(workdir.synthetic.rglob("*"))
    assert len(df) == 6 and df["sample_key"].is_unique
    assert not [p for p in files if p.name.endswith(".tmp")]
    assert len([p for p in files if p.suffix == ".png"]) == 6
    assert all(sha256_file(p) == s for p, s in zip(df["path"], df["sha256"]))

    # the same images as an uninterrupted run (the resumed batches are composed differently, and
    # CPU batched convolutions may round a pixel by one level: see test_an_image_does_not_depend_on_its_batch)
    clean = Workdir.at(tmp_path / "clean")
    _plan(clean, cfg)
    render(clean, cfg, 0, pipe=pipe)
    ref = read_manifest(clean.synthetic_manifest, SYNTHETIC).set_index("sample_key")
    for key, path in zip(df["sample_key"], df["path"]):
        assert _max_diff(path, ref.loc[key, "path"]) <= 1


def test_files_written_before_a_crash_are_recorded_without_rendering(workdir, pipe, monkeypatch):
    cfg = tiny_cfg()
    _plan(workdir, cfg)
    render(workdir, cfg, 0, pipe=pipe)
    full = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    write_manifest(full.iloc[:2], workdir.synthetic_manifest, SYNTHETIC)  # the manifest update was lost

    def no_render(*a, **k):
        raise AssertionError("must not render")

    monkeypatch.setattr(shards, "render_batch", no_render)
    adopted = render(workdir, cfg, 0, pipe=pipe)
    assert len(adopted) == 4
    again = read_manifest(workdir.synthetic_manifest, SYNTHETIC).set_index("sample_key")
    assert again.sort_index()["sha256"].equals(full.set_index("sample_key").sort_index()["sha256"])


def test_a_deleted_image_is_rendered_again(workdir, tmp_path, pipe):
    cfg = tiny_cfg()
    _plan(workdir, cfg)
    render(workdir, cfg, 0, pipe=pipe)
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    gone = df.iloc[1]
    import shutil

    shutil.move(gone["path"], tmp_path / "before.png")
    assert missing(workdir, cfg, 0) == 1
    redone = render(workdir, cfg, 0, pipe=pipe)
    assert [r["sample_key"] for r in redone] == [gone["sample_key"]]
    # the same image (rendered alone now, in a batch before: equal up to one level, see above)
    assert redone[0]["render_key"] == gone["render_key"] and _max_diff(gone["path"], tmp_path / "before.png") <= 1
    assert len(read_manifest(workdir.synthetic_manifest, SYNTHETIC)) == 6


def test_a_shard_is_complete_only_when_every_row_is_recorded_and_its_file_is_there(workdir, pipe, monkeypatch):
    from dermt2im.core import storage

    cfg = tiny_cfg()
    plan = _plan(workdir, cfg)
    lookups: list = []
    real_is_file = storage.is_file
    monkeypatch.setattr(storage, "is_file", lambda p: lookups.append(p) or real_is_file(p))
    assert not complete(workdir, cfg, 0)
    assert lookups == []  # nothing recorded: decided from the manifest alone, no file looked up
    render(workdir, cfg, 0, pipe=pipe)
    recorded = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    assert complete(workdir, cfg, 0, plan=plan, recorded=recorded)
    # a snapshot taken before the last row was recorded says "not yet"
    assert not complete(workdir, cfg, 0, plan=plan, recorded=recorded.iloc[:-1])
    # rows rendered with other settings (another render key) do not count
    assert not complete(workdir, cfg, 0, plan=plan, recorded=recorded.assign(render_key="other"))
    Path(recorded.iloc[0]["path"]).unlink()
    assert not complete(workdir, cfg, 0)  # recorded, but its file is gone


def _max_diff(a, b) -> int:
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (a, b))
    return int(np.abs(x - y).max())


def _make_lora(folder):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dermt2im.diffusion.lora_files import save_lora_files
    from dermt2im.diffusion.models import build_tiny_components, tiny_identity

    unet = build_tiny_components(0)["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    meta = {"base_model": "tiny", "base_model_identity": tiny_identity(0), "instance_token": "sks"}
    return save_lora_files(folder, {"unet": get_peft_model_state_dict(unet)}, rank=4, alpha=4, kohya=False,
                           metadata=meta)["diffusers"]


def test_generate_fuses_the_lora_given_and_records_it(workdir, tmp_path):
    cfg = tiny_cfg("generate.per_class=2", "generate.shard_size=2")
    base = generate(workdir, cfg, base_model_only=True)  # the base model alone, asked for explicitly
    assert base.lora is None and base.planned == base.rendered == 4
    base_df = read_manifest(workdir.synthetic_manifest, SYNTHETIC).set_index("sample_key").sort_index()
    assert base_df["base_model_only"].eq(True).all()  # marked: never a lesion of a class for validation
    from dermt2im.validate.regimes import usable_synthetic

    assert usable_synthetic(base_df.assign(status="accepted", memorised=False).reset_index()).empty

    weights = _make_lora(workdir.root / "lora" / "run-1")
    with pytest.raises(GenerationError, match="no LoRA trained for the current config"):
        generate(workdir, cfg)  # a folder in W/lora that training did not record for this config is not used
    report = generate(workdir, cfg, lora=weights.parent)  # the LoRA changes every render key: all rendered again
    assert report.lora == str(weights.parent.resolve()) and report.rendered == 4 and report.skipped == 0
    assert "given with --lora" in report.summary()
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC).set_index("sample_key").sort_index()
    assert (df["lora_sha256"] == sha256_file(weights)).all() and (df["lora_path"] == str(weights.resolve())).all()
    assert (df["sha256"] != base_df["sha256"]).all()
    assert df["base_model_only"].eq(False).all()
    assert len(usable_synthetic(df.assign(status="accepted", memorised=False).reset_index())) == 4
    prep = next(iter(pipeline._CACHE.values()))
    assert prep.lora_sha256 == sha256_file(weights)  # one cached pipeline, LoRA fused
    assert "Lora hashes" in json.dumps(_png_text(df["path"].iloc[0]))

    again = generate(workdir, cfg, lora=weights.parent)
    assert again.rendered == 0 and again.skipped == 4
    assert "4 planned" in again.summary() and "0 rendered" in again.summary()
    pipeline.clear_pipeline_cache()


def _png_text(path):
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


def test_generate_rejects_unknown_shards_and_missing_lora(workdir):
    cfg = tiny_cfg()
    with pytest.raises(GenerationError, match="no LoRA trained for the current config: its train key needs the training seeds .no training images"):
        generate(workdir, cfg)  # images of the base model alone are not lesions of a class: only when asked
    with pytest.raises(GenerationError, match="not in the plan"):
        generate(workdir, cfg, shards=[99], base_model_only=True)
    with pytest.raises(GenerationError, match="not found"):
        generate(workdir, cfg, lora=workdir.root / "nope")
    plan = read_manifest(workdir.plan_manifest, PLAN)
    assert len(plan) == 12
