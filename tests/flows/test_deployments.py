"""deployments/: setup.sh creates the pools and the `gpu` limit on a Prefect server and registers
every deployment of prefect.yaml non-interactively; what the server then holds is read back.

The cuda pool is created as a real *docker* pool from deployments/work-pools/cuda-docker.json
(the server knows the docker and kubernetes pool types from its bundled worker metadata; the
prefect-docker / prefect-kubernetes worker packages are only needed to *run* such a worker,
which no test does). The kubernetes template is submitted to the server as a pool of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
SETUP = ROOT / "deployments" / "setup.sh"
POOLS = ROOT / "deployments" / "work-pools"

pytestmark = pytest.mark.slow


def _spec() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _flow_name(entrypoint: str) -> str:
    """The @flow(name=...) of an entrypoint, read from source (tests/test_docker_files.py checks more)."""
    import ast

    from tests.test_docker_files import entrypoint_file

    func = entrypoint.rsplit(".", 1)[1]
    tree = ast.parse(entrypoint_file(entrypoint).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call):
                    for kw in dec.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            return kw.value.value
            return func.replace("_", "-")
    raise AssertionError(f"{entrypoint}: no function {func}")


def _require_entrypoints() -> None:
    import importlib.util

    missing = sorted({d["entrypoint"] for d in _spec()["deployments"]
                      if importlib.util.find_spec(d["entrypoint"].rsplit(".", 1)[0]) is None})
    if missing:
        pytest.fail("prefect.yaml names flow modules that do not exist yet: " + ", ".join(missing)
                    + " (prefect deploy imports every entrypoint)")


def _prefect_command() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.is_file() else f"{sys.executable} -m prefect"


def _run_setup(api_url: str, *args: str, timeout: float = 420, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT=_prefect_command(), PREFECT_CLI_PROMPT="false",
               COLUMNS="200", CUDA_POOL_TYPE="docker")
    env.pop("DERMT2IM_PROJECT_ROOT", None)
    proc = subprocess.run(["bash", str(SETUP), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 or not check, f"setup.sh {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "prefect_test_harness did not set PREFECT_API_URL"
    return url


def _read_back() -> dict:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = {}
        for d in client.read_deployments():
            deployments[f"{client.read_flow(d.flow_id).name}/{d.name}"] = d
        pools = {p.name: p for p in client.read_work_pools()}
        gpu_limit = client.read_concurrency_limit_by_tag("gpu").concurrency_limit
    return {"deployments": deployments, "pools": pools, "gpu_limit": gpu_limit}


def _check_every_deployment_is_registered_on_its_pool(got: dict, log: str) -> None:
    expected = {f"{_flow_name(d['entrypoint'])}/{d['name']}": d for d in _spec()["deployments"]}
    assert set(expected) <= set(got), f"not registered: {sorted(set(expected) - set(got))}\n{log}"
    for full_name, d in expected.items():
        dep = got[full_name]
        assert dep.work_pool_name == d["work_pool"]["name"], full_name
        assert dep.work_queue_name == d["work_pool"]["work_queue_name"], full_name
        assert dep.entrypoint == d["entrypoint"], full_name
        assert dep.parameters == d["parameters"], full_name
        # The pull step stays a template, resolved on the worker at run time.
        step = dep.pull_steps[-1]
        assert list(step) == ["prefect.deployments.steps.set_working_directory"], full_name
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $DERMT2IM_PROJECT_ROOT }}"


def _check_gpu_stages_run_on_cuda_and_the_rest_on_cpu(got: dict) -> None:
    from dermt2im.flows.settings import OrchestrationSettings

    pools = {name: d.work_pool_name for name, d in got.items()}
    orch = OrchestrationSettings()  # the factory reaches the GPU stages by these names
    assert pools[orch.train_deployment] == "cuda" and orch.train_deployment == "train/train-cuda"
    assert pools[orch.generate_deployment] == "cuda" and orch.generate_deployment == "generate/generate-cuda"
    assert pools[orch.validate_deployment] == "cuda" and orch.validate_deployment == "validate/validate-cuda"
    for name in ("derm-t2im-factory/factory-cpu", "derm-t2im-factory/factory-smoke", "validate/validate-cpu",
                 "regenerate/regenerate-weekly", "prepare-seeds/seeds-cpu"):
        assert pools[name] == "cpu", name


def _check_weekly_regeneration_schedule(got: dict) -> None:
    dep = got["regenerate/regenerate-weekly"]
    assert len(dep.schedules) == 1
    sched = dep.schedules[0]
    assert sched.active
    assert sched.schedule.cron == "0 3 * * 1"
    assert sched.schedule.timezone == "UTC"
    for name, d in got.items():
        if name != "regenerate/regenerate-weekly":
            assert not d.schedules, f"{name} should run on demand only"


def _check_pools_come_from_the_shipped_templates(pools: dict) -> None:
    assert pools["cpu"].type == "process"
    cuda = pools["cuda"]
    assert cuda.type == "docker"
    shipped = json.loads((POOLS / "cuda-docker.json").read_text())
    assert cuda.base_job_template["job_configuration"] == shipped["job_configuration"]
    dev = cuda.base_job_template["job_configuration"]["container_create_kwargs"]["device_requests"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == [["gpu"]]


def _check_a_worker_runs_a_deployment(api_url: str, tmp_path: Path) -> None:
    """A cpu process worker, started outside the checkout, picks a run of a registered deployment,
    runs prefect.yaml's pull steps (cd to DERMT2IM_PROJECT_ROOT) and the flow completes."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from dermt2im.core.workdir import Workdir

    work = tmp_path / "work"
    params = {"workdir": str(work), "source": None, "config": "smoke",
              "overrides": ["phantoms.n_seed=4", "phantoms.n_test=2", "phantoms.size=32", "preprocess.size=24"]}
    run = run_deployment("prepare-seeds/seeds-cpu", parameters=params, timeout=0)
    env = dict(os.environ, PREFECT_API_URL=api_url, DERMT2IM_PROJECT_ROOT=str(ROOT))
    cmd = _prefect_command().split() + ["worker", "start", "--pool", "cpu", "--type", "process", "--run-once"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert state is not None and state.is_completed(), f"{state}\n{log}"
    # The worker ran in tmp_path and imported dermt2im.flows.seeds from the installed package.
    assert Workdir.at(work).seeds_manifest.is_file()


def test_setup_script_creates_pools_limit_and_every_deployment(api_url, tmp_path):
    """One test on purpose: setup.sh is a chain of prefect CLI calls (seconds each), run once here
    and then again, as compose's `setup` service does on every `docker compose up`; in between a
    worker runs one of the registered deployments."""
    _require_entrypoints()
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:  # the session's server may hold another test's pool
        try:
            client.delete_work_pool("cuda")
        except ObjectNotFound:
            pass
        try:
            gpu_limit_before = client.read_concurrency_limit_by_tag("gpu").concurrency_limit
        except ObjectNotFound:
            gpu_limit_before = None
    try:
        _setup_deploy_run_and_rerun(api_url, tmp_path)
    finally:  # leave the session's server as other flow tests expect it: no `gpu` limit of ours
        with get_client(sync_client=True) as client:
            if gpu_limit_before is None:
                client.delete_concurrency_limit_by_tag("gpu")
            else:
                client.create_concurrency_limit(tag="gpu", concurrency_limit=gpu_limit_before)


def _setup_deploy_run_and_rerun(api_url: str, tmp_path: Path) -> None:
    log = _run_setup(api_url).stdout
    state = _read_back()
    _check_every_deployment_is_registered_on_its_pool(state["deployments"], log)
    _check_gpu_stages_run_on_cuda_and_the_rest_on_cpu(state["deployments"])
    _check_weekly_regeneration_schedule(state["deployments"])
    _check_pools_come_from_the_shipped_templates(state["pools"])
    assert state["gpu_limit"] == 1
    _check_a_worker_runs_a_deployment(api_url, tmp_path)

    _run_setup(api_url, "--no-deploy", "--gpu-slots", "2", timeout=180)  # a re-run updates in place
    refused = _run_setup(api_url, "--no-deploy", "--cuda-type", "process", timeout=180, check=False)
    assert refused.returncode != 0 and "exists with type 'docker'" in refused.stderr, refused.stderr
    again = _read_back()
    assert again["gpu_limit"] == 2
    assert again["pools"]["cuda"].type == "docker" and again["pools"]["cpu"].type == "process"
    assert set(again["deployments"]) == set(state["deployments"])


def test_kubernetes_template_is_accepted_by_the_server(api_url):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((POOLS / "cuda-kubernetes.json").read_text())
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="cuda-k8s-template-check", type="kubernetes",
                                               base_job_template=template), overwrite=True)
        pool = client.read_work_pool("cuda-k8s-template-check")
        client.delete_work_pool("cuda-k8s-template-check")
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_setup_refuses_to_run_without_an_api_url():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(["bash", str(SETUP), "--no-deploy"], cwd=ROOT, env=dict(env, PREFECT=_prefect_command()),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "PREFECT_API_URL" in proc.stderr


@pytest.mark.parametrize("project_root_set", [True, False])
def test_pull_steps_find_the_project_on_the_worker(project_root_set, monkeypatch, tmp_path):
    """What a worker does before loading the flow: cd into DERMT2IM_PROJECT_ROOT, or fail saying so."""
    if shutil.which("sh") is None:
        pytest.skip("no POSIX sh on this machine")
    from prefect.deployments.steps.core import StepExecutionError, run_steps
    from prefect.utilities.asyncutils import run_coro_as_sync

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)  # no pull-step events to a server
    if project_root_set:
        monkeypatch.setenv("DERMT2IM_PROJECT_ROOT", str(ROOT))
        out = run_coro_as_sync(run_steps(_spec()["pull"]))
        assert Path.cwd() == ROOT and Path(out["directory"]) == ROOT
    else:
        monkeypatch.delenv("DERMT2IM_PROJECT_ROOT", raising=False)
        with pytest.raises(StepExecutionError) as err:
            run_coro_as_sync(run_steps(_spec()["pull"]))
        assert "DERMT2IM_PROJECT_ROOT must name" in str(err.value.__cause__)
        assert Path.cwd() == tmp_path
