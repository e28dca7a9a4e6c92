"""No deployment asks a pool for a device it does not have: every deployment of
deployments/prefect.yaml, with its config resolved as a run of it resolves it, runs in its own process
only stages whose device its pool has; the rest are dispatched to deployments on the cuda pool.

The ``factory-cpu`` and ``regenerate-weekly`` deployments ran validation in-process on the cpu pool
while the paper preset says ``runtime.validate.device: cuda``: they died at validation, after the
hours of training and generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dermt2im.core.config import config_from_dict, load_config
from dermt2im.flows.dispatch import GPU_STAGES, StageFailed, check_devices_here, placement, stage_device
from dermt2im.flows.settings import orchestration

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
FACTORY = "dermt2im.flows.factory.factory"

# Which GPU stages each entrypoint runs itself (a factory or regeneration: those placement keeps here).
OWN_STAGES = {"dermt2im.flows.train.train": ("train",), "dermt2im.flows.generate.generate": ("generate",),
              "dermt2im.flows.generate_worker.generate_worker": ("generate",), "dermt2im.flows.validate.validate": ("validate",),
              "dermt2im.flows.seeds.prepare_seeds": ()}


def _config_of(dep: dict):
    """The config a run of ``dep`` works with: its preset and overrides, or, for ``config: null``, the
    workdir's saved config as the factory deployment on the same workdir wrote it, plus its overrides."""
    params = dep["parameters"]
    overrides = list(params.get("overrides") or [])
    if params.get("config"):
        return load_config(params["config"], overrides)
    (writer,) = [d for d in DEPLOYMENTS if d["entrypoint"] == FACTORY and d["parameters"].get("config")
                 and d["parameters"]["workdir"] == params["workdir"]]
    saved = _config_of(writer).model_dump(mode="json", by_alias=True)
    return config_from_dict(saved, f"W/config.yaml of {writer['name']}", overrides)


def _stages_here(dep: dict, cfg) -> tuple[str, ...]:
    if dep["entrypoint"] in OWN_STAGES:
        return OWN_STAGES[dep["entrypoint"]]
    kept = [s for s, deployment in placement(cfg, orchestration(cfg)).items() if deployment is None]
    if dep["entrypoint"] == FACTORY:
        return tuple(kept)
    assert dep["entrypoint"] == "dermt2im.flows.regenerate.regenerate", f"unknown entrypoint {dep['entrypoint']}"
    return tuple(s for s in kept if s != "train")


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_deployment_asks_its_pool_only_for_a_device_it_has(dep):
    cfg = _config_of(dep)
    pool = dep["work_pool"]["name"]
    for stage in _stages_here(dep, cfg):
        device = stage_device(cfg, stage)
        assert pool == "cuda" or not device.startswith("cuda"), \
            f"{dep['name']} runs {stage} on the {pool} pool with runtime.{stage}.device {device}"
    names = {f"{d['entrypoint'].rsplit('.', 1)[1].replace('_', '-')}/{d['name']}": d for d in DEPLOYMENTS}
    for stage, target in placement(cfg, orchestration(cfg)).items():
        if target is not None and dep["entrypoint"] in (FACTORY, "dermt2im.flows.regenerate.regenerate"):
            assert target in names, f"{dep['name']} dispatches {stage} to {target}, which prefect.yaml lacks"
            assert names[target]["work_pool"]["name"] == "cuda", target


def test_the_paper_factory_dispatches_validation_unless_it_is_told_to_use_the_cpu():
    cfg = load_config("paper", ["orchestration.gpu_deployments=true"])
    assert placement(cfg, orchestration(cfg)) == {"train": "train/train-cuda", "generate": "generate/generate-cuda",
                                                  "validate": "validate/validate-cuda"}
    on_cpu = load_config("paper", ["orchestration.gpu_deployments=true", "runtime.validate.device=cpu"])
    assert placement(on_cpu, orchestration(on_cpu))["validate"] is None
    smoke = load_config("smoke")
    assert placement(smoke, orchestration(smoke)) == dict.fromkeys(GPU_STAGES)


def test_a_stage_that_would_run_here_on_missing_cuda_is_refused_before_any_work(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config("paper")
    with pytest.raises(StageFailed) as err:
        check_devices_here(cfg, ["train", "generate", "validate"])
    message = str(err.value)
    assert "\n" not in message and "orchestration.gpu_deployments=true" in message and "runtime.train.device=cpu" in message
    check_devices_here(load_config("smoke"), list(GPU_STAGES))  # CPU devices: nothing to refuse
