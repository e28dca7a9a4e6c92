"""The generation plan: deterministic, extendable without changing existing rows."""

import logging

import pandas as pd
import pytest

from dermt2im.core.config import load_config
from dermt2im.core.manifest import PLAN, read_manifest
from dermt2im.core.specs import GenerateConfig
from dermt2im.generate.plan import build_plan, sample_seed, update_plan
from dermt2im.generate.samplers import UnknownSamplerError

CFG = GenerateConfig(per_class=12, shard_size=5, steps_min=20, steps_max=26, samplers=("euler", "euler_a", "plms"))


def test_same_config_gives_the_same_plan_bit_for_bit(tmp_path):
    a, b = build_plan(CFG, token="sks"), build_plan(CFG, token="sks")
    pd.testing.assert_frame_equal(a, b)
    update_plan(tmp_path / "a.parquet", CFG, token="sks")
    update_plan(tmp_path / "b.parquet", CFG, token="sks")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert list(a.columns) == PLAN.columns and len(a) == 24
    assert set(a["label"]) == {"benign", "malignant"} and a["sample_key"].is_unique


def test_rows_follow_the_config():
    plan = build_plan(CFG, token="sks")
    benign = plan[plan["label"] == "benign"].reset_index(drop=True)
    assert benign["sample_key"].tolist()[:2] == ["benign-000000", "benign-000001"]
    assert benign["sampler"].tolist()[:6] == ["euler", "euler_a", "plms"] * 2  # samplers cycle fastest
    assert set(benign["transformation"]) <= set(CFG.transformations)
    assert benign.loc[3, "prompt"] == "a dermoscopic image of sks benign skin lesion" + CFG.transformations[1]
    assert (plan["negative_prompt"] == CFG.negative_prompt).all()
    assert plan["steps"].between(20, 26).all()
    assert plan.groupby("shard")["steps"].nunique().eq(1).all()  # one step count per shard: full batches
    assert (plan["guidance_scale"] == 7.0).all() and (plan["lora_scale"] == 0.8).all()
    assert ((plan["width"] == 512) & (plan["height"] == 512)).all()
    # seeds: distinct, non-negative int63, a pure function of (seed, label, index)
    assert plan["seed"].is_unique and plan["seed"].between(0, 2**63 - 1).all()
    assert plan.loc[0, "seed"] == sample_seed(CFG.seed, "benign", 0)
    other = build_plan(CFG.model_copy(update={"seed": 99}), token="sks")
    assert not set(other["seed"]) & set(plan["seed"])
    # shards hold one class each and interleave: benign 0, 2, 4 ...; malignant 1, 3, 5 ...
    assert plan.groupby("shard")["label"].nunique().eq(1).all()
    assert sorted(set(benign["shard"])) == [0, 2, 4]
    assert benign.groupby("shard").size().tolist() == [5, 5, 2]


def test_steps_are_spread_over_the_range():
    plan = build_plan(CFG.model_copy(update={"shard_size": 10}), token="sks", per_class=100)
    assert set(plan["steps"]) == set(range(20, 27))


def test_more_samples_extend_the_plan_without_changing_existing_rows(tmp_path):
    path = tmp_path / "plan.parquet"
    small = update_plan(path, CFG, token="sks", per_class=7)
    big = update_plan(path, CFG, token="sks", per_class=12)
    assert len(small) == 14 and len(big) == 24
    old = big[big["sample_key"].isin(small["sample_key"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, small)
    # the grown plan equals the plan built at full size in one go, file bytes included
    fresh = tmp_path / "fresh.parquet"
    update_plan(fresh, CFG, token="sks", per_class=12)
    assert path.read_bytes() == fresh.read_bytes()
    # asking for fewer never shrinks the plan
    again = update_plan(path, CFG, token="sks", per_class=3)
    pd.testing.assert_frame_equal(again, read_manifest(path, PLAN))
    assert len(again) == 24


def test_changed_config_replans_changed_rows_and_says_so(tmp_path, caplog):
    path = tmp_path / "plan.parquet"
    before = update_plan(path, CFG, token="sks", per_class=4)
    with caplog.at_level(logging.WARNING, logger="dermt2im.generate.plan"):
        after = update_plan(path, CFG.model_copy(update={"guidance_scale": 5.0}), token="sks", per_class=6)
    assert "guidance_scale" in caplog.text and "re-planned" in caplog.text
    assert len(after) == 12 and (after["guidance_scale"] == 5.0).all()
    # only the changed column differs: seeds, prompts and samplers of planned rows stay as they were
    old = after[after["index"] < 4].reset_index(drop=True)
    pd.testing.assert_frame_equal(old.drop(columns="guidance_scale"), before.drop(columns="guidance_scale"))
    # an unchanged config leaves the file alone
    mtime = path.stat().st_mtime_ns
    update_plan(path, CFG.model_copy(update={"guidance_scale": 5.0}), token="sks", per_class=6)
    assert path.stat().st_mtime_ns == mtime


def test_bad_sampler_or_prompt_is_a_clear_error():
    with pytest.raises(UnknownSamplerError, match="unknown sampler.*'heun2'.*known samplers: ddim, dpmpp_2m, euler"):
        build_plan(CFG.model_copy(update={"samplers": ("euler", "heun2")}), token="sks")
    with pytest.raises(ValueError, match="placeholder"):
        build_plan(CFG.model_copy(update={"prompt": "a {colour} lesion"}), token="sks")


def test_smoke_and_paper_presets_plan():
    paper = load_config("paper").generate
    plan = build_plan(paper, token="sks", per_class=300)
    assert set(plan["sampler"]) == {"euler", "euler_a", "plms"} and plan["steps"].between(20, 26).all()
    smoke = build_plan(load_config("smoke").generate, token="sks")
    assert len(smoke) == 80 and smoke["prompt"].str.contains("sks malignant skin lesion").sum() == 40
    assert set(smoke["transformation"]) == set(load_config("smoke").generate.transformations)
