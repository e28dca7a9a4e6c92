"""What generation renders with: a base model and (normally) the LoRA trained for it.

The base model comes from the LoRA itself (its run folder's ``lora.json``, or the ``dermt2im``
entry in a weights file's header), not from the ``train`` section: the images must be rendered with
the model the LoRA was trained on, whatever the config says now. Rendering with the base model alone
is allowed only when asked for explicitly (``RenderModel.base_only``): its images are not lesions of
a class, and their rows carry no LoRA.

Which LoRA: the one given (``--lora``), else the one trained for the current config's ``train``
section on the current seeds (``resolve_model``), never merely the newest folder in ``W/lora``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import sha256_file
from dermt2im.core.specs import TrainConfig
from dermt2im.core.workdir import Workdir
from dermt2im.diffusion import lora_files as lora_io

log = logging.getLogger(__name__)


class GenerationError(DermT2imError, RuntimeError):
    """Generation cannot proceed (no plan rows, unusable LoRA, ...), worded for the user."""


@dataclass(frozen=True)
class LoraChoice:
    weights: Path | None
    sha256: str | None


@dataclass(frozen=True)
class RenderModel:
    """The base model (as named, its revision and its content identity), the instance token its
    prompts use, and the LoRA (a run folder or a weights file; None: the base model alone)."""

    base_model: str
    revision: str | None
    identity: str
    token: str
    lora: Path | None
    base_config: str | None = None  # a single-file base model's local config folder (train.base_config)
    chosen: str = field(default="", compare=False)  # why this LoRA, in words ("given with --lora", ...)

    @classmethod
    def from_lora(cls, lora: str | Path) -> "RenderModel":
        path = Path(lora).expanduser()
        if not path.exists():
            raise GenerationError(f"LoRA {path} not found")
        path = path.resolve()
        meta = _lora_meta(path)
        missing = [k for k in ("base_model", "base_model_identity") if not meta.get(k)]
        if missing:
            raise GenerationError(
                f"LoRA {path} does not say which base model it was trained on (no {RUN_META_NAME} or dermt2im "
                f"header with {', '.join(missing)}): train it with `dermt2im train`, or use a run folder"
            )
        token = meta.get("instance_token") or (meta.get("config") or {}).get("instance_token") or "sks"
        # the hub commit training resolved its revision to, where the cache knew it: the same weights
        revision = meta.get("resolved_revision") or meta.get("revision")
        return cls(meta["base_model"], revision, meta["base_model_identity"], token, path, meta.get("base_config"))

    @classmethod
    def base_only(cls, base_model: str, revision: str | None = None, token: str = "sks",
                  base_config: str | None = None) -> "RenderModel":
        from dermt2im.diffusion.models import base_model_identity, resolved_revision

        try:
            identity = base_model_identity(base_model, revision, base_config)
        except ValueError as err:
            raise GenerationError(f"base model: {err}") from None
        return cls(base_model, resolved_revision(base_model, revision) or revision, identity, token, None, base_config,
                   "none: the base model alone, as asked")

    def describe(self) -> str:
        """The LoRA in words, with why it was chosen (what generate prints)."""
        if self.lora is None:
            return f"none (the base model {self.base_model} alone)"
        return f"{self.lora}" + (f" ({self.chosen})" if self.chosen else "")

    def for_label(self, label: str) -> LoraChoice:
        """The weights file (and its sha256) to fuse for ``label``."""
        if self.lora is None:
            return LoraChoice(None, None)
        try:
            weights = lora_io.lora_weights_for(self.lora, label).resolve()
        except lora_io.LoraError as err:
            raise GenerationError(str(err)) from None
        st = weights.stat()
        return LoraChoice(weights, _sha_cached(str(weights), st.st_size, st.st_mtime_ns))


RUN_META_NAME = lora_io.RUN_META


def _lora_meta(path: Path) -> dict:
    if path.is_dir():
        if (path / lora_io.RUN_META).is_file():
            return lora_io.read_run_meta(path)
        path = next((p for p in (path / lora_io.DIFFUSERS_WEIGHTS, *path.glob(f"*/{lora_io.DIFFUSERS_WEIGHTS}"))
                     if p.is_file()), path)
    if path.is_file() and path.suffix == ".safetensors":
        try:
            return lora_io.read_dermt2im_metadata(path)
        except Exception:  # noqa: BLE001 - a foreign or damaged header: the caller names what is missing
            return {}
    return {}


@functools.lru_cache(maxsize=64)
def _sha_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def resolve_model(workdir: Workdir, lora: str | Path | None, *, train: TrainConfig,
                  base_model_only: bool = False) -> RenderModel:
    """The model to render with, and why (``RenderModel.chosen``): the LoRA given (``--lora``), else
    the LoRA trained for the current ``train`` section on the workdir's current seeds (the run that
    training recorded for that train key, ``dermt2im.train.runs``: never merely the newest on disk);
    with ``base_model_only``, ``train.base_model`` alone. No LoRA and no explicit request is an
    error: images from the base model alone are not lesions of a class."""
    if base_model_only:
        if lora is not None:
            raise GenerationError("choose either a LoRA or --base-model-only, not both")
        if not train.base_model:
            raise GenerationError("--base-model-only needs a base model (train.base_model)")
        log.warning("rendering with the base model %s alone, as asked: its images carry no LoRA", train.base_model)
        return RenderModel.base_only(train.base_model, train.revision, train.instance_token, train.base_config)
    if lora is not None:
        return dataclasses.replace(RenderModel.from_lora(lora), chosen="given with --lora")
    from dermt2im.train.runs import current_key, find_trained
    from dermt2im.train.state import TrainingError

    what_to_do = ("run `dermt2im train` first, pass --lora RUN_FOLDER, or --base-model-only to render with the base "
                  "model alone")
    try:
        key = current_key(workdir, train)
    except (TrainingError, ValueError, OSError) as err:
        raise GenerationError(f"no LoRA trained for the current config: its train key needs the training seeds "
                              f"({err}); {what_to_do}") from None
    found = find_trained(workdir, train)
    if found is None:
        raise GenerationError(f"no LoRA trained for the current config (train key {key[:12]}) in {workdir.lora}: "
                              f"{what_to_do}")
    model = RenderModel.from_lora(found.lora_dir)
    return dataclasses.replace(model, chosen=f"trained for the current config, train key {key[:12]}")
