"""Choosing where units run, without a Ray cluster: static partitions, the threaded runner, where
renderer actors would be placed, and that nothing imports Ray unless it is needed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dermt2im.cli import app
from dermt2im.core.config import load_config
from dermt2im.core.runtime import ScaleConfig
from dermt2im.generate.plan import update_plan
from dermt2im.runners.partition import Partition, PartitionError
from dermt2im.runners.ray_runner import ClusterError, check_fits, placements
from dermt2im.runners.sequential import run_stage

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["generate.per_class=2", "generate.shard_size=1", "generate.width=32", "generate.height=32",
         "generate.steps_min=2", "generate.steps_max=2", "generate.samplers=[euler]"]


class _Numbers:
    """A stage whose units are numbers; ``run`` sleeps ``delay(u)`` and fails for ``bad``."""

    name = "numbers"

    def __init__(self, n: int, delay=lambda u: 0.0, bad: int | None = None) -> None:
        self.n, self.delay, self.bad = n, delay, bad
        self.started: list[int] = []
        self.threads: set[str] = set()

    def units(self):
        return list(range(self.n))

    def describe(self, u):
        return f"number {u}"

    def key(self, u):
        return str(u)

    def finished(self, u, key):
        return {"u": u, "cached": True} if u == 0 else None

    def run(self, u, key):
        self.started.append(u)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay(u))
        if u == self.bad:
            raise ValueError(f"number {u} is bad")
        return {"u": u}

    def close(self, results):
        return {"seen": [r["u"] for r in results]}


def test_partitions_hold_every_shard_once_and_keep_them_when_the_plan_grows(tmp_path):
    cfg = load_config("tiny", ["generate.per_class=6", "generate.shard_size=2"])
    plan = update_plan(tmp_path / "plan.parquet", cfg.generate, token="sks")

    class Shards(_Numbers):
        def units(self):
            return sorted(int(s) for s in plan["shard"].unique())

    shards = Shards(0).units()
    parts = [Partition(Shards(0), i, 4).units() for i in range(4)]
    assert sorted(sum(parts, [])) == shards and all(parts)
    assert all(s % 4 == i for i, part in enumerate(parts) for s in part)
    bigger = load_config("tiny", ["generate.per_class=10", "generate.shard_size=2"])
    plan = update_plan(tmp_path / "plan.parquet", bigger.generate, token="sks")  # extended, never renumbered
    grown = [Partition(Shards(0), i, 4).units() for i in range(4)]
    assert all(set(before) <= set(after) for before, after in zip(parts, grown))
    assert len(sum(grown, [])) == len(plan["shard"].unique()) > len(shards)
    for index, count in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(PartitionError):
            Partition(Shards(0), index, count)


def test_the_worker_command_refuses_a_partition_outside_the_range_in_one_line(tmp_path, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(app, ["worker", "--workdir", str(tmp_path / "w"), "--shard-index", "2", "--num-shards", "2"])
    assert r.exit_code == 2 and "shard_index 2 is not in 0..1" in r.output and "Traceback" not in r.output
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")  # a Slurm array task numbered 5: its index comes from there
    r = runner.invoke(app, ["worker", "--workdir", str(tmp_path / "w"), "--num-shards", "4"])
    assert r.exit_code == 2 and "shard_index 5 is not in 0..3" in r.output
    assert not (tmp_path / "w" / "config.yaml").exists()  # refused before anything was saved


def test_units_run_at_once_keep_their_order_and_the_first_failure_stops_the_rest():
    stage = _Numbers(5, delay=lambda u: 1.0 if u == 1 else 0.0)
    said: list[tuple[int, float]] = []
    started = time.monotonic()
    out = run_stage(stage, workers=3, on_unit=lambda i, n, r: said.append((r.summary["u"], time.monotonic() - started)))
    assert out.closing == {"seen": [0, 1, 2, 3, 4]} and [u.cached for u in out.units] == [True] + [False] * 4
    when = dict(said)
    # 1 was slow: the others were reported as they ended, long before it (not all at the end)
    assert [u for u, _ in said][-1] == 1 and max(when[2], when[3], when[4]) < when[1] - 0.5, said
    assert len(stage.threads) > 1
    assert sorted(stage.started) == [1, 2, 3, 4]  # the finished unit was not run

    failing = _Numbers(30, delay=lambda u: 0.05, bad=2)
    with pytest.raises(ValueError, match="number 2 is bad"):
        run_stage(failing, workers=2)
    assert len(failing.started) < 29  # the units not yet started when 2 failed never ran


def test_renderers_are_placed_one_per_gpu_or_one_per_cpu_node():
    gpu_node = {"NodeID": "g", "Alive": True, "Resources": {"CPU": 16.0, "GPU": 4.0}}
    small = {"NodeID": "s", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}
    head = {"NodeID": "h", "Alive": True, "Resources": {"CPU": 0.0}}
    dead = {"NodeID": "d", "Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}}
    scale = ScaleConfig(ray_address="auto")
    assert placements([gpu_node, small, head, dead], scale) == ["g"] * 4 + ["s"]
    assert placements([gpu_node, small], scale.model_copy(update={"gpus_per_actor": 2.0})) == ["g"] * 2
    assert placements([gpu_node, small], scale.model_copy(update={"actors_per_node": 2})) == ["g"] * 2 + ["s"]
    cpu = scale.model_copy(update={"gpus_per_actor": 0.0})
    assert placements([gpu_node, small, head], cpu) == ["g", "s"]  # the head has no CPU for it
    with pytest.raises(ClusterError, match="no node of the Ray cluster at auto has 1 GPU"):
        check_fits([head], 1.0, 1.0, "a validate task", "auto")
    check_fits([small], 0.5, 1.0, "a validate task", "auto")


def test_scale_settings_are_checked_and_never_change_a_key():
    a, b = load_config("tiny"), load_config("tiny", ["scale.ray_address=ray://head:10001", "scale.gpus_per_cell=0.5"])
    assert (a.generate, a.validation) == (b.generate, b.validation) and b.scale.gpus_per_cell == 0.5
    from dermt2im.core.errors import ConfigError

    with pytest.raises(ConfigError, match="scale.ray_address.*not local, auto, host:port or ray://host:port"):
        load_config("tiny", ["scale.ray_address=http://head:8265"])
    from dermt2im.flows.settings import orchestration

    with pytest.raises(ConfigError, match="parallel_workers and scale.ray_address are both set"):
        orchestration(load_config("tiny", ["scale.ray_address=auto", "orchestration.parallel_workers=2"]))


def test_a_saved_config_with_lease_settings_still_loads(caplog):
    cfg = load_config("tiny", ["runtime.generate.lease_seconds=30"])
    assert "lease_seconds" not in cfg.runtime.generate.model_dump()
    assert "runtime.generate.lease_seconds is no longer used" in caplog.text


_NO_RAY = """
import json, sys
from typer.testing import CliRunner
from dermt2im.cli import app
import dermt2im.flows.factory, dermt2im.flows.generate, dermt2im.flows.validate, dermt2im.flows.generate_worker  # noqa: F401
work, small = sys.argv[1], json.loads(sys.argv[2])
sets = [a for o in small for a in ("--set", o)]
run = lambda *args: CliRunner().invoke(app, [*args, "--workdir", work, "--base-model-only"])
saved = CliRunner().invoke(app, ["config", "--workdir", work, "--config", "tiny", *sets, "--save"])
assert saved.exit_code == 0, saved.output
first = run("generate")
again = run("generate", "--set", "scale.ray_address=127.0.0.1:9")  # all done: the address is never tried
ray_then = "ray" in sys.modules
more = run("generate", "--per-class", "3", "--set", "scale.ray_address=127.0.0.1:9")  # work to do: it is
print("RESULT " + json.dumps({"codes": [first.exit_code, again.exit_code, more.exit_code], "ray": ray_then,
                              "more": more.output[-600:], "first": first.output[-600:]}))
"""


@pytest.mark.slow
def test_nothing_imports_or_starts_ray_unless_work_is_left_for_a_cluster(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NO_RAY, str(tmp_path / "w"), json.dumps(SMALL)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    assert out["codes"] == [0, 0, 2], out
    assert out["ray"] is False  # a plain run and a cached one never imported Ray
    assert "nothing answers at the Ray cluster address 127.0.0.1:9" in out["more"] and "Traceback" not in out["more"]
