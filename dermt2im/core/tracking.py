"""Experiment tracking behind one small protocol; MLflow is the one implementation.

Training and validation log through a ``Tracker`` and never import MLflow themselves, so the
tracking backend is one module to read, test or replace. ``open_tracker`` points MLflow at the
workdir's SQLite store (``sqlite:///W/mlflow.db``) unless ``tracking.mlflow_uri`` or
``MLFLOW_TRACKING_URI`` says otherwise, and selects (creating if needed) the experiment, whose
artifacts then go under ``W/mlartifacts``.

Every call names its run explicitly (no "active run" state), so runs can be logged from worker
threads and Prefect tasks alike.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from dermt2im.core.runtime import TrackingConfig
from dermt2im.core.workdir import Workdir

_BATCH = 500  # MLflow accepts up to 1000 metrics / 100 params per log_batch call


@dataclass(frozen=True)
class RunRecord:
    """What a tracking store holds about one run."""

    run_id: str
    name: str
    status: str
    start_time: int | None
    end_time: int | None
    experiment_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class DatasetRef:
    """A table a run trained, validated or tested on (logged as a dataset input of the run)."""

    frame: pd.DataFrame
    source: str
    name: str
    context: str  # training | validation | test


class Tracker(Protocol):
    experiment: str
    experiment_id: str

    def start(self, name: str, *, tags: Mapping[str, str] | None = None, parent: str | None = None) -> str: ...

    def log_params(self, run: str, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, run: str, metrics: Mapping[str, float], step: int = 0) -> None: ...

    def log_points(self, run: str, points: Iterable[tuple[str, float, int]]) -> None: ...

    def log_file(self, run: str, path: str | Path, folder: str | None = None) -> None: ...

    def log_folder(self, run: str, path: str | Path, folder: str | None = None) -> None: ...

    def log_figure(self, run: str, figure: Any, path: str) -> None: ...

    def log_text(self, run: str, text: str, path: str) -> None: ...

    def log_dict(self, run: str, data: Mapping[str, Any], path: str) -> None: ...

    def log_datasets(self, run: str, datasets: Sequence[DatasetRef]) -> None: ...

    def set_tags(self, run: str, tags: Mapping[str, str]) -> None: ...

    def finish(self, run: str, status: str = "FINISHED") -> None: ...

    def reopen(self, run: str) -> None: ...

    def runs(self, filter_string: str, *, order_by: Sequence[str] = ("attributes.start_time ASC",),
             limit: int | None = None) -> list[RunRecord]: ...

    def run(self, run_id: str) -> RunRecord: ...

    def experiment_name(self, experiment_id: str) -> str: ...

    def download(self, run: str, path: str, dest: str | Path) -> Path: ...


def metric_key(*parts: str) -> str:
    """Join parts with '.' after replacing characters MLflow does not allow in metric / param names."""
    return ".".join(re.sub(r"[^A-Za-z0-9_\-/ ]", "_", str(p)) for p in parts)


def tracking_uri(workdir: Workdir, cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow_uri or workdir.mlflow_uri


class MlflowTracker:
    """``Tracker`` over an ``MlflowClient`` for one experiment."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None) -> None:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        self.experiment = experiment
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (found.experiment_id if found is not None
                              else self.client.create_experiment(experiment, artifact_location=artifact_location))

    # --- writing

    def start(self, name: str, *, tags: Mapping[str, str] | None = None, parent: str | None = None) -> str:
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def log_params(self, run: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run, params=items[i : i + 100])

    def log_metrics(self, run: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_points(run, ((k, v, step) for k, v in metrics.items()))

    def log_points(self, run: str, points: Iterable[tuple[str, float, int]]) -> None:
        """Metric values at steps; non-finite values are left out (MLflow cannot chart them)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(s)) for k, v, s in points if math.isfinite(float(v))]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run, metrics=items[i : i + _BATCH])

    def log_file(self, run: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run, str(path), folder)

    def log_folder(self, run: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifacts(run, str(path), folder)

    def log_figure(self, run: str, figure: Any, path: str) -> None:
        self.client.log_figure(run, figure, path)

    def log_text(self, run: str, text: str, path: str) -> None:
        self.client.log_text(run, text, path)

    def log_dict(self, run: str, data: Mapping[str, Any], path: str) -> None:
        self.client.log_dict(run, dict(data), path)

    def log_datasets(self, run: str, datasets: Sequence[DatasetRef]) -> None:
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for d in datasets:
                ds = mlflow.data.from_pandas(d.frame.reset_index(drop=True), source=d.source, targets="label",
                                             name=d.name)
                inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", d.context)]))
        self.client.log_inputs(run, datasets=inputs)

    def set_tags(self, run: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run, k, v)

    def finish(self, run: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run, status)

    def reopen(self, run: str) -> None:
        self.client.update_run(run, status="RUNNING")

    # --- reading

    def runs(self, filter_string: str, *, order_by: Sequence[str] = ("attributes.start_time ASC",),
             limit: int | None = None) -> list[RunRecord]:
        out: list[RunRecord] = []
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, order_by=list(order_by),
                                           max_results=min(limit or 1000, 1000), page_token=token)
            out.extend(_record(r) for r in page)
            token = page.token
            if not token or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out

    def run(self, run_id: str) -> RunRecord:
        return _record(self.client.get_run(run_id))

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def download(self, run: str, path: str, dest: str | Path) -> Path:
        return Path(self.client.download_artifacts(run, path, str(dest)))


def _record(r: Any) -> RunRecord:
    return RunRecord(r.info.run_id, r.info.run_name or "", r.info.status, r.info.start_time, r.info.end_time,
                     r.info.experiment_id, dict(r.data.tags), dict(r.data.params), dict(r.data.metrics))


def open_tracker(workdir: Workdir, cfg: TrackingConfig, experiment: str | None = None) -> MlflowTracker:
    """The tracker for this workdir's store and ``experiment`` (default ``tracking.experiment``)."""
    uri = tracking_uri(workdir, cfg)
    # A local store keeps artifacts beside it in the workdir; a tracking server decides for itself.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    return MlflowTracker(uri, experiment or cfg.experiment, workdir.mlflow_artifacts.as_uri() if local else None)
