"""Experiment tracking behind one small protocol; MLflow is the one implementation.

Training and validation log through a ``Tracker`` and never import MLflow themselves, so the
tracking backend is one module to read, test or replace. ``open_tracker`` points MLflow at the
workdir's SQLite store (``sqlite:///W/mlflow.db``) unless ``tracking.mlflow_uri`` or
``MLFLOW_TRACKING_URI`` says otherwise, and selects (creating if needed) the experiment.

Artifacts of a SQLite store live in ``mlartifacts/`` beside the database file (``W/mlartifacts``),
and the store records them as ``mlflow-artifacts:/<experiment>/<run>/artifacts``: a location
relative to that folder, never an absolute path, so a workdir that is copied or moved keeps its
artifacts. This tracker writes and reads them there itself; ``mlflow ui`` serves them with
``--artifacts-destination W/mlartifacts`` (its default, ``./mlartifacts``, is right when it is
started inside the workdir). A tracking server (``http(s)://``) decides where artifacts go itself.
Experiments made before this recorded absolute ``file://`` locations; those keep working as before.

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

    def set_description(self, run: str, text: str) -> None: ...

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


PROXIED = "mlflow-artifacts:"  # MLflow's scheme for artifacts a server resolves against --artifacts-destination
DESCRIPTION_TAG = "mlflow.note.content"  # what MLflow's UI shows as a run's or experiment's description
EXPERIMENT_DESCRIPTION = (
    "Derm-T2IM: synthetic dermoscopy from a DreamBooth-LoRA Stable Diffusion, validated by fine-tuning ViT and "
    "MobileNetV2 on real-only (baseline) vs hybrid (real + synthetic) data and testing on unseen real images. "
    "Comparison runs (tag dermt2im.kind = comparison) hold Table IV and the headline balanced accuracies; their "
    "child runs are one (model, regime, seed) each; train-* runs are the LoRA trainings. In MLflow 3 these are "
    "under the experiment's Model training view."
)
EXPERIMENT_TAGS = {"project": "derm-t2im", "task": "benign vs malignant dermoscopy",
                   "paper": "Farooq et al., Derm-T2IM"}


def sqlite_artifact_root(uri: str) -> Path | None:
    """``mlartifacts/`` beside the database of a ``sqlite:///`` store; None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(db).expanduser().resolve().parent / "mlartifacts" if db and db != ":memory:" else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"


class MlflowTracker:
    """``Tracker`` over an ``MlflowClient`` for one experiment.

    ``artifact_root``: where ``mlflow-artifacts:`` locations live for a local store (None: let
    MLflow resolve every artifact location itself)."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(uri)
        self.artifact_root = artifact_root
        if artifact_root is not None:
            _initialise_sqlite_store(uri)
        self.client = MlflowClient(uri)
        self.experiment = experiment
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = f"{PROXIED}/{_slug(experiment)}" if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags={DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION, **EXPERIMENT_TAGS})
        else:
            self.experiment_id = found.experiment_id
            if DESCRIPTION_TAG not in found.tags:  # made by an older version, or by hand
                for k, v in {DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION, **EXPERIMENT_TAGS}.items():
                    self.client.set_experiment_tag(self.experiment_id, k, v)
        self._artifact_uris: dict[str, str] = {}

    # --- artifacts: a local store's mlflow-artifacts: locations are resolved here

    def _local_repo(self, run: str):
        """A repository for the run's artifacts under ``artifact_root``, or None to let MLflow resolve them."""
        if self.artifact_root is None:
            return None
        if run not in self._artifact_uris:
            self._artifact_uris[run] = self.client.get_run(run).info.artifact_uri
        uri = self._artifact_uris[run]
        if not uri.startswith(PROXIED):
            return None
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        return LocalArtifactRepository(str(self.artifact_root / uri[len(PROXIED):].lstrip("/")))

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
        repo = self._local_repo(run)
        if repo is None:
            self.client.log_artifact(run, str(path), folder)
        else:
            repo.log_artifact(str(path), folder)

    def log_folder(self, run: str, path: str | Path, folder: str | None = None) -> None:
        repo = self._local_repo(run)
        if repo is None:
            self.client.log_artifacts(run, str(path), folder)
        else:
            repo.log_artifacts(str(path), folder)

    def _log_as_file(self, run: str, path: str, write: Any) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(path).name
            write(local)
            folder = str(Path(path).parent)
            self.log_file(run, local, None if folder in ("", ".") else folder)

    def log_figure(self, run: str, figure: Any, path: str) -> None:
        if self._local_repo(run) is None:
            self.client.log_figure(run, figure, path)
        else:
            self._log_as_file(run, path, lambda p: figure.savefig(p, format=Path(path).suffix.lstrip(".") or "png"))

    def log_text(self, run: str, text: str, path: str) -> None:
        self._log_as_file(run, path, lambda p: p.write_text(text, encoding="utf-8"))

    def log_dict(self, run: str, data: Mapping[str, Any], path: str) -> None:
        import json

        self._log_as_file(run, path, lambda p: p.write_text(json.dumps(dict(data), indent=2, default=str)))

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

    def set_description(self, run: str, text: str) -> None:
        self.client.set_tag(run, DESCRIPTION_TAG, text)

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
        Path(dest).mkdir(parents=True, exist_ok=True)
        repo = self._local_repo(run)
        if repo is None:
            return Path(self.client.download_artifacts(run, path, str(dest)))
        return Path(repo.download_artifacts(path, str(dest)))


def _record(r: Any) -> RunRecord:
    return RunRecord(r.info.run_id, r.info.run_name or "", r.info.status, r.info.start_time, r.info.end_time,
                     r.info.experiment_id, dict(r.data.tags), dict(r.data.params), dict(r.data.metrics))


def _initialise_sqlite_store(uri: str) -> None:
    """Create a new SQLite store with MLflow's Default experiment under ``mlflow-artifacts:/0``.

    MLflow creates the Default experiment when it first opens a database, with an absolute path
    below whatever the current directory is then; opening it here first gives it a location that
    does not depend on where a command happened to be started."""
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser()
    if db.is_file():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, f"{PROXIED}/")


def open_tracker(workdir: Workdir, cfg: TrackingConfig, experiment: str | None = None) -> MlflowTracker:
    """The tracker for this workdir's store and ``experiment`` (default ``tracking.experiment``)."""
    uri = tracking_uri(workdir, cfg)
    return MlflowTracker(uri, experiment or cfg.experiment, sqlite_artifact_root(uri))
