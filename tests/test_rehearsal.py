"""The rehearsal of the paper preset (``dermt2im.rehearsal``): the paper's code paths on the CPU.

* The rehearsal preset differs from ``paper`` only in the keys it declares (sizes and counts, model
  folders of the same architectures, the speed switches as CUDA resolves them, the devices), so
  the two cannot drift apart.
* Once (the heavy part, one test): seeds through the CLI, ``dermt2im train``
  killed with SIGKILL after its first checkpoint, then the ``factory-cpu`` deployment of
  deployments/prefect.yaml with the rehearsal preset on a real Prefect server, with a ``cpu`` process
  worker and a process worker standing in for the ``cuda`` pool: the factory dispatches training
  (which resumes from the checkpoint), generation and validation through run_deployment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dermt2im import rehearsal
from dermt2im.core import yamltext
from dermt2im.core.config import CONFIG_DIR, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_rehearsal_differs_from_paper_only_in_its_declared_keys(tmp_path, device):
    folders = {k: str(tmp_path / k) for k in rehearsal.MODEL_KEYS}
    data = rehearsal.rehearsal_config(folders, device)
    paper = config_from_dict(yamltext.load((CONFIG_DIR / "paper.yaml").read_text())).model_dump(mode="json",
                                                                                                 by_alias=True)
    rehearsed = config_from_dict(data).model_dump(mode="json", by_alias=True)
    a, b = _flat(paper), _flat(rehearsed)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"name"}
    declared = set(rehearsal.SHRUNK) | set(rehearsal.AS_ON_CUDA) | set(rehearsal.MODEL_KEYS)
    declared |= set(rehearsal.CPU_FORCED) if device == "cpu" else set()
    assert changed == declared
    for key, value in rehearsal.SHRUNK.items():  # shrunk, never grown
        before = a[key]
        if isinstance(value, list):
            assert len(value) <= len(before), key
        elif before is not None:
            assert value <= before, key
    # what the paper run takes, the rehearsal takes too
    for key in ("train.optimizer", "train.mixed_precision", "runtime.train.gradient_checkpointing",
                "generate.samplers", "validate.models", "validate.regimes", "runtime.generate.batch_size",
                "runtime.generate.dtype", "train.rank", "quality.max_high_frequency_ratio"):
        assert b[key] == a[key], key


def test_the_rehearsal_models_have_the_papers_architectures(tmp_path):
    """Full-size ViT-B/16 and MobileNetV2 configs and the hub's preprocessor configs; SD v1.5 keeps
    every block and layer (narrow widths on a CPU) and the hub's layout."""
    from dermt2im.diffusion import architectures

    vit = json.loads((architectures.write_vit_folder(tmp_path / "vit") / "config.json").read_text())
    assert (vit["hidden_size"], vit["num_hidden_layers"], vit["patch_size"], vit["image_size"]) == (768, 12, 16, 224)
    narrow, full = architectures.sd15_configs("narrow"), architectures.sd15_configs("full")
    for part in ("unet", "vae"):
        same = {k: v for k, v in full[part].items() if k not in ("block_out_channels", "cross_attention_dim")}
        assert {k: narrow[part][k] for k in same} == same
    assert narrow["text"]["num_hidden_layers"] == full["text"]["num_hidden_layers"] == 12


# ---------------------------------------------------------------------------------------------
# the heavy part, once per session


@pytest.fixture(scope="session")
def rehearsed(tmp_path_factory):
    """Seeds, a training killed after its first checkpoint, then factory-cpu on a real Prefect server."""
    import httpx

    from tests.flows.prefect_server import prefect_server, process_worker
    from tests.processes import wait_until

    root = tmp_path_factory.mktemp("rehearsal")
    os.environ.setdefault("DERMT2IM_COMPILE_BACKEND", "aot_eager")
    r = rehearsal.prepare(root)
    rehearsal.seeds(r)
    killed_at = rehearsal.train_until_killed(r)
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    wanted = {"factory-cpu", "train-cuda", "generate-cuda", "validate-cuda"}
    spec["deployments"] = [d for d in spec["deployments"] if d["name"] in wanted]
    for d in spec["deployments"]:
        d["parameters"] = {**d["parameters"], "workdir": str(r.workdir)}
        if d["name"] == "factory-cpu":
            d["parameters"].update(source=str(r.source), config=str(r.config))
    (root / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DERMT2IM_PROJECT_ROOT": str(ROOT),
           "DERMT2IM_COMPILE_BACKEND": rehearsal.environment()["DERMT2IM_COMPILE_BACKEND"],
           "MLFLOW_TRACKING_URI": f"sqlite:///{r.workdir / 'mlflow.db'}"}
    with prefect_server(root / "prefect", extra_env=env) as server:
        server.cli("work-pool", "create", "cpu", "--type", "process")
        server.cli("work-pool", "create", "cuda", "--type", "process")
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(root / "prefect.yaml"), cwd=ROOT, timeout=300)
        with process_worker(server, "cpu", root, extra_env=env), process_worker(server, "cuda", root, extra_env=env):
            run = server.cli("deployment", "run", "derm-t2im-factory/factory-cpu").stdout
            with server.api() as api:
                def finished():
                    try:  # a busy server (SQLite, two shared cores) may miss a poll; the next one asks again
                        runs = api.post("/flow_runs/filter", json={"limit": 50}).json()
                    except httpx.HTTPError:
                        return None
                    factory = [x for x in runs if x["name"].startswith("factory in")]
                    if factory and factory[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                        return runs
                    return None

                runs = wait_until(finished, 3000, "the factory-cpu run to end", interval=5,
                                  on_fail=lambda: server.log.read_text()[-3000:])
                deployments = wait_until(lambda: _deployment_names(api), 120, "the deployments to be read")
    return {"rehearsal": r, "killed_at": killed_at, "runs": runs, "deployments": deployments, "root": root,
            "submitted": run}


def _deployment_names(api) -> dict[str, str] | None:
    import httpx

    try:
        return {d["id"]: d["name"] for d in api.post("/deployments/filter", json={}).json()}
    except httpx.HTTPError:
        return None


def _logs(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.glob("worker-*.log"))


@pytest.mark.slow
def test_the_paper_preset_rehearsed_as_the_deployments_run_it(rehearsed):
    """One test, so that the heavy part runs once whatever the xdist schedule (as four tests of one
    group it ran once per worker)."""
    _check_the_factory_deployment_ran_the_paper_preset_through_the_cuda_pool(rehearsed)
    _check_training_took_the_paper_path_and_resumed_after_sigkill(rehearsed)
    _check_generation_rendered_every_sampler_compiled_in_full_batches(rehearsed)
    _check_validation_fine_tuned_both_full_size_classifiers(rehearsed)


def _check_the_factory_deployment_ran_the_paper_preset_through_the_cuda_pool(rehearsed):
    runs, names = rehearsed["runs"], rehearsed["deployments"]
    by_name = {x["name"].split(" in ")[0]: x for x in runs}
    assert by_name["factory"]["state_type"] == "COMPLETED", _logs(rehearsed["root"])[-4000:]
    assert names[by_name["factory"]["deployment_id"]] == "factory-cpu" and by_name["factory"]["work_pool_name"] == "cpu"
    for stage, deployment in (("train LoRA", "train-cuda"), ("generate", "generate-cuda"), ("validate", "validate-cuda")):
        run = by_name[stage]
        assert run["state_type"] == "COMPLETED", stage
        # reached through run_deployment and run by the worker of the (stand-in) cuda pool
        assert names.get(run["deployment_id"]) == deployment and run["work_pool_name"] == "cuda", (stage, run)


def _check_training_took_the_paper_path_and_resumed_after_sigkill(rehearsed):
    w = rehearsed["rehearsal"].workdir
    (lora,) = [p for p in w.glob("lora/*/lora.json")]
    meta = json.loads(lora.read_text())
    from dermt2im.diffusion.accel import native_bf16_cpu

    assert meta["optimizer"] == "adamw8bit" and meta["mixed_precision"] == ("bf16" if native_bf16_cpu() else "no")
    cfg = load_config(w / "config.yaml")
    assert cfg.runtime.train.compile == "on" and cfg.runtime.train.gradient_checkpointing
    killed_at = rehearsed["killed_at"]  # the checkpoint dermt2im train had written when it was SIGKILLed
    assert killed_at.parent == lora.parent / "checkpoints" and meta["steps"] > int(killed_at.name.split("-")[1])
    assert f"resumed all from {killed_at}" in _logs(rehearsed["root"])  # by the train-cuda flow run


def _check_generation_rendered_every_sampler_compiled_in_full_batches(rehearsed):
    from dermt2im.core.manifest import SYNTHETIC, read_manifest

    rows = read_manifest(rehearsed["rehearsal"].workdir / "manifests" / "synthetic.parquet", SYNTHETIC)
    assert set(rows["sampler"]) == {"euler", "euler_a", "plms"} and len(rows) == 12
    assert set(rows["batch_size"]) == {8} and set(rows["dtype"]) == {"float16"}
    assert "compiled" in _logs(rehearsed["root"])


def _check_validation_fine_tuned_both_full_size_classifiers(rehearsed):
    import mlflow

    w = rehearsed["rehearsal"].workdir
    mlflow.set_tracking_uri(f"sqlite:///{w / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`dermt2im.kind` = 'cell'")
    assert set(runs["params.model"]) == {"vit", "mobilenet_v2"}
    cfg = load_config(w / "config.yaml").validation
    assert set(runs["params.model_name"]) == {cfg.vit_model, cfg.mobilenet_model}  # the full-size local folders
    assert set(runs["params.learning_rate"]) == {"5e-05", "0.0005"}
    assert (w / "reports" / "table_iv.md").is_file()
