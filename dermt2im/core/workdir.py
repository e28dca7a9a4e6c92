"""Where everything lives under a factory working directory, and per-workdir runtime settings."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dermt2im.core import storage
from dermt2im.core.errors import DermT2imError
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
        """The manifests' folder: W/manifests, or ``storage.manifests`` (a URL stays a ``str``).
        Naming it creates nothing: every manifest write makes its folder (``fileio.atomic_path``)."""
        if self.manifest_store is None:
            return self.root / "manifests"
        if storage.is_remote(self.manifest_store):
            return self.manifest_store
        return storage.resolve(self.manifest_store, self.root)

    @property
    def manifests_are_remote(self) -> bool:
        return self.manifest_store is not None and storage.is_remote(self.manifest_store)

    @property
    def seeds_manifest(self) -> Location:
        return storage.join(self.manifests, "seeds.parquet")

    @property
    def test_sets_folder(self) -> Location:
        return storage.join(self.manifests, "test_sets")

    def test_set_manifest(self, name: str) -> Location:
        return storage.join(self.test_sets_folder, f"{name}.parquet")

    @property
    def plan_manifest(self) -> Location:
        return storage.join(self.manifests, "plan.parquet")

    @property
    def synthetic_manifest(self) -> Location:
        """The renders (written by generate)."""
        return storage.join(self.manifests, "synthetic.parquet")

    @property
    def imported_manifest(self) -> Location:
        """External synthetic sets (written by import-synthetic)."""
        return storage.join(self.manifests, "imported.parquet")

    @property
    def quality_manifest(self) -> Location:
        """The gate's verdict on every render and import (written by quality)."""
        return storage.join(self.manifests, "quality.parquet")

    @property
    def flag_rates_manifest(self) -> Location:
        """The shortcut audit's flag rates per image set and class (written by quality)."""
        return storage.join(self.manifests, "flag_rates.parquet")

    @property
    def fidelity_manifest(self) -> Location:
        """Each assessed image's typicality and skin tone (``dermt2im.fidelity.measures``)."""
        return storage.join(self.manifests, "fidelity.parquet")

    @property
    def fidelity(self) -> Path:
        """The fidelity report's own files: the learned seed embedding, cached features, noise images."""
        return self._dir("fidelity")

    @property
    def quality(self) -> Path:
        """The quality gate's own caches: each image's measures, the seeds' audit index."""
        return self._dir("quality")

    @property
    def locks(self) -> Path:
        """Lock files for manifests on object stores (``writers.writer_lock``): every worker shares
        this workdir (its config and LoRA weights live here too), so its POSIX locks cover them all."""
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
    # A busy machine (CI, a shared box) can take longer than Prefect's default 20 s to start it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # A workdir is shared: Prefect must never read a cached result from it (a planted record can
    # name any serializer, pickle included). The stages keep their own JSON / Parquet records.
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_TASKS_DISABLE_CACHING", "true")


CONFIG_SNAPSHOT = "config.yaml"


DEFAULTS = "defaults"  # no preset: the config models' own defaults, which are the paper's settings


def read_snapshot(snapshot: Path) -> dict:
    """A saved ``W/config.yaml`` as a dict; a damaged one is a ``ConfigError`` naming the file."""
    import yaml

    from dermt2im.core import yamltext
    from dermt2im.core.errors import ConfigError

    hint = "fix it, or delete it and pass --config to start this workdir's config again"
    try:
        saved = yamltext.load(snapshot.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{snapshot} is not valid YAML{at}: {getattr(err, 'problem', None) or err}; {hint}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{snapshot} must hold a mapping of sections, got {type(saved).__name__}; {hint}")
    return saved


@dataclass(frozen=True)
class ResolvedConfig:
    """The config a command or flow runs with, where it came from, and whether ``W/config.yaml`` changes."""

    cfg: FactoryConfig
    origin: str  # in words, for the one line every command prints
    write: bool  # whether W/config.yaml must be (re)written
    before: dict | None  # the saved config this replaces, if any


def _describe(config: str) -> str:
    if config == DEFAULTS:
        return "built-in defaults (the paper's settings)"
    return f"config file {config}" if Path(config).suffix in (".yaml", ".yml") else f"preset {config}"


def resolve_config(root: Path, config: str | Path | None, overrides: list[str] | None, *, save: bool = False,
                   fallback: str = DEFAULTS) -> ResolvedConfig:
    """The config a command or flow on the workdir at ``root`` runs with; the one resolver of the
    project (the CLI and the flows both ask it). Nothing is written here. In order:

    1. ``config`` (a preset name or a YAML file), ``overrides`` on top: it becomes the workdir's config;
    2. the workdir's saved ``W/config.yaml``, ``overrides`` on top: saved only with ``save`` (the CLI's
       ``--save``; flows always save, since the stages of a flow read the config from there);
    3. a fresh workdir: ``fallback``, the built-in defaults (the paper's settings) or a preset
       (``smoke`` for the phantom demo).
    """
    from dermt2im.core.config import config_from_dict, load_config

    snapshot = Path(root) / CONFIG_SNAPSHOT
    saved = read_snapshot(snapshot) if snapshot.is_file() else None
    sets = f" with --set {' '.join(overrides)}" if overrides else ""
    if config is None and saved is not None:
        cfg = config_from_dict(saved, str(snapshot), overrides)
        if overrides and not save:
            return ResolvedConfig(cfg, f"{snapshot} ({cfg.name}){sets}, for this command only (--save keeps it)",
                                  False, saved)
        # unchanged, or a snapshot in an older layout (moved keys), saved again in the current one
        return ResolvedConfig(cfg, f"{snapshot} ({cfg.name}){sets}",
                              saved != cfg.model_dump(mode="json", by_alias=True), saved)
    chosen = str(config or fallback)
    cfg = config_from_dict({}, _describe(DEFAULTS), overrides) if chosen == DEFAULTS else load_config(chosen, overrides)
    return ResolvedConfig(cfg, f"{_describe(chosen)}{sets}", True, saved)


def save_config(workdir: Workdir, resolved: ResolvedConfig) -> Workdir:
    """Write ``W/config.yaml`` when the resolved config changes it; the workdir with the manifest and
    image locations the config names."""
    if resolved.write:
        atomic_write_text(workdir.root / CONFIG_SNAPSHOT, resolved.cfg.as_yaml())
    return workdir.using(resolved.cfg)


def open_workdir(root: str | Path, config: str | Path | None = None, overrides: list[str] | None = None, *,
                 fallback: str = DEFAULTS, check: Callable[[FactoryConfig], object] | None = None,
                 ) -> tuple[Workdir, "FactoryConfig"]:
    """The workdir at ``root`` with its config, as a flow opens it (``resolve_config`` with ``save``:
    saved as ``W/config.yaml``, which every stage of the flow reads), pointing at the manifest
    location that config names (``storage.manifests``). ``check`` validates sections the domain does
    not know (orchestration) before anything is saved."""
    import logging

    resolved = resolve_config(Path(root).expanduser().resolve(), config, overrides, save=True, fallback=fallback)
    if check is not None:
        check(resolved.cfg)
    w = Workdir.at(root)
    logging.getLogger(__name__).info("config %s: %s%s", resolved.cfg.name, resolved.origin,
                                     f", saved as {w.root / CONFIG_SNAPSHOT}" if resolved.write else "")
    return save_config(w, resolved), resolved.cfg


# --------------------------------------------------------------------------------------------------
# one run at a time


class WorkdirBusy(DermT2imError, RuntimeError):
    """Another process is running a stage on this workdir."""


_HELD: dict[str, list] = {}  # lock path -> [mode, count, open file] for this process
_HELD_LOCK = threading.Lock()


def _holder(info: Path) -> str:
    try:
        d = json.loads(info.read_text())
        return f"`{d['command']}` (pid {d['pid']} on {d['host']}, since {d['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def workdir_lock(workdir: Workdir, command: str, *, shared: bool = False) -> Iterator[None]:
    """Hold this workdir for ``command``: exclusively (one run of the stages at a time), or shared
    (scale-out workers, any number, but never beside an exclusive holder). Refuses at once, naming
    the holder, when the workdir is taken; released when the block ends or the process dies.
    Re-entrant within a process (a flow inside a command holding the lock)."""
    import fcntl

    path = workdir.locks / "workdir.lock"
    info = workdir.locks / "workdir.json"
    key = str(path)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            if held[0] == "shared" and not shared:
                raise WorkdirBusy(f"{command} needs {workdir.root} to itself, but this process holds it as a worker")
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            with _HELD_LOCK:
                held[1] -= 1
        return
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise WorkdirBusy(
            f"{workdir.root} is in use by {_holder(info)}: one run at a time per workdir. Wait for it to finish, "
            "or use another --workdir"
        ) from None
    if not shared:
        atomic_write_text(info, json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    with _HELD_LOCK:
        _HELD[key] = ["shared" if shared else "exclusive", 1, fh]
    try:
        yield
    finally:
        with _HELD_LOCK:
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                fh.close()  # closing the file releases the lock
