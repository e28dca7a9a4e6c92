"""Scheduled regeneration, end to end: a real Prefect server creates the scheduled runs of
deployments/prefect.yaml's ``regenerate-weekly`` and a ``cpu`` process worker runs one to completion.

The deployment is registered with ``prefect deploy`` from the shipped prefect.yaml, with two
changes only: its parameters point at a small workdir made here, and a 5-second interval is added
beside its Monday 03:00 UTC cron, so that one run falls due within seconds. The server must have
created runs for both schedules (the cron's on Mondays at 03:00 UTC, the interval's now), and
the run the worker picked must complete and have grown the plan; its log shows the stages' progress
and none of the libraries' known harmless notices.

This is the check that catches a scheduler that silently never inserts runs (Prefect 3.8.8 with
SQLAlchemy 2.1 logs "Can't evaluate bulk DML statement" every loop and schedules nothing).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.flows.prefect_server import prefect_server, process_worker
from tests.processes import wait_until

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
DEPLOYMENT = "regenerate-weekly"

pytestmark = pytest.mark.slow

TINY = [
    "phantoms.n_seed=12", "phantoms.n_test=4", "phantoms.size=40", "phantoms.test_styles=[isic]",
    "preprocess.size=32", "train.max_steps=2", "train.validation_images_per_class=0",
    "generate.per_class=2", "generate.shard_size=4", "generate.width=32", "generate.height=32",
    "generate.steps_min=2", "generate.steps_max=2", "runtime.generate.batch_size=4",
    "validate.models=[vit]", "validate.seeds=[0]", "validate.epochs=1", "validate.image_size=32",
    "validate.segmentation_samples=0",
]


def _prepare_workdir(root: Path) -> int:
    """Seeds, a LoRA and a first plan, through the sequential runner (what regeneration extends)."""
    from dermt2im import pipelines
    from dermt2im.core.workdir import open_workdir
    from dermt2im.generate.plan import planned_per_class
    from dermt2im.runners.sequential import run_pipeline

    w, cfg = open_workdir(root, "tiny", TINY)
    run_pipeline([*pipelines.seeds(w, cfg), *pipelines.train(w, cfg), *pipelines.generate(w, cfg)])
    return planned_per_class(w.plan_manifest)


def _test_prefect_yaml(tmp: Path, workdir: Path) -> Path:
    """prefect.yaml with only regenerate-weekly, on this workdir, and a 5 s interval beside its cron."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == DEPLOYMENT]
    assert dep["schedules"] == [{"cron": "0 3 * * 1", "timezone": "UTC", "active": True}]
    dep["parameters"] = {**dep["parameters"], "workdir": str(workdir), "per_class_increment": 2,
                         "overrides": ["orchestration.gpu_deployments=false"]}  # no cuda pool here
    dep["schedules"] = [*dep["schedules"], {"interval": 5, "active": True}]
    spec["deployments"] = [dep]
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _runs(server, deployment_id: str) -> list[dict]:
    with server.api() as api:
        return api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}},
                                                   "sort": "EXPECTED_START_TIME_ASC"}).json()



def test_regenerate_weekly_is_scheduled_and_a_worker_runs_it(tmp_path):
    from dermt2im.generate.plan import planned_per_class

    work = tmp_path / "work"
    before = _prepare_workdir(work)
    prefect_file = _test_prefect_yaml(tmp_path, work)
    with prefect_server(tmp_path / "server") as server:
        server.cli("work-pool", "create", "cpu", "--type", "process")
        server.cli("--no-prompt", "deploy", "--prefect-file", str(prefect_file), "--name", DEPLOYMENT, cwd=ROOT)
        with server.api() as api:
            dep = api.get(f"/deployments/name/regenerate/{DEPLOYMENT}").json()
        assert {s["schedule"].get("cron") for s in dep["schedules"]} == {"0 3 * * 1", None}

        runs = wait_until(lambda: _of_both_schedules(_runs(server, dep["id"])), 60, "scheduled runs of both schedules",
                          interval=1.0)
        assert all(r["state"]["type"] == "SCHEDULED" for r in runs)

        # One polling pass (--run-once), one run at a time (--limit 1): the first run that is due.
        worker_env = {"DERMT2IM_PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with process_worker(server, "cpu", tmp_path, ["--run-once", "--limit", "1"], worker_env) as worker:
            code = worker.wait(600)
        full_log = worker.log.read_text(errors="replace")
        log = full_log[-4000:]
        finished = [r for r in _runs(server, dep["id"]) if r["state"]["type"] not in ("SCHEDULED", "PENDING")]
        assert code == 0 and finished, f"worker exited {code}; no run left the Scheduled state\n{log}"
        assert [r["state"]["type"] for r in finished] == ["COMPLETED"], f"{finished}\n{log}"
        assert not server.log_lines("Can't evaluate bulk DML")
    # What the worker printed: the stages' progress lines, none of the libraries' known harmless notices.
    assert re.search(r"render shard \d+: 2/2 images in \d+ s", full_log), log
    assert re.search(r"fit vit hybrid seed 0: 1/1 epochs in", full_log), log
    for notice in ("requires torchvision (not installed)", "No LoRA keys associated to CLIPTextModel", "kernels-community"):
        assert notice not in full_log, notice
    assert planned_per_class(Path(work) / "manifests" / "plan.parquet") == before + 2


def _of_both_schedules(runs: list[dict]) -> list[dict] | None:
    cron = [r for r in runs if _is_monday_3am(r)]
    return runs if cron and len(cron) < len(runs) else None


def _is_monday_3am(run: dict) -> bool:
    when = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
    return when.weekday() == 0 and (when.hour, when.minute) == (3, 0) and when.utcoffset().total_seconds() == 0

