"""Prefect deployment settings: the ``orchestration`` section of a factory config.

The domain never reads these; flows do. They say how the CPU parent flow reaches the GPU stages and
how generation fans out over worker runs, never what is made, so they enter no key.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from dermt2im.core.config import format_errors
from dermt2im.core.errors import ConfigError
from dermt2im.core.specs import Strict


class OrchestrationSettings(Strict):
    gpu_deployments: bool = Field(
        False, description="run train / generate / validate through run_deployment on the cuda work pool instead of "
        "in-process (validation stays in-process when runtime.validate.device is cpu)"
    )
    train_deployment: str = "train/train-cuda"
    generate_deployment: str = "generate/generate-cuda"
    validate_deployment: str = "validate/validate-cuda"
    deployment_timeout_s: float | None = Field(None, gt=0, description="None waits for as long as the run takes")
    parallel_workers: int = Field(
        0, ge=0, description="> 0: the generate flow renders through this many runs of worker_deployment, each a "
        "static partition of the shards (scale-out without Ray)"
    )
    worker_deployment: str = "generate-worker/generate-worker-cuda"


def orchestration(cfg: Any) -> OrchestrationSettings:
    """The validated ``orchestration`` section of a factory config (a clear error naming the key)."""
    try:
        settings = OrchestrationSettings.model_validate(cfg.orchestration or {})
    except ValidationError as err:
        raise ConfigError(format_errors(err, f"the orchestration section of config {cfg.name!r}",
                                        "orchestration")) from None
    scale = getattr(cfg, "scale", None)
    if settings.parallel_workers > 0 and scale is not None and scale.ray_address is not None:
        raise ConfigError("invalid configuration:\n  orchestration.parallel_workers and scale.ray_address are both set: "
                          "scale out either on the Ray cluster or over worker runs, not both")
    return settings
