"""Where everything lives under a factory working directory, and per-workdir runtime settings."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dermt2im.core import storage
from dermt2im.core.fileio import atomic_write_text

if TYPE_CHECKING:
    from dermt2im.core.config import FactoryConfig

Location = str | Path  # a local path, or an fsspec URL (dermt2im.core.storage)
# Every workdir holds this file: ingest never scans a folder that does (its images are the factory's
# own outputs, never real seeds) and refuses one as a SOURCE.
WORKDIR_MARKER = ".dermt2im-workdir"
_MARKER_TEXT = ("A derm-t2im factory working directory. Ingest skips every folder holding this file: "
                "the images below are the factory's own outputs, never real seeds.\n")


def is_workdir(folder: str | Path) -> bool:
    """``folder`` holds the workdir marker."""
    return (Path(folder) / WORKDIR_MARKER).is_file()


@dataclass(frozen=True)
class Workdir:
    root: Path
    manifest_store: str | None = None  # storage.manifests: None keeps the manifests in W/manifests
    image_store: str | None = None  # storage.images: None keeps rendered PNGs in W/synthetic

    @classmethod
    def at(cls, root: str | Path, manifests: str | None = None, images: str | None = None) -> "Workdir":
        w = cls(Path(root).expanduser().resolve(), manifests or None, images or None)
        w.root.mkdir(parents=True, exist_ok=True)
        if not is_workdir(w.root):
            atomic_write_text(w.root / WORKDIR_MARKER, _MARKER_TEXT)
        return w

    @classmethod
    def of(cls, root: str | Path, cfg: "FactoryConfig") -> "Workdir":
        """The workdir at ``root`` with the manifest and image locations ``cfg`` names."""
        return cls.at(root, cfg.storage.manifests, cfg.storage.images)

    def using(self, cfg: "FactoryConfig") -> "Workdir":
        """This workdir with the manifest and image locations ``cfg`` names."""
        return dataclasses.replace(self, manifest_store=cfg.storage.manifests or None,
                                   image_store=cfg.storage.images or None)

    def _dir(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def manifests(self) -> Location:
        """The manifests' folder: W/manifests, or ``storage.manifests`` (a URL stays a ``str``)."""
        if self.manifest_store is None:
            return self._dir("manifests")
        if storage.is_remote(self.manifest_store):
            return self.manifest_store
        p = storage.resolve(self.manifest_store, self.root)
        Path(p).mkdir(parents=True, exist_ok=True)
        return p

    @property
    def manifests_are_remote(self) -> bool:
        return self.manifest_store is not None and storage.is_remote(self.manifest_store)

    @property
    def seeds_manifest(self) -> Location:
        return storage.join(self.manifests, "seeds.parquet")

    @property
    def test_sets_folder(self) -> Location:
        folder = storage.join(self.manifests, "test_sets")
        if not storage.is_remote(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        return folder

    def test_set_manifest(self, name: str) -> Location:
        return storage.join(self.test_sets_folder, f"{name}.parquet")

    @property
    def plan_manifest(self) -> Location:
        return storage.join(self.manifests, "plan.parquet")

    @property
    def synthetic_manifest(self) -> Location:
        return storage.join(self.manifests, "synthetic.parquet")

    @property
    def locks(self) -> Path:
        """Lock files for manifests on object stores (``manifest.writer_lock``): every worker shares
        this workdir (its leases live here too), so its POSIX locks cover them all."""
        return self._dir(".locks")

    @property
    def images(self) -> Location:
        """Where rendered PNGs go: ``storage.images`` (a URL, or a folder relative to the workdir),
        else W/synthetic."""
        if self.image_store is None:
            return self.synthetic
        return self.image_store if storage.is_remote(self.image_store) else storage.resolve(self.image_store, self.root)

    def png_path(self, label: str, sample_key: str) -> Location:
        """A rendered image's location: a ``Path`` locally, a ``str`` URL on an image store."""
        return storage.join(self.images, label, f"{sample_key}.png")

    @property
    def leases(self) -> Path:
        """Scale-out: one lease file per shard being rendered (``dermt2im.runners.leases``)."""
        return self._dir("synthetic", ".leases")

    @property
    def stamps(self) -> Path:
        """What each stage unit was last made for (``dermt2im.stage.Stamps``)."""
        return self._dir(".stamps")

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

    from dermt2im.core.config import config_from_dict, load_config

    snapshot = workdir.root / CONFIG_SNAPSHOT
    if config is None and snapshot.is_file():
        saved = yaml.safe_load(snapshot.read_text()) or {}
        cfg = config_from_dict(saved, str(snapshot), overrides)
        if not overrides and saved == cfg.model_dump(mode="json", by_alias=True):
            return cfg  # unchanged (a snapshot in an older layout is saved again in the current one)
    else:
        cfg = load_config(config or "smoke", overrides)
    atomic_write_text(snapshot, cfg.as_yaml())
    return cfg


def open_workdir(root: str | Path, config: str | Path | None = None,
                 overrides: list[str] | None = None) -> tuple[Workdir, "FactoryConfig"]:
    """The workdir at ``root`` with its config (``workdir_config``: saved as ``W/config.yaml``), the
    workdir pointing at the manifest location that config names (``storage.manifests``)."""
    w = Workdir.at(root)
    cfg = workdir_config(w, config, overrides)
    return w.using(cfg), cfg
