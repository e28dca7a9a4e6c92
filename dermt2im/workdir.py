"""Where everything lives under a factory working directory, and per-workdir runtime settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "Workdir":
        w = cls(Path(root).expanduser().resolve())
        w.root.mkdir(parents=True, exist_ok=True)
        return w

    def _dir(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def manifests(self) -> Path:
        return self._dir("manifests")

    @property
    def seeds_manifest(self) -> Path:
        return self.manifests / "seeds.parquet"

    def test_set_manifest(self, name: str) -> Path:
        return self._dir("manifests", "test_sets") / f"{name}.parquet"

    @property
    def plan_manifest(self) -> Path:
        return self.manifests / "plan.parquet"

    @property
    def synthetic_manifest(self) -> Path:
        return self.manifests / "synthetic.parquet"

    @property
    def processed(self) -> Path:
        return self._dir("processed")

    @property
    def lora(self) -> Path:
        return self._dir("lora")

    @property
    def synthetic(self) -> Path:
        return self._dir("synthetic")

    @property
    def reports(self) -> Path:
        return self._dir("reports")

    @property
    def data(self) -> Path:
        """Inputs the factory made itself (phantom seed and test sets)."""
        return self._dir("data")

    @property
    def prefect_home(self) -> Path:
        return self._dir(".prefect")

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self._dir("mlartifacts")


def configure_runtime(workdir: Workdir) -> None:
    """Point Prefect and MLflow at this workdir unless the user set them explicitly.

    Must run before Prefect is imported: Prefect reads PREFECT_HOME when its settings load.
    Without PREFECT_API_URL, Prefect starts a temporary local server backed by SQLite under
    PREFECT_HOME, so nothing needs to be started by hand.
    """
    os.environ.setdefault("PREFECT_HOME", str(workdir.prefect_home))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(workdir.prefect_home / "storage"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", workdir.mlflow_uri)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # Let Prefect's UI show the domain layer's own log lines inside task runs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dermt2im")
    # Offline by default: no usage telemetry from the temporary local server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


CONFIG_SNAPSHOT = "config.yaml"


def workdir_config(workdir: Workdir, config: str | Path | None = None, overrides: list[str] | None = None):
    """The factory config for this workdir.

    An explicit ``config`` (preset name or file) plus ``overrides`` is resolved, validated and saved
    as ``W/config.yaml`` so that later stages run against the same settings; with no ``config`` the
    saved snapshot is used (overrides on top), and a fresh workdir falls back to the smoke preset.
    """
    import yaml

    from dermt2im.config import config_from_dict, load_config
    from dermt2im.fileio import atomic_write_text

    snapshot = workdir.root / CONFIG_SNAPSHOT
    if config is None and snapshot.is_file():
        cfg = config_from_dict(yaml.safe_load(snapshot.read_text()) or {}, str(snapshot), overrides)
        if not overrides:
            return cfg
    else:
        cfg = load_config(config or "smoke", overrides)
    atomic_write_text(snapshot, yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    return cfg
