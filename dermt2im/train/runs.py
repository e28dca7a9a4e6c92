"""Finished LoRA runs, and which one belongs to which train key.

A training run lands in ``W/lora/<run_id>/`` (``lora.json`` and the weights). ``run_id`` is the key's
first 12 hex digits unless ``dermt2im train --run-id NAME`` chose another name, so the folder alone
does not say which config a LoRA was trained for. Training therefore records, in
``W/lora/runs.json``, the run folder of every train key it has finished (or found finished):
``{"<train key>": "<run_id>", ...}``. Generation asks ``trained_for(workdir, key)`` for the LoRA of the
*current* config, never the newest folder on disk: train with A, then B, then A again, and the
third ``generate`` renders with A's LoRA.

Nothing here loads a model or imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermt2im.core.fileio import atomic_write_text, sha256_file
from dermt2im.core.specs import TrainConfig
from dermt2im.core.workdir import Workdir
from dermt2im.diffusion import lora_files as lora_io
from dermt2im.train.inputs import check_inputs, seeds_digest, train_key
from dermt2im.train.state import TrainingError

LOG = logging.getLogger(__name__)
RUNS_RECORD = "runs.json"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    lora_dir: Path
    weights: dict[str, Path]  # {"all": p} or {"benign": p, "malignant": p}
    sha256: dict[str, str]
    steps: int
    final_loss: float
    optimizer: str
    device: str
    cached: bool = False
    kohya: dict[str, Path] = field(default_factory=dict)
    cache_key: str = ""

    @property
    def lora_json(self) -> Path:
        return self.lora_dir / lora_io.RUN_META


def default_run_id(key: str) -> str:
    return key[:12]


def cached_result(lora_dir: Path, key: str) -> TrainResult | None:
    """The finished run in ``lora_dir`` when it was trained for ``key`` and every weights file still
    has its recorded sha256; None when there is none (or a file changed). A folder holding a run of
    other inputs is an error: it is never overwritten."""
    meta_path = lora_dir / lora_io.RUN_META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("cache_key") != key:
        raise TrainingError(
            f"{lora_dir} already holds a LoRA trained from other inputs (cache key {meta.get('cache_key', '?')[:12]}); "
            "choose another run_id or delete the folder"
        )
    weights = {k: lora_dir / v for k, v in meta["weights"].items()}
    kohya = {k: lora_dir / v for k, v in meta.get("kohya", {}).items()}
    for k, p in weights.items():
        if not p.is_file() or sha256_file(p) != meta["sha256"][k]:
            LOG.warning("cached LoRA %s is missing or changed: training again", p)
            return None
    return TrainResult(
        run_id=meta["run_id"], lora_dir=lora_dir, weights=weights, sha256=dict(meta["sha256"]), steps=int(meta["steps"]),
        final_loss=float(meta["final_loss"]), optimizer=meta["optimizer"], device=meta["device"], cached=True,
        kohya=kohya, cache_key=key,
    )


def result_summary(result: TrainResult) -> dict[str, Any]:
    """A small JSON-able dict of a result (paths as strings), for tasks and the CLI."""
    d = dataclasses.asdict(result)
    d["lora_dir"] = str(result.lora_dir)
    d["lora_json"] = str(result.lora_json)
    d["weights"] = {k: str(v) for k, v in result.weights.items()}
    d["kohya"] = {k: str(v) for k, v in result.kohya.items()}
    return d


# --------------------------------------------------------------------------------------------------
# which run belongs to which key


def _record_path(lora_root: Path) -> Path:
    return Path(lora_root) / RUNS_RECORD


def recorded_runs(lora_root: Path) -> dict[str, str]:
    """``W/lora/runs.json``: train key -> run folder name (empty when absent or unreadable)."""
    try:
        record = json.loads(_record_path(lora_root).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {str(k): str(v) for k, v in record.items() if isinstance(v, str) and v and "/" not in v and "\\" not in v}


def record_run(lora_root: Path, key: str, run_id: str) -> None:
    """Record that ``W/lora/<run_id>`` is the LoRA of train key ``key`` (one run of the stages at a
    time holds the workdir, so this read-modify-write has no rival)."""
    runs = recorded_runs(lora_root)
    if runs.get(key) == run_id:
        return
    runs[key] = run_id
    atomic_write_text(_record_path(lora_root), json.dumps(runs, indent=1, sort_keys=True))


def trained_for(lora_root: Path, key: str, run_id: str | None = None) -> TrainResult | None:
    """The intact LoRA trained for ``key``: in ``run_id``'s folder when one is named, else in the
    folder recorded for the key, else in the key's default folder (runs made before the record)."""
    if run_id is not None:
        return cached_result(Path(lora_root) / run_id, key)
    recorded = recorded_runs(lora_root).get(key)
    for name in dict.fromkeys([n for n in (recorded, default_run_id(key)) if n]):
        try:
            found = cached_result(Path(lora_root) / name, key)
        except TrainingError:  # the folder now holds another run: the record is stale
            continue
        if found is not None:
            return found
    return None


def base_identity(spec: TrainConfig) -> str:
    """The content identity of ``train.base_model`` (``dermt2im.diffusion.models``)."""
    from dermt2im.diffusion.models import base_model_identity

    try:
        return base_model_identity(spec.base_model, spec.revision, spec.base_config)
    except ValueError as err:
        raise TrainingError(f"train.base_model: {err}") from None


def current_key(workdir: Workdir, spec: TrainConfig) -> str:
    """The train key of ``spec`` on the workdir's current training seeds (no model is loaded)."""
    return train_key(seeds_digest(check_inputs(workdir)), spec, base_identity(spec))


def find_trained(workdir: Workdir, spec: TrainConfig, run_id: str | None = None) -> TrainResult | None:
    """The finished, intact LoRA for these inputs, if there is one (no model is loaded): in
    ``run_id``'s folder when one is named, else the run recorded for the key."""
    try:
        return trained_for(workdir.lora, current_key(workdir, spec), run_id)
    except (TrainingError, ValueError, OSError, KeyError):
        return None
