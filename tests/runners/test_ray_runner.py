"""Generation on a real Ray cluster (tests/conftest.py ``ray_cluster``: a head plus two worker nodes
on 127.0.0.1, CPU only, one declared GPU each): one renderer actor per GPU, one of them SIGKILLed
in the middle of a shard; the plan still completes with exactly its rows, each PNG matching its
sha256, nothing stray or half-written, with the manifests and images in the workdir or on a local
S3 endpoint (moto). Also: the pool's own replacement of an actor Ray gave up on, its cap on
attempts, and errors raised by a unit reaching the caller as themselves."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from tests.core.test_storage import s3_bucket  # noqa: F401  (fixture)
from tests.processes import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ROOT = Path(__file__).resolve().parents[2]
SLOW_WRITES = str(Path(__file__).resolve().parent / "slow_writes")
PER_CLASS, SHARD_SIZE = 8, 2  # 2 classes x 8 images in shards of 2: 8 shards
OVERRIDES = [f"generate.per_class={PER_CLASS}", f"generate.shard_size={SHARD_SIZE}", "generate.width=32",
             "generate.height=32", "generate.steps_min=2", "generate.steps_max=2", "runtime.generate.batch_size=1",
             "runtime.generate.writer_threads=1", "generate.samplers=[euler]",
             # one renderer per (declared) GPU, as on a real cluster
             "scale.gpus_per_actor=1", "scale.cpus_per_actor=1"]
TEST_ENV = ["DERMT2IM_TEST_WRITE_DELAY", "PYTHONPATH"]  # forwarded to the Ray workers: slow PNG writes




def _in_background(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("where", ["workdir", "s3"])
def test_a_renderer_killed_mid_shard_is_restarted_and_the_plan_completes_exactly(ray_cluster, tmp_path, where,
                                                                                   request, monkeypatch):
    from dermt2im.core import storage
    from dermt2im.core.fileio import sha256_bytes
    from dermt2im.core.manifest import PLAN, SYNTHETIC, pending_parts, read_manifest
    from dermt2im.core.workdir import open_workdir
    from dermt2im.runners.ray_runner import on_ray
    from dermt2im.runners.sequential import run_stage
    from tests.generate.generate_fixtures import stage as generate_stage

    forward = ["MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", *TEST_ENV]
    overrides = OVERRIDES + [f"scale.ray_address={ray_cluster}"]
    if where == "s3":
        import fsspec

        bucket = request.getfixturevalue("s3_bucket")
        overrides += [f"storage.manifests={bucket}/m", f"storage.images={bucket}/images"]
        s3 = fsspec.config.conf["s3"]  # the endpoint reaches the Ray workers as fsspec's own variables
        for name, value in {"FSSPEC_S3_ENDPOINT_URL": s3["endpoint_url"], "FSSPEC_S3_KEY": s3["key"],
                            "FSSPEC_S3_SECRET": s3["secret"]}.items():
            monkeypatch.setenv(name, value)
            forward.append(name)
    monkeypatch.setenv("DERMT2IM_TEST_WRITE_DELAY", "0.8")  # only the Ray workers load tests/slow_writes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SLOW_WRITES, str(ROOT)]))
    w, cfg = open_workdir(tmp_path / "work", "tiny", overrides + [f"scale.forward_env={forward}"])
    stage = generate_stage(w, cfg)
    plan = stage.plan()
    shards = sorted(plan["shard"].unique().tolist())
    assert len(shards) == 8

    def written(shard: int) -> int:
        rows = plan[plan["shard"] == shard]
        return sum(storage.is_file(w.png_path(lb, k)) for lb, k in zip(rows["label"], rows["sample_key"]))

    with on_ray(stage, cfg.scale) as placed:
        pool = placed.stage.pool
        before = pool.status()
        assert placed.on_ray and placed.concurrency == len(pool) == 2
        assert len({s["node"] for s in before}) == 2 and os.getpid() not in {s["pid"] for s in before}
        thread, box = _in_background(lambda: run_stage(placed.stage, workers=placed.concurrency))

        def mid_shard():
            """A renderer that finished a shard and is inside another, some of its PNGs written, not all."""
            for s in pool.status(timeout=2):
                if s["unit"] is not None and s["done"] >= 1 and 0 < written(s["unit"]) < SHARD_SIZE:
                    return s
            return None

        victim = wait_until(mid_shard, 120, "a renderer in the middle of a shard", interval=0.05)
        os.kill(victim["pid"], signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the run did not finish after the kill"
        if "error" in box:
            raise box["error"]
        after = pool.status()
    out = box["result"]

    # Ray restarted the killed actor (a new process that loaded the pipeline again) and re-ran its shard.
    by_shard = {u.summary["shard"]: u.summary for u in out.units}
    assert set(by_shard) == set(shards) and not any(u.cached for u in out.units)
    redone = by_shard[victim["unit"]]
    assert redone["worker"]["pid"] != victim["pid"] and 1 <= redone["rendered"] <= SHARD_SIZE
    restarted = next(s for s in after if s["slot"] == victim["slot"])
    assert restarted["pid"] != victim["pid"] and restarted["load_seconds"] > 0
    assert {s["pid"] for s in after} != {s["pid"] for s in before}
    assert out.closing["planned"] == len(plan)

    # Exactly the plan: every sample once, every image where its row says with the row's sha256.
    df = read_manifest(w.synthetic_manifest, SYNTHETIC)
    assert len(df) == len(plan) and df["sample_key"].is_unique
    assert set(df["sample_key"]) == set(read_manifest(w.plan_manifest, PLAN)["sample_key"])
    assert df["sha256"].notna().all() and (df["status"] == "rendered").all()
    assert all(p == str(w.png_path(lb, k)) and sha256_bytes(storage.read_bytes(p)) == h
               for p, lb, k, h in zip(df["path"], df["label"], df["sample_key"], df["sha256"]))
    assert all(stage.finished(s, stage.key(s)) is not None for s in shards)
    if where == "s3":
        fs, prefix = storage.to_fs(f"{bucket}/images")
        assert len(fs.find(prefix)) == len(plan)  # no stray or half-written object
        assert pending_parts(w.synthetic_manifest) == []  # folded in by the stage's close
        assert not (w.root / "manifests").exists()
    else:
        pngs = list(Path(w.images).rglob("*.png"))
        assert len(pngs) == len(plan) and {p.stem for p in pngs} == set(df["sample_key"])
    assert not list(w.root.rglob("*.tmp")), list(w.root.rglob("*.tmp"))


class _Flaky:
    """A stand-in stage with a warm() (so it runs on long-lived workers): unit 1 kills its process
    the first time, unit 3 every time, unit 2 raises a plain error; warm-ups are counted in files."""

    name = "flaky"

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def units(self):
        return [0, 1, 2, 3]

    def describe(self, unit) -> str:
        return f"unit {unit}"

    def key(self, unit) -> str:
        return str(unit)

    def finished(self, unit, key):
        return None

    def warm(self) -> None:
        Path(self.folder, f"warm-{os.getpid()}").touch()

    def run(self, unit, key):
        once = Path(self.folder, f"died-{unit}")
        if unit == 3 or (unit == 1 and not once.exists()):
            once.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if unit == 2:
            raise ValueError("unit 2 has bad input")
        return {"unit": unit, "pid": os.getpid()}

    def close(self, results):
        return {"units": len(results)}


def test_the_pool_replaces_a_worker_ray_gave_up_on_and_caps_the_attempts(ray_cluster, tmp_path):
    import ray

    from dermt2im.core.runtime import ScaleConfig
    from dermt2im.runners.ray_runner import ClusterError, on_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    scale = ScaleConfig(ray_address=ray_cluster, gpus_per_actor=1, actor_restarts=0, task_retries=0,
                        shard_attempts=2, actor_replacements=3, forward_env=[])
    stage = _Flaky(str(tmp_path))
    warmups = lambda: len(list(tmp_path.glob("warm-*")))  # noqa: E731
    try:
        with on_ray(stage, scale) as placed:
            pool = placed.stage.pool
            first = {s["pid"] for s in pool.status()}
            assert warmups() == 2 and placed.concurrency == len(first) == 2
            assert placed.stage.run(0, str(0))["pid"] in first
            # dies once and Ray does not restart it (actor_restarts=0): the unit goes to another worker,
            # and a new worker (a third warm-up) takes the dead one's place
            again = placed.stage.run(1, str(1))
            died = int((tmp_path / "died-1").read_text())
            now = {s["pid"] for s in pool.status()}  # answers once the new worker has warmed up
            assert again["pid"] != died and died not in now and len(now - first) == 1 and warmups() == 3
            # an error of the unit itself is not retried anywhere: it arrives as itself
            with pytest.raises(ValueError, match="unit 2 has bad input"):
                placed.stage.run(2, str(2))
            assert {s["pid"] for s in pool.status()} == now
            # dies every time: given up after shard_attempts, each death replaced while replacements last
            with pytest.raises(ClusterError, match=r"unit 3: given up after 2 attempt\(s\): worker died"):
                placed.stage.run(3, str(3))
            assert len(pool.status()) == len(pool) == 2 and warmups() == 5
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
