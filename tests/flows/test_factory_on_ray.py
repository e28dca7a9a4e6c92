"""The factory flow on the smoke preset with ``scale.ray_address`` pointing at the session's Ray
cluster (tests/conftest.py): every shard and every validation cell is its own Prefect task run,
named by what it does and tagged ``ray``, and its work happens on the cluster, never in the flow's
process. A re-run with nothing changed is served from cache without contacting any Ray cluster."""

from __future__ import annotations

import pytest

from dermt2im.core.manifest import PLAN, SYNTHETIC, read_manifest
from dermt2im.core.views import synthetic_view
from dermt2im.core.workdir import Workdir
from dermt2im.flows.factory import factory
from tests.flows.test_factory import SMALL
from tests.prefect_utils import task_runs, task_states

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ON_RAY = [o for o in SMALL if not o.startswith(("generate.per_class", "generate.shard_size"))] + [
    "generate.per_class=4", "generate.shard_size=2",  # 4 shards
    "scale.gpus_per_actor=1", "scale.gpus_per_cell=1",  # one renderer / one cell per (declared) GPU
]


def test_the_factory_renders_and_validates_on_ray_one_task_run_per_unit(prefect_harness, workdir, ray_cluster,
                                                                        mlflow_uri, monkeypatch):
    from dermt2im.generate import shards
    from dermt2im.validate import cell

    def not_here(*args, **kwargs):
        raise AssertionError("this ran in the flow's own process, not on the Ray cluster")

    # Ray's worker processes do not see these patches: only work done in this process would fail.
    monkeypatch.setattr(shards, "render_batch", not_here)
    monkeypatch.setattr(cell, "fit_and_test", not_here)

    root = str(workdir.root)
    state = factory(root, config="tiny", overrides=ON_RAY + [f"scale.ray_address={ray_cluster}"], return_state=True)
    out = state.result()
    states = task_states(state)
    assert all(set(states[s]) == {"Completed"} for s in ("generate", "validate", "quality")), states

    w = Workdir.at(root)
    plan = read_manifest(w.plan_manifest, PLAN)
    synthetic = synthetic_view(w)
    assert len(synthetic) == len(plan) == 8 and synthetic["sha256"].notna().all()
    assert out["synthetic"]["rendered"] == 8 and (w.reports / "table_iv.md").is_file()

    runs = task_runs(state)
    render = sorted(r.name for r in runs if "stage:generate" in r.tags)
    assert render == sorted(f"render shard {s} ({'benign' if s % 2 == 0 else 'malignant'})"
                            for s in sorted(plan["shard"].unique()))  # one task run per shard
    cells = sorted(r.name for r in runs if "stage:validate" in r.tags)
    assert cells == ["validate vit baseline seed 0", "validate vit hybrid seed 0"]  # one per cell
    for r in runs:
        if {"stage:generate", "stage:validate"} & set(r.tags):
            assert "ray" in r.tags and "gpu" not in r.tags, (r.name, r.tags)  # Ray, not a tag limit, shares GPUs

    # Nothing changed: served from cache, and the (now unreachable) cluster is never contacted.
    again = factory(root, overrides=["scale.ray_address=127.0.0.1:9"], return_state=True)
    cached = task_states(again)
    assert set(cached["generate"]) == {"Cached"} and set(cached["validate"]) == {"Cached"}, cached
