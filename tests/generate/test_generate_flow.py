"""The generate flow end to end on the tiny model: plan -> shards (gpu tag) -> gate + audit -> artifacts."""

import os

import pytest

from dermt2im.core.manifest import SYNTHETIC, read_manifest
from dermt2im.core.views import synthetic_view
from dermt2im.flows.generate import generate
from tests.quality.gate_config import FULL_GATE
from tests.prefect_utils import task_states

pytestmark = pytest.mark.slow
SMALL = FULL_GATE + [
    "generate.per_class=2",
    "generate.shard_size=2",
    "generate.width=32",
    "generate.height=32",
    "generate.steps_min=2",
    "generate.steps_max=2",
    "runtime.generate.batch_size=2",
]


def test_generate_flow_renders_assesses_publishes_then_serves_cache(prefect_harness, workdir):
    state = generate(str(workdir.root), config="tiny", overrides=SMALL, base_model_only=True, return_state=True)
    out = state.result()
    assert out["planned"] == 4 and out["shards"] == [0, 1] and out["rendered"] == 4 and out["lora"] is None
    df = synthetic_view(workdir)
    assert len(df) == 4 and df["sample_key"].is_unique and df["status"].isin(["accepted", "rejected"]).all()
    # the untrained tiny model draws noise, and the gate says so
    assert out["reasons"].get("noise", 0) == out["rejected"] == 4
    assert (workdir.reports / "quality.md").is_file() and (workdir.reports / "grids" / "overview.png").is_file()
    assert {"generate-quality", "generate-counts", "generate-grid-overview", "quality-shortcuts"} <= set(out["artifacts"])
    first = task_states(state)
    assert set(first) >= {"generate", "quality"} and "Cached" not in sum(first.values(), [])
    planned_at = workdir.plan_manifest.stat().st_mtime_ns

    again = generate(str(workdir.root), base_model_only=True, return_state=True)  # the workdir's saved config
    second = task_states(again)
    assert set(second["generate"]) == {"Cached"} and workdir.plan_manifest.stat().st_mtime_ns == planned_at
    assert set(second["quality"]) == {"Cached"}
    assert read_manifest(workdir.synthetic_manifest, SYNTHETIC)["sha256"].tolist() == df["sha256"].tolist()

    os.remove(df.loc[df["shard"] == 1, "path"].iloc[0])  # a lost file is rendered again, not served from cache
    third = generate(str(workdir.root), base_model_only=True, return_state=True)
    states = task_states(third)
    assert third.result()["rendered"] == 1
    assert sorted(states["generate"]) == ["Cached", "Completed"]
    final = synthetic_view(workdir)
    assert len(final) == 4 and set(final["sample_key"]) == set(df["sample_key"])
    assert final["status"].isin(["accepted", "rejected"]).all()  # the re-rendered image was assessed
