"""MLflow helpers: per-workdir SQLite tracking by default; MLFLOW_TRACKING_URI wins when set."""

from __future__ import annotations

import os

from dermt2im.core.config import TrackingConfig
from dermt2im.core.workdir import Workdir


def tracking_uri(workdir: Workdir, cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow_uri or workdir.mlflow_uri


def use_tracking(workdir: Workdir, cfg: TrackingConfig, experiment: str | None = None) -> str:
    """Point MLflow at the workdir's store and select (creating if needed) the experiment.

    Artifacts of a new experiment go under W/mlartifacts. Returns the experiment id.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(workdir, cfg))
    name = experiment or cfg.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        uri = mlflow.get_tracking_uri()
        # A local store keeps artifacts beside it in the workdir; a tracking server decides for itself.
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = workdir.mlflow_artifacts.as_uri() if local else None
        exp_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def tracking_client(workdir: Workdir, cfg: TrackingConfig, experiment: str | None = None):
    """``(MlflowClient, experiment_id)`` for this workdir's store, the experiment created if needed.

    Code that logs with explicit run ids (child runs, Prefect task threads) uses the client rather
    than MLflow's fluent API, whose active-run stack is per process / thread."""
    from mlflow import MlflowClient

    exp_id = use_tracking(workdir, cfg, experiment)
    return MlflowClient(tracking_uri(workdir, cfg)), exp_id


def metric_key(*parts: str) -> str:
    """Join parts with '.' after replacing characters MLflow does not allow in metric / param names."""
    import re

    return ".".join(re.sub(r"[^A-Za-z0-9_\-/ ]", "_", str(p)) for p in parts)
