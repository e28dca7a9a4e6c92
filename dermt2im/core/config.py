"""One typed configuration for the whole factory, loaded from the YAML presets in ``dermt2im/presets/``.

A config has two kinds of sections:

* **what to make** (``dermt2im.core.specs``): ``phantoms``, ``ingest``, ``preprocess``, ``train``,
  ``generate``, ``quality``, ``validate``, ``fidelity``. Every field changes a stage's output and is hashed into
  that stage's keys;
* **how to run** (``dermt2im.core.runtime``): ``runtime.<stage>`` (devices, batch sizes, workers),
  ``storage`` (where manifests and images live), ``tracking`` (MLflow) and ``scale`` (a Ray
  cluster to render and validate on). Never hashed.

``orchestration`` holds the Prefect deployment settings; the domain never reads it, and
``dermt2im.flows.settings`` validates it (strictly) where it is used.

Every model is frozen and strict: an unknown key or a wrong type is an error that names the key and
the file it came from. ``load_config`` applies ``--set key.path=value`` overrides from the CLI on top
of the file before validation, so they are checked the same way. Keys that moved when runtime
settings left the stage sections (``generate.batch_size`` -> ``runtime.generate.batch_size``, ...)
are still read, with a warning naming the new key (``LEGACY_KEYS``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from dermt2im.core import yamltext
from dermt2im.core.errors import ConfigError
from dermt2im.core.runtime import RuntimeConfig, ScaleConfig, StorageConfig, TrackingConfig
from dermt2im.core.specs import (
    FidelityConfig,
    GenerateConfig,
    IngestConfig,
    PhantomConfig,
    PreprocessConfig,
    QualityConfig,
    Strict,
    TrainConfig,
    ValidateConfig,
)

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "presets"

# Old key -> new key: settings that say how to run moved out of the stage sections.
LEGACY_KEYS: dict[str, str] = {
    "preprocess.workers": "runtime.preprocess.workers",
    "train.device": "runtime.train.device",
    "train.gradient_checkpointing": "runtime.train.gradient_checkpointing",
    "train.checkpoint_every": "runtime.train.checkpoint_every",
    "train.checkpoints_keep": "runtime.train.checkpoints_keep",
    "generate.device": "runtime.generate.device",
    "generate.dtype": "runtime.generate.dtype",
    "generate.batch_size": "runtime.generate.batch_size",
    "generate.writer_threads": "runtime.generate.writer_threads",
    "generate.image_store": "storage.images",
    "generate.parallel_workers": "orchestration.parallel_workers",
    "generate.worker_deployment": "orchestration.worker_deployment",
    "validate.device": "runtime.validate.device",
}

# Keys that no longer mean anything: dropped with a warning, so that a saved W/config.yaml still loads.
RETIRED_KEYS: dict[str, str] = {
    "runtime.generate.lease_seconds": "shard leases are gone: scale out with scale.ray_address or dermt2im worker "
                                      "--shard-index/--num-shards",
    "generate.lease_seconds": "shard leases are gone: scale out with scale.ray_address or dermt2im worker "
                              "--shard-index/--num-shards",
}


class FactoryConfig(Strict):
    # YAML key `validate`; the attribute is `validation` because BaseModel.validate exists.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)

    name: str = "derm-t2im"
    phantoms: PhantomConfig = PhantomConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    quality: QualityConfig = QualityConfig()
    validation: ValidateConfig = Field(ValidateConfig(), alias="validate")
    fidelity: FidelityConfig = FidelityConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    scale: ScaleConfig = ScaleConfig()
    orchestration: dict[str, Any] = Field(
        default_factory=dict, description="Prefect deployment settings, validated by dermt2im.flows.settings"
    )

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\"):
            raise ValueError("name must be non-empty and contain no path separators")
        return v

    def as_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _move_legacy(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with keys that moved (``LEGACY_KEYS``) put where they live now and retired keys
    (``RETIRED_KEYS``) dropped, each with a warning."""
    for old, why in RETIRED_KEYS.items():
        *parents, leaf = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node.pop(leaf)
            log.warning("%s: %s is no longer used and was ignored (%s)", source, old, why)
    for old, new in LEGACY_KEYS.items():
        section, key = old.split(".")
        node = data.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        *parents, leaf = new.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
        log.warning("%s: %s is now %s (how to run, not what to make); please update it", source, old, new)
    return data


def resolve_config_path(name_or_path: str | Path) -> Path:
    """``smoke`` -> dermt2im/presets/smoke.yaml; anything with a suffix or separator is a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"no preset named {name_or_path!r}; presets: {', '.join(presets) or 'none found'}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        return keys, yamltext.load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = _deep_copy(data)
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def format_errors(err: ValidationError, source: str, section: str = "") -> str:
    """A pydantic ``ValidationError`` as the one message every config error gives: where the values
    came from, then one line per problem naming its key (``section.key: unknown key``, or the rule
    it breaks and the value given). The one formatter of the project's settings models."""
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in ([section] if section else []) + list(e["loc"])) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> FactoryConfig:
    merged = _move_legacy(apply_overrides(_move_legacy(_deep_copy(data), source), overrides), "--set")
    try:
        return FactoryConfig.model_validate(merged)
    except ValidationError as err:
        where = source if not overrides else f"{source} (with overrides {overrides})"
        raise ConfigError(format_errors(err, where)) from None


def load_config(name_or_path: str | Path = "smoke", overrides: list[str] | None = None) -> FactoryConfig:
    path = resolve_config_path(name_or_path)
    try:
        data = yamltext.load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, str(path), overrides)
