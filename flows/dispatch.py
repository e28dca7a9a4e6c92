"""How a CPU parent flow reaches a GPU stage: in-process, or on the cuda work pool via run_deployment."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import get_run_logger

from dermt2im.core.errors import DermT2imError
from dermt2im.flows.settings import OrchestrationSettings


class StageFailed(DermT2imError, RuntimeError):
    pass


def run_gpu_stage(flow_fn: Callable[..., Any], deployment: str, parameters: dict, orch: OrchestrationSettings,
                  wait_for: Sequence[Any] = ()) -> Any:
    """Run ``flow_fn`` as a subflow here, or, when GPU deployments are configured, as a run of
    ``deployment`` on the cuda pool. Stages exchange data through the workdir's manifests, so the
    parent needs only to know that the run completed. ``wait_for``: the results of the upstream
    subflows, which Prefect's run graph then draws as edges into this one."""
    if not orch.gpu_deployments:
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
