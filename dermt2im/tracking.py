"""MLflow helpers: per-workdir SQLite tracking by default; MLFLOW_TRACKING_URI wins when set."""

from __future__ import annotations

import os

from dermt2im.config import TrackingConfig
from dermt2im.workdir import Workdir


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
        exp_id = mlflow.create_experiment(name, artifact_location=workdir.mlflow_artifacts.as_uri())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
