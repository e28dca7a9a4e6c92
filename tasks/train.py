"""Prefect task for DreamBooth + LoRA training (tag ``gpu``).

Cache key: the workdir, the content digest of the training seeds (rows that matter + processed
file sha256s), the ``train`` config section, the base model's identity and the trainer's code. A
cached result only says the LoRA was made: ``flows.train`` checks ``lora.json`` and the weights'
sha256 first and passes ``refresh_cache=True`` when they are gone. Retries are for transient faults
only (I/O, network); bad input and training failures (``TrainingError``, NaN, config) fail at once.
A retry resumes from the newest checkpoint, since the same inputs map to the same run folder.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from dermt2im.train import stage as training
from dermt2im.core.config import FactoryConfig
from dermt2im.diffusion.models import base_model_identity
from dermt2im.core.workdir import Workdir
from tasks.caching import content_key, retry_transient_only, source_of


def train_cache_key(workdir: str | Path, cfg: FactoryConfig) -> str:
    w = Workdir.of(workdir, cfg)
    key = training.cache_key(training.seeds_digest(w), cfg, base_model_identity(cfg.train.base_model, cfg.train.revision))
    return content_key("train-lora", str(w.root), key, source_of(training.train_lora))


def _key(context, p) -> str | None:
    try:
        return train_cache_key(p["workdir"], p["cfg"])
    except Exception:  # noqa: BLE001 - no key, no caching: the task runs and raises the real error
        return None


class _Progress:
    """Logs about twenty lines per training and keeps a progress artifact up to date."""

    def __init__(self) -> None:
        self.log = get_run_logger()
        self.artifact = None
        self.every = 1

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self.artifact is None:
            self.every = max(1, total // 20)
            self.artifact = create_progress_artifact(progress=0.0, key="train-lora-progress",
                                                     description="LoRA training steps done")
        if step % self.every == 0 or step == total:
            self.log.info("step %d/%d loss %.4f", step, total, loss)
            update_progress_artifact(artifact_id=self.artifact, progress=100.0 * step / max(1, total))


def _summary(r: training.TrainResult) -> str:
    lines = [f"### LoRA `{r.run_id}`{' (cached)' if r.cached else ''}", "",
             f"- folder: `{r.lora_dir}`", f"- steps: {r.steps}, final loss {r.final_loss:.4f}",
             f"- optimizer: {r.optimizer} on {r.device}", "", "| LoRA | weights | sha256 |", "|---|---|---|"]
    lines += [f"| {k} | `{p}` | `{r.sha256[k][:16]}…` |" for k, p in r.weights.items()]
    return "\n".join(lines) + "\n"


@task(name="train_lora", tags=["gpu"], cache_key_fn=_key, persist_result=True, result_serializer="json",
      retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_only)
def train_lora_task(workdir: str, cfg: FactoryConfig, resume: str | None = "latest") -> dict:
    """Train (or resume, or find already trained) the LoRA for this workdir; returns paths and digests."""
    result = training.train_lora(Workdir.of(workdir, cfg), cfg, resume=resume, progress=_Progress())
    create_markdown_artifact(key=f"lora-{result.run_id}", markdown=_summary(result),
                             description="DreamBooth-LoRA training result")
    return training.result_summary(result)
