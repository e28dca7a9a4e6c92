"""What generation renders with: a base model and (normally) the LoRA trained for it.

The base model comes from the LoRA itself (its run folder's ``lora.json``, or the ``dermt2im``
entry in a weights file's header), not from the ``train`` section: the images must be rendered with
the model the LoRA was trained on, whatever the config says now. Rendering with the base model alone
is allowed only when asked for explicitly (``RenderModel.base_only``): its images are not lesions of
a class, and their rows carry no LoRA.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import sha256_file
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
        return cls(base_model, resolved_revision(base_model, revision) or revision, identity, token, None, base_config)

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


def find_latest_lora(workdir: Workdir) -> Path | None:
    """The newest finished LoRA run in W/lora (a folder with lora.json or diffusers weights)."""
    root = workdir.root / "lora"
    if not root.is_dir():
        return None
    runs = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        marker = d / lora_io.RUN_META if (d / lora_io.RUN_META).is_file() else d / lora_io.DIFFUSERS_WEIGHTS
        if marker.is_file():
            runs.append((marker.stat().st_mtime_ns, d.name, d))
    return max(runs)[2] if runs else None


def resolve_model(workdir: Workdir, lora: str | Path | None, *, base_model_only: bool = False,
                  base_model: str | None = None, revision: str | None = None, token: str = "sks",
                  base_config: str | None = None) -> RenderModel:
    """The model to render with: the LoRA given, else the newest trained in W/lora; with
    ``base_model_only``, ``base_model`` alone. No LoRA and no explicit request is an error: images
    from the base model alone are not lesions of a class."""
    if base_model_only:
        if lora is not None:
            raise GenerationError("choose either a LoRA or --base-model-only, not both")
        if not base_model:
            raise GenerationError("--base-model-only needs a base model (train.base_model)")
        log.warning("rendering with the base model %s alone, as asked: its images carry no LoRA", base_model)
        return RenderModel.base_only(base_model, revision, token, base_config)
    if lora is None:
        lora = find_latest_lora(workdir)
        if lora is None:
            raise GenerationError(
                f"no LoRA given and none trained in {workdir.root / 'lora'}: run `dermt2im train` first, pass "
                "--lora RUN_FOLDER, or --base-model-only to render with the base model alone"
            )
        log.info("using the newest LoRA run %s", lora)
    return RenderModel.from_lora(lora)
