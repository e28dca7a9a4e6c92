"""How a CPU parent flow reaches a GPU stage: in-process, or on the cuda work pool via run_deployment.

``placement`` decides, for a config, which of the GPU stages (train, generate, validate) run in the
parent's process and which are dispatched to a deployment; the factory and the regeneration flow
follow it, and ``check_devices_here`` refuses at the start of a flow a stage that would run here on
a device this machine lacks (the paper preset's validation asked a CPU pool for CUDA, after hours of
training and generation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import get_run_logger

from dermt2im.core.errors import DermT2imError
from dermt2im.flows.settings import OrchestrationSettings


class StageFailed(DermT2imError, RuntimeError):
    pass


GPU_STAGES = ("train", "generate", "validate")


def stage_device(cfg: Any, stage: str) -> str:
    """The device a stage asks for in ``cfg`` (``runtime.<stage>.device``)."""
    runtime = cfg.runtime
    return {"train": runtime.train.device, "generate": runtime.generate.device,
            "validate": runtime.validation.device}[stage]


def placement(cfg: Any, orch: OrchestrationSettings) -> dict[str, str | None]:
    """GPU stage -> the deployment it is dispatched to, or None when it runs in this process.

    With ``orchestration.gpu_deployments``, training and generation go to the cuda pool, and so does
    validation unless its device is the CPU (then it runs here, as ``validate-cpu`` does)."""
    if not orch.gpu_deployments:
        return dict.fromkeys(GPU_STAGES)
    return {"train": orch.train_deployment, "generate": orch.generate_deployment,
            "validate": None if stage_device(cfg, "validate") == "cpu" else orch.validate_deployment}


def check_devices_here(cfg: Any, stages: Sequence[str]) -> None:
    """Refuse, before any work, a stage that would run in this process on CUDA where there is none."""
    wanting = [s for s in stages if stage_device(cfg, s).startswith("cuda")]
    if not wanting:
        return
    import torch

    if torch.cuda.is_available():
        return
    first = wanting[0]
    raise StageFailed(
        f"{', '.join(wanting)} would run in this flow's process on CUDA (runtime.{first}.device: "
        f"{stage_device(cfg, first)}), and this worker has none: set orchestration.gpu_deployments=true to run "
        f"{'them' if len(wanting) > 1 else 'it'} on the cuda pool, or runtime.{first}.device=cpu")


def run_gpu_stage(flow_fn: Callable[..., Any], deployment: str | None, parameters: dict, orch: OrchestrationSettings,
                  wait_for: Sequence[Any] = ()) -> Any:
    """Run ``flow_fn`` as a subflow here (``deployment`` None), or as a run of ``deployment`` on the
    cuda pool. Stages exchange data through the workdir's manifests, so the parent needs only to know
    that the run completed. ``wait_for``: the results of the upstream subflows, which Prefect's run
    graph then draws as edges into this one."""
    if deployment is None:
        return flow_fn(**parameters, wait_for=list(wait_for) or None)
    from prefect.deployments import run_deployment

    log = get_run_logger()
    log.info("dispatching %s to its work pool", deployment)
    run = run_deployment(name=deployment, parameters=parameters, timeout=orch.deployment_timeout_s)
    state = run.state
    if state is None or not state.is_completed():
        raise StageFailed(f"deployment {deployment} (flow run {run.id}) ended as {state.name if state else 'unknown'}")
    try:
        return state.result()
    except Exception:  # noqa: BLE001 - results may live on the worker's storage; the manifests are what count
        return {"flow_run_id": str(run.id), "state": state.name}
