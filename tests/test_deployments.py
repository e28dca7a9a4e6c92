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

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
SETUP = ROOT / "deployments" / "setup.sh"
POOLS = ROOT / "deployments" / "work-pools"

pytestmark = pytest.mark.slow


def _spec() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _flow_name(entrypoint: str) -> str:
    """The @flow(name=...) of an entrypoint, read from source (tests/test_docker_files.py checks more)."""
    import ast

    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
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
    missing = sorted({d["entrypoint"].split(":")[0] for d in _spec()["deployments"]
                      if not (ROOT / d["entrypoint"].split(":")[0]).is_file()})
    if missing:
        pytest.fail("prefect.yaml names flow modules that do not exist yet: " + ", ".join(missing)
                    + " (prefect deploy imports every entrypoint)")


def _prefect_command() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.is_file() else f"{sys.executable} -m prefect"


def _run_setup(api_url: str, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT=_prefect_command(), PREFECT_CLI_PROMPT="false",
               COLUMNS="200", CUDA_POOL_TYPE="docker")
    env.pop("DERMT2IM_PROJECT_ROOT", None)
    proc = subprocess.run(["bash", str(SETUP), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"setup.sh {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "prefect_test_harness did not set PREFECT_API_URL"
    return url


@pytest.fixture(scope="module")
def registered(api_url):
    """Pools, `gpu` limit and every deployment, exactly as a user runs it: deployments/setup.sh."""
    _require_entrypoints()
    proc = _run_setup(api_url)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = {}
        for d in client.read_deployments():
            flow = client.read_flow(d.flow_id)
            deployments[f"{flow.name}/{d.name}"] = d
        pools = {p.name: p for p in client.read_work_pools()}
        gpu_limit = client.read_concurrency_limit_by_tag("gpu")
    return {"log": proc.stdout, "deployments": deployments, "pools": pools, "gpu_limit": gpu_limit}


def test_every_deployment_is_registered_on_its_pool(registered):
    expected = {f"{_flow_name(d['entrypoint'])}/{d['name']}": d for d in _spec()["deployments"]}
    got = registered["deployments"]
    assert set(expected) <= set(got), f"not registered: {sorted(set(expected) - set(got))}\n{registered['log']}"
    for full_name, d in expected.items():
        dep = got[full_name]
        assert dep.work_pool_name == d["work_pool"]["name"], full_name
        assert dep.work_queue_name == d["work_pool"]["work_queue_name"], full_name
        assert dep.entrypoint == d["entrypoint"], full_name
        assert dep.parameters == {k: v for k, v in d["parameters"].items()}, full_name
        # The pull step is kept as a template, resolved on the worker at run time.
        steps = [next(iter(s)) for s in dep.pull_steps]
        assert steps[-1] == "prefect.deployments.steps.set_working_directory", full_name
        assert dep.pull_steps[-1][steps[-1]]["directory"] == "{{ $DERMT2IM_PROJECT_ROOT }}"


def test_gpu_stages_run_on_cuda_and_the_rest_on_cpu(registered):
    pools = {name: d.work_pool_name for name, d in registered["deployments"].items()}
    assert pools["train/train-cuda"] == "cuda"
    assert pools["generate/generate-cuda"] == "cuda"
    for name in ("derm-t2im-factory/factory-cpu", "derm-t2im-factory/factory-smoke", "validate/validate-cpu",
                 "regenerate/regenerate-weekly", "prepare-seeds/seeds-cpu"):
        assert pools[name] == "cpu", name


def test_dispatch_names_in_the_config_are_deployments(registered):
    """The factory reaches the GPU stages by the deployment names OrchestrationConfig holds."""
    from dermt2im.config import OrchestrationConfig

    orch = OrchestrationConfig()
    assert orch.train_deployment in registered["deployments"]
    assert orch.generate_deployment in registered["deployments"]


def test_weekly_regeneration_schedule_is_visible(registered):
    dep = registered["deployments"]["regenerate/regenerate-weekly"]
    assert len(dep.schedules) == 1
    sched = dep.schedules[0]
    assert sched.active
    assert sched.schedule.cron == "0 3 * * 1"
    assert sched.schedule.timezone == "UTC"
    for name, d in registered["deployments"].items():
        if name != "regenerate/regenerate-weekly":
            assert not d.schedules, f"{name} should only run on demand"


def test_pools_come_from_the_shipped_templates(registered):
    pools = registered["pools"]
    assert pools["cpu"].type == "process"
    cuda = pools["cuda"]
    assert cuda.type == "docker"
    shipped = json.loads((POOLS / "cuda-docker.json").read_text())
    assert cuda.base_job_template["job_configuration"] == shipped["job_configuration"]
    dev = cuda.base_job_template["job_configuration"]["container_create_kwargs"]["device_requests"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == [["gpu"]]


def test_gpu_tag_concurrency_limit(registered):
    assert registered["gpu_limit"].concurrency_limit == 1


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


def test_setup_is_idempotent_and_updates_the_gpu_limit(registered, api_url):
    """compose's `setup` service runs on every `docker compose up`: a re-run must succeed."""
    from prefect.client.orchestration import get_client

    _run_setup(api_url, "--no-deploy", "--gpu-slots", "2", timeout=180)
    with get_client(sync_client=True) as client:
        try:
            assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 2
            assert client.read_work_pool("cuda").type == "docker"
            assert client.read_work_pool("cpu").type == "process"
        finally:
            client.create_concurrency_limit(tag="gpu", concurrency_limit=1)


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
