"""Scale-out without Ray, through static partitions (``dermt2im.runners.partition``): the generate
flow's fan-out over Prefect worker runs against a real Prefect server and process workers, and
`dermt2im worker --shard-index i --num-shards n` processes as a batch scheduler starts them, one
SIGKILLed mid-shard and started again. Manifests and images live in a bucket of a local S3
endpoint (moto), where every writer appends manifest parts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dermt2im.core.views import synthetic_view
from tests.core.test_storage import s3_bucket  # noqa: F401  (fixture)
from tests.flows.prefect_server import prefect_cli
from tests.flows.prefect_server import prefect_server as serve
from tests.processes import descendants, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PER_CLASS, SHARD_SIZE = 8, 2  # 2 classes x 8 images in shards of 2: 8 shards
OVERRIDES = [f"generate.per_class={PER_CLASS}", f"generate.shard_size={SHARD_SIZE}", "generate.width=32",
             "generate.height=32", "generate.steps_min=2", "generate.steps_max=2", "runtime.generate.batch_size=1",
             "runtime.generate.writer_threads=1", "generate.samplers=[euler]"]
WRITE_DELAY = {1: 1.5, 2: 1.0}  # seconds before each PNG write (tests/slow_writes), per worker
SLOW_WRITES = str(Path(__file__).resolve().parent / "slow_writes")


def _slow(env: dict[str, str], delay: float) -> dict[str, str]:
    """``env`` with every PNG write of the process delayed by ``delay`` seconds (tests/slow_writes)."""
    paths = [SLOW_WRITES, str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return {**env, "DERMT2IM_TEST_WRITE_DELAY": str(delay), "PYTHONPATH": os.pathsep.join(paths)}


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="INFO",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("DERMT2IM_TEST_WRITE_DELAY", None)
    return env




def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker, its process group and every process it started (a machine lost)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    stragglers = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in stragglers:  # started before SIGTERM, possibly in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _kill_tree(proc)


def _tail(path: Path, n: int = 3000) -> str:
    return f"--- {path.name} ---\n" + (path.read_text(errors="replace")[-n:] if path.exists() else "(none)")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A `prefect server start` subprocess with its own PREFECT_HOME (SQLite); yields its API URL."""
    with serve(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server.api_url


def test_the_generate_flow_fans_out_to_worker_runs_one_partition_each(prefect_server, tmp_path, s3_bucket):
    """orchestration.parallel_workers=2: the generate flow plans, starts two runs of the worker
    deployment (run_deployment, timeout=0) with shard_index 0 and 1 of num_shards 2, waits until both
    have ended, folds their appended manifest parts in, then gates and audits as usual. Manifests and
    images live in a bucket of a local S3 endpoint (moto)."""
    import fsspec
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dermt2im.core import storage
    from dermt2im.core.manifest import PLAN, SYNTHETIC, pending_parts, read_manifest
    from dermt2im.core.workdir import Workdir

    url = prefect_server
    pool = f"fanout-{uuid.uuid4().hex[:8]}"
    name = f"fanout-{uuid.uuid4().hex[:8]}"
    overrides = [o for o in OVERRIDES if not o.startswith("generate.per_class")] + [
        "generate.per_class=4", "orchestration.parallel_workers=2", f"orchestration.worker_deployment=generate-worker/{name}",
        f"storage.manifests={s3_bucket}/m", f"storage.images={s3_bucket}/images"]
    s3 = fsspec.config.conf["s3"]
    bucket_env = {"FSSPEC_S3_ENDPOINT_URL": s3["endpoint_url"], "FSSPEC_S3_KEY": s3["key"],
                  "FSSPEC_S3_SECRET": s3["secret"]}
    w = Workdir.at(tmp_path / "work", f"{s3_bucket}/m")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow.from_source(source=str(ROOT), entrypoint="dermt2im.flows.generate_worker.generate_worker").deploy(
                name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False,
                parameters={"workdir": str(w.root), "base_model_only": True})
            for i in (1, 2):
                env = _base_env(tmp_path / f"worker{i}-home")
                env.update(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="1", **bucket_env)
                with open(logs / f"worker{i}.log", "w") as out:
                    procs.append(subprocess.Popen(
                        prefect_cli() + ["worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
                        cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            # The parent flow in its own process: an in-process flow run would leave Prefect's event
            # client of this test process bound to this module's server after it stops.
            env = _base_env(tmp_path / "parent-home")
            env.update(PREFECT_API_URL=url, **bucket_env)
            script = ("import json, sys; from dermt2im.flows.generate import generate; "
                      "out = generate(sys.argv[1], config='tiny', overrides=json.loads(sys.argv[2]), base_model_only=True); "
                      "print('RESULT ' + json.dumps({k: out[k] for k in ('planned', 'rendered')}))")
            parent = subprocess.run([sys.executable, "-c", script, str(w.root), json.dumps(overrides)], cwd=ROOT,
                                    env=env, capture_output=True, text=True, timeout=300, check=False)
            assert parent.returncode == 0, parent.stdout[-3000:] + parent.stderr[-3000:]
            out = json.loads(parent.stdout.rsplit("RESULT ", 1)[1].splitlines()[0])
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(f"generate-worker/{name}")
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    finally:
        for proc in procs:
            _stop(proc)
    diagnostics = "\n".join(_tail(p) for p in sorted(logs.iterdir()))
    assert out["planned"] == 8 and out["rendered"] == 8, diagnostics
    assert sorted((r.parameters["shard_index"], r.parameters["num_shards"]) for r in runs) == [(0, 2), (1, 2)]
    assert all(r.state is not None and r.state.is_completed() for r in runs), diagnostics
    plan = read_manifest(w.plan_manifest, PLAN)
    df = synthetic_view(w)
    assert len(df) == len(plan) == 8 and df["sample_key"].is_unique and df["status"].isin(["accepted", "rejected"]).all()
    fs, prefix = storage.to_fs(f"{s3_bucket}/images")
    assert len(fs.find(prefix)) == 8 and all(p.startswith(f"{s3_bucket}/images/") for p in df["path"])
    assert pending_parts(w.synthetic_manifest) == [] and not (w.root / "manifests").exists()
    assert not list(w.root.rglob("*.tmp"))


def _dermt2im() -> list[str]:
    exe = Path(sys.executable).with_name("dermt2im")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dermt2im.cli"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or sys.platform == "win32", reason="needs Linux /proc")
def test_partition_workers_on_s3_one_killed_mid_shard_and_started_again(tmp_path, s3_bucket):
    """Manifests and PNGs on a local S3 endpoint (moto): `dermt2im worker --shard-index 0/1 --num-shards 2`
    as two array tasks of a batch scheduler, appending their rows as manifest parts. Worker 0 is
    SIGKILLed mid-shard; worker 1 finishes its own partition; worker 0 started again (the scheduler's
    retry) skips what it finished, adopts or re-renders the rest, and after `quality` the manifest holds
    exactly the plan, every row matching its object in the bucket."""
    from dermt2im.core import storage
    from dermt2im.core.fileio import sha256_bytes
    from dermt2im.core.manifest import PLAN, SYNTHETIC, pending_parts, read_manifest
    from dermt2im.core.workdir import open_workdir
    from dermt2im.quality.stage import assess

    manifests, images = f"{s3_bucket}/run/manifests", f"{s3_bucket}/run/images"
    root = tmp_path / "work"
    w, cfg = open_workdir(root, "tiny", OVERRIDES + [f"storage.manifests={manifests}", f"storage.images={images}"])
    import fsspec

    s3 = fsspec.config.conf["s3"]  # the test endpoint (fixture): handed to the workers through fsspec's env config
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, index: int, delay: float) -> subprocess.Popen:
        env = _base_env(tmp_path / f"home-{name}")
        env.update(FSSPEC_S3_ENDPOINT_URL=s3["endpoint_url"], FSSPEC_S3_KEY=s3["key"], FSSPEC_S3_SECRET=s3["secret"],
                   MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/ml.db", DERMT2IM_SHARD_INDEX=str(index))
        env = _slow(env, delay) if delay else env
        with open(logs / f"{name}.log", "w") as out:
            procs[name] = subprocess.Popen(_dermt2im() + ["worker", "--workdir", str(root), "--num-shards", "2",
                                                          "--base-model-only"], cwd=tmp_path, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        return procs[name]

    def diagnostics() -> str:
        return "\n".join(_tail(p) for p in sorted(logs.iterdir()))

    def w0_mid_shard() -> int | None:
        """Worker 0 (the even shards) has recorded a whole shard and written some, not all, PNGs of another."""
        recorded = read_manifest(w.synthetic_manifest, SYNTHETIC)
        mine = recorded[(recorded["shard"] % 2 == 0) & recorded["sha256"].notna()]
        if mine.empty or not (mine.groupby("shard").size() == SHARD_SIZE).any():
            return None
        plan = read_manifest(w.plan_manifest, PLAN)
        for s in sorted(plan.loc[plan["shard"] % 2 == 0, "shard"].unique()):
            rows = plan[plan["shard"] == s]
            written = sum(storage.is_file(f"{images}/{lb}/{k}.png") for lb, k in zip(rows["label"], rows["sample_key"]))
            if 0 < written < len(rows):
                return int(s)
        return None

    try:
        start("w0", 0, WRITE_DELAY[1])  # the shard index from the environment, as JOB_COMPLETION_INDEX would give it
        start("w1", 1, WRITE_DELAY[2])
        found: list[int] = []
        wait_until(lambda: (s := w0_mid_shard()) is not None and not found.append(s), 150,
              "worker 0 inside a shard after recording one", interval=0.1, on_fail=diagnostics)
        _kill_tree(procs["w0"])
        assert procs["w1"].wait(timeout=180) == 0, diagnostics()
        assert start("w0-again", 0, 0).wait(timeout=180) == 0, diagnostics()
    finally:
        for proc in procs.values():
            _stop(proc)

    plan = read_manifest(w.plan_manifest, PLAN)
    again = (logs / "w0-again.log").read_text()
    assert "worker 0 of 2:" in again and "up to date" in again, diagnostics()  # finished shards were skipped
    rendered_again = int(again.split("worker 0 of 2: ", 1)[1].split(" image", 1)[0])
    assert 0 < rendered_again < int((plan["shard"] % 2 == 0).sum()), diagnostics()
    assert "worker 1 of 2:" in (logs / "w1.log").read_text()
    appended = read_manifest(w.synthetic_manifest, SYNTHETIC)
    report = assess(w, cfg.quality)  # what `dermt2im quality` runs next (the workers folded their parts as they ended)
    df = synthetic_view(w)
    assert pending_parts(w.synthetic_manifest) == [] and storage.is_file(w.synthetic_manifest)
    assert report.accepted + report.rejected == len(plan) and df["status"].isin(["accepted", "rejected"]).all()
    assert df[["sample_key", "sha256"]].equals(appended[["sample_key", "sha256"]])
    assert len(df) == len(plan) == 2 * PER_CLASS and df["sample_key"].is_unique
    assert set(df["sample_key"]) == set(plan["sample_key"]) and set(df["shard"]) == set(plan["shard"])
    assert all(p == f"{images}/{lb}/{k}.png" and sha256_bytes(storage.read_bytes(p)) == h
               for p, lb, k, h in zip(df["path"], df["label"], df["sample_key"], df["sha256"]))
    fs, prefix = storage.to_fs(images)
    assert len(fs.find(prefix)) == len(plan)  # no stray or half-written object
    assert not list(w.root.rglob("*.tmp"))
