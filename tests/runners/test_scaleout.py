"""Scale-out against a real Prefect server: two process workers split one plan through shard leases;
one is killed (SIGKILL, with its flow-run processes) mid-shard and the plan still completes with no
duplicate and no missing sample.

Everything runs here: a `prefect server start` subprocess with its own PREFECT_HOME (SQLite), a
process work pool with a unique name and one work queue per worker (so the test knows which
worker runs which flow run), the `generate-worker` flow deployed from this checkout with
``flow.from_source``, and two `prefect worker start --limit 1` processes, each in its own process
group. Both workers sleep before every PNG write (tests/slow_writes, test-only) so their
shards overlap in time and worker 1 is reliably killed in the middle of a shard: after it finished
at least one shard, and after some PNGs of the current one are written but not all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.core.test_storage import s3_bucket  # noqa: F401  (fixture)
from tests.processes import descendants

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PER_CLASS, SHARD_SIZE = 8, 2  # 2 classes x 8 images in shards of 2: 8 shards
OVERRIDES = [f"generate.per_class={PER_CLASS}", f"generate.shard_size={SHARD_SIZE}", "generate.width=32",
             "generate.height=32", "generate.steps_min=2", "generate.steps_max=2", "runtime.generate.batch_size=1",
             "runtime.generate.writer_threads=1", "runtime.generate.lease_seconds=4", "generate.samplers=[euler]"]
WRITE_DELAY = {1: 1.5, 2: 1.0}  # seconds before each PNG write (tests/slow_writes), per worker
SLOW_WRITES = str(Path(__file__).resolve().parent / "slow_writes")


def _slow(env: dict[str, str], delay: float) -> dict[str, str]:
    """``env`` with every PNG write of the process delayed by ``delay`` seconds (tests/slow_writes)."""
    paths = [SLOW_WRITES, str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return {**env, "DERMT2IM_TEST_WRITE_DELAY": str(delay), "PYTHONPATH": os.pathsep.join(paths)}


def _prefect() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="INFO",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("DERMT2IM_TEST_WRITE_DELAY", None)
    return env


def _wait(predicate, timeout: float, what: str, interval: float = 0.25, on_fail=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{on_fail()}" if on_fail else ""))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


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
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_prefect() + ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
                                              "--analytics-off"], cwd=home, env=_base_env(home / "home"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _healthy(url) or proc.poll() is not None, 90, "the Prefect server", on_fail=lambda: _tail(log))
        assert proc.poll() is None, _tail(log)
        yield url
    finally:
        _stop(proc)


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or sys.platform == "win32", reason="needs Linux /proc")
def test_two_workers_split_the_plan_and_survive_one_killed_mid_shard(prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dermt2im.core.manifest import PLAN, SYNTHETIC, read_manifest
    from dermt2im.core.workdir import Workdir, workdir_config
    from dermt2im.generate.plan import update_plan
    from dermt2im.runners.leases import read_lease
    from tests.generate.generate_fixtures import complete

    # the plan, in a fresh workdir; its config snapshot is what the workers read (config=None)
    w = Workdir.at(tmp_path / "work")
    cfg = workdir_config(w, "smoke", OVERRIDES)
    plan = update_plan(w.plan_manifest, cfg.generate, token=cfg.train.instance_token)
    shards = sorted(plan["shard"].unique().tolist())
    assert len(plan) == 2 * PER_CLASS and len(shards) == 8
    folder = w.leases

    url = prefect_server
    pool = f"scaleout-{uuid.uuid4().hex[:8]}"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def diagnostics() -> str:
        return "\n".join(_tail(p) for p in sorted(logs.iterdir()))

    def start(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as out:
            procs[name] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        return procs[name]

    try:
        with temporary_settings({PREFECT_API_URL: url}):
            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                for q in ("w1", "w2"):
                    client.create_work_queue(name=q, work_pool_name=pool)
            worker_flow = flow.from_source(source=str(ROOT), entrypoint="flows/generate_worker.py:generate_worker")
            worker_flow.deploy(name="scaleout", work_pool_name=pool, build=False, push=False,
                               print_next_steps=False,
                               parameters={"workdir": str(w.root), "poll_seconds": 0.5, "timeout_seconds": 240,
                                           "base_model_only": True})

            for i in (1, 2):
                env = _base_env(tmp_path / f"worker{i}-home")
                env.update(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="1")
                env = _slow(env, WRITE_DELAY[i])
                start(f"worker{i}", _prefect() + ["worker", "start", "--pool", pool, "--work-queue", f"w{i}",
                                                  "--type", "process", "--limit", "1"], env)

            # One run per worker (its own queue); both write slowly (test hook) so that their shards
            # overlap in time: worker 1 takes 3 s a shard, worker 2 2 s.
            run_a = run_deployment("generate-worker/scaleout", timeout=0, work_queue_name="w1", as_subflow=False)
            run_b = run_deployment("generate-worker/scaleout", timeout=0, work_queue_name="w2", as_subflow=False)
            owner_a, owner_b = f"flow-run-{run_a.id}", f"flow-run-{run_b.id}"
            rows_of = {s: plan[plan["shard"] == s] for s in shards}
            seen: dict[str, set[int]] = {owner_a: set(), owner_b: set()}

            def mid_shard() -> int | None:
                """Worker 1 has finished a shard, worker 2 holds or held one, and worker 1 is inside another
                with some of its PNGs written and some not."""
                held = {s: lease.owner for s in shards if (lease := read_lease(folder, s)) is not None}
                for s, owner in held.items():
                    seen.setdefault(owner, set()).add(s)
                recorded = read_manifest(w.synthetic_manifest, SYNTHETIC)
                done = set(recorded.loc[recorded["sha256"].notna(), "shard"].value_counts()
                           .loc[lambda c: c == SHARD_SIZE].index.tolist())
                if not (seen[owner_a] & done) or not seen[owner_b]:
                    return None
                for s, owner in held.items():
                    if owner == owner_a:
                        rows = rows_of[s]
                        written = sum((w.synthetic / lb / f"{k}.png").is_file()
                                      for lb, k in zip(rows["label"], rows["sample_key"]))
                        if 0 < written < len(rows):
                            return s
                return None

            found: list[int] = []
            _wait(lambda: (s := mid_shard()) is not None and not found.append(s), 150,
                  "worker 1 to be inside a shard (after finishing one) while worker 2 works", interval=0.05,
                  on_fail=diagnostics)
            killed_shard = found[0]
            _kill_tree(procs["worker1"])
            lease = read_lease(folder, killed_shard)
            assert lease is not None and lease.owner == owner_a, "worker 1 finished its shard before the kill"
            finished_by_a = set(seen[owner_a]) - {killed_shard}

            def finished():
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(run_b.id).state
                return state if state is not None and state.is_final() else None

            state_b = _wait(finished, 150, "worker 2's run to finish", interval=0.5, on_fail=diagnostics)
            assert state_b.is_completed(), f"{state_b}\n{diagnostics()}"
            with get_client(sync_client=True) as client:
                state_a = client.read_flow_run(run_a.id).state
            assert not state_a.is_completed()  # killed: it never reported back
    finally:
        for name in ("worker1", "worker2"):
            _stop(procs.get(name))

    # Exactly the plan: every sample once, every PNG on disk and matching its row, nothing half-written.
    df = read_manifest(w.synthetic_manifest, SYNTHETIC)
    assert len(df) == len(plan) and df["sample_key"].is_unique
    assert set(df["sample_key"]) == set(read_manifest(w.plan_manifest, PLAN)["sample_key"])
    assert df["sha256"].notna().all() and (df["status"] == "rendered").all()
    from dermt2im.core.fileio import sha256_file

    assert all(Path(p).is_file() and sha256_file(p) == h for p, h in zip(df["path"], df["sha256"]))
    pngs = list(w.synthetic.rglob("*.png"))
    assert len(pngs) == len(plan) and {p.stem for p in pngs} == set(df["sample_key"])
    assert not list(w.root.rglob("*.tmp")), list(w.root.rglob("*.tmp"))
    assert all(complete(w, cfg, s) for s in shards)
    # Every lease released; the killed worker's one was taken over by worker 2 (its tombstone is kept).
    assert not list(folder.glob("shard-*.json"))
    tombs = list((folder / "expired").glob(f"shard-{killed_shard:06d}.*.json"))
    assert tombs and owner_a in tombs[0].read_text()
    # Both workers rendered part of the plan: worker 1 finished shard(s) before it was killed.
    assert finished_by_a and finished_by_a <= set(shards) and seen[owner_b] - finished_by_a


@pytest.mark.parametrize("where", ["workdir", "s3"])
def test_the_generate_flow_fans_out_to_worker_runs(prefect_server, tmp_path, where, request):
    """generate.parallel_workers=2: the generate flow plans, starts two runs of the worker deployment
    (run_deployment, timeout=0), waits until every shard is done, then gates and audits as usual.
    With ``s3`` the manifests and images live in a bucket of a local S3 endpoint (moto)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dermt2im.core.manifest import SYNTHETIC, read_manifest
    from dermt2im.core.workdir import Workdir

    url = prefect_server
    pool = f"fanout-{uuid.uuid4().hex[:8]}"
    name = f"fanout-{uuid.uuid4().hex[:8]}"
    w = Workdir.at(tmp_path / "work")
    overrides = [o for o in OVERRIDES if not o.startswith("generate.per_class")] + [
        "generate.per_class=4", "orchestration.parallel_workers=2", f"orchestration.worker_deployment=generate-worker/{name}"]
    bucket_env: dict[str, str] = {}
    if where == "s3":
        import fsspec

        bucket = request.getfixturevalue("s3_bucket")
        overrides += [f"storage.manifests={bucket}/m", f"storage.images={bucket}/images"]
        s3 = fsspec.config.conf["s3"]
        bucket_env = {"FSSPEC_S3_ENDPOINT_URL": s3["endpoint_url"], "FSSPEC_S3_KEY": s3["key"],
                      "FSSPEC_S3_SECRET": s3["secret"]}
        w = Workdir.at(tmp_path / "work", f"{bucket}/m")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow.from_source(source=str(ROOT), entrypoint="flows/generate_worker.py:generate_worker").deploy(
                name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False,
                parameters={"workdir": str(w.root), "poll_seconds": 0.5, "timeout_seconds": 240,
                            "base_model_only": True})
            for i in (1, 2):
                env = _base_env(tmp_path / f"worker{i}-home")
                env.update(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="1", **bucket_env)
                with open(logs / f"worker{i}.log", "w") as out:
                    procs.append(subprocess.Popen(
                        _prefect() + ["worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
                        cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            # The parent flow in its own process: an in-process flow run would leave Prefect's event
            # client of this test process bound to this module's server after it stops.
            env = _base_env(tmp_path / "parent-home")
            env.update(PREFECT_API_URL=url, **bucket_env)
            script = ("import json, sys; from flows.generate import generate; "
                      "out = generate(sys.argv[1], config='smoke', overrides=json.loads(sys.argv[2]), base_model_only=True); "
                      "print('RESULT ' + json.dumps({k: out[k] for k in ('planned', 'rendered')}))")
            parent = subprocess.run([sys.executable, "-c", script, str(w.root), json.dumps(overrides)], cwd=ROOT,
                                    env=env, capture_output=True, text=True, timeout=300, check=False)
            assert parent.returncode == 0, parent.stdout[-3000:] + parent.stderr[-3000:]
            out = json.loads(parent.stdout.rsplit("RESULT ", 1)[1].splitlines()[0])
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(f"generate-worker/{name}")
                from prefect.client.schemas.filters import (
                    DeploymentFilter,
                    DeploymentFilterId,
                )

                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    finally:
        for proc in procs:
            _stop(proc)
    diagnostics = "\n".join(_tail(p) for p in sorted(logs.iterdir()))
    assert out["planned"] == 8 and out["rendered"] == 8, diagnostics
    assert len(runs) == 2, diagnostics
    df = read_manifest(w.synthetic_manifest, SYNTHETIC)
    assert len(df) == 8 and df["sample_key"].is_unique and df["status"].isin(["accepted", "rejected"]).all()
    assert not list(w.root.rglob("*.tmp"))
    if where == "s3":
        from dermt2im.core import storage
        from dermt2im.core.manifest import pending_parts

        fs, prefix = storage.to_fs(f"{bucket}/images")
        assert len(fs.find(prefix)) == 8 and all(p.startswith(f"{bucket}/images/") for p in df["path"])
        assert pending_parts(w.synthetic_manifest) == [] and not (w.root / "manifests").exists()
    else:
        assert len(list(w.synthetic.rglob("*.png"))) == 8


def _dermt2im() -> list[str]:
    exe = Path(sys.executable).with_name("dermt2im")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dermt2im.cli"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or sys.platform == "win32", reason="needs Linux /proc")
def test_workers_split_a_plan_whose_manifests_and_images_live_on_s3(tmp_path, s3_bucket):
    """Manifests and PNGs on a local S3 endpoint (moto): two `dermt2im worker` processes append their
    rows as manifest parts; one is SIGKILLed mid-shard, the other takes its shard over, and after one
    compaction the manifest holds exactly the plan, every row matching its object in the bucket."""
    from dermt2im.core import storage
    from dermt2im.core.fileio import sha256_bytes
    from dermt2im.core.manifest import PLAN, SYNTHETIC, pending_parts, read_manifest
    from dermt2im.core.workdir import Workdir, workdir_config
    from dermt2im.quality.stage import assess
    from dermt2im.runners.leases import read_lease

    manifests, images = f"{s3_bucket}/run/manifests", f"{s3_bucket}/run/images"
    root = tmp_path / "work"
    cfg = workdir_config(Workdir.at(root), "smoke",
                         OVERRIDES + [f"storage.manifests={manifests}", f"storage.images={images}"])
    w = Workdir.of(root, cfg)
    folder = w.leases
    import fsspec

    s3 = fsspec.config.conf["s3"]  # the test endpoint (fixture): handed to the workers through fsspec's env config
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[int, subprocess.Popen] = {}

    def start(i: int) -> None:
        env = _base_env(tmp_path / f"home{i}")
        env.update(FSSPEC_S3_ENDPOINT_URL=s3["endpoint_url"], FSSPEC_S3_KEY=s3["key"], FSSPEC_S3_SECRET=s3["secret"],
                   MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/ml.db")
        env = _slow(env, WRITE_DELAY[i])
        with open(logs / f"worker{i}.log", "w") as out:
            procs[i] = subprocess.Popen(_dermt2im() + ["worker", "--workdir", str(root), "--owner", f"w{i}", "--poll",
                                                       "0.5", "--timeout", "240", "--base-model-only"], cwd=tmp_path,
                                        env=env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def diagnostics() -> str:
        return "\n".join(_tail(p) for p in sorted(logs.iterdir()))

    def w1_mid_shard() -> int | None:
        """Worker 1 has recorded a whole shard and holds another with some, not all, PNGs written."""
        recorded = read_manifest(w.synthetic_manifest, SYNTHETIC)
        if recorded.empty or not (recorded.groupby("shard").size() == SHARD_SIZE).any():
            return None
        plan = read_manifest(w.plan_manifest, PLAN)
        for s in sorted(plan["shard"].unique()):
            lease = read_lease(folder, int(s))
            if lease is not None and lease.owner == "w1":
                rows = plan[plan["shard"] == s]
                written = sum(storage.is_file(f"{images}/{lb}/{k}.png") for lb, k in zip(rows["label"], rows["sample_key"]))
                if 0 < written < len(rows):
                    return int(s)
        return None

    try:
        start(1)
        start(2)
        found: list[int] = []
        _wait(lambda: (s := w1_mid_shard()) is not None and not found.append(s), 150,
              "worker 1 inside a shard after recording one", interval=0.1, on_fail=diagnostics)
        _kill_tree(procs[1])
        assert read_lease(folder, found[0]).owner == "w1", "worker 1 finished its shard before the kill"
        assert procs[2].wait(timeout=180) == 0, diagnostics()
    finally:
        for proc in procs.values():
            _stop(proc)

    assert "1 taken over" in (logs / "worker2.log").read_text(), diagnostics()
    # record_rows only appends parts on an object store: the base exists because workers folded them in
    assert storage.is_file(w.synthetic_manifest)
    assert not (root / "manifests").exists() or not list((root / "manifests").rglob("*.parquet"))
    appended = read_manifest(w.synthetic_manifest, SYNTHETIC)
    report = assess(w, cfg.quality)  # what `dermt2im quality` runs next: gates the images and folds the parts in
    plan = read_manifest(w.plan_manifest, PLAN)
    df = read_manifest(w.synthetic_manifest, SYNTHETIC)
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
