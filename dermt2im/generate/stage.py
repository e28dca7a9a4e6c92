"""Synthetic dermoscopy generation: plan -> shards rendered in batches -> PNGs + synthetic.parquet.

* The plan (``plan``) fixes every sample before anything is rendered: prompt, smart transformation,
  sampler, steps, CFG, LoRA scale, seed and size, grouped into shards of one class each.
* What to render with (``model``): the base model the LoRA was trained on, read from the LoRA.
* The pipeline (``pipeline``) is loaded once per process with the LoRA fused at its scale;
  switching sampler swaps a cached scheduler (``samplers``).
* A shard (``shards``) renders idempotently: what is on disk and recorded is skipped, a PNG written
  before a crash is adopted, the rest is rendered; every PNG carries its parameters (``pngmeta``).
* Manifests and images may live on any fsspec filesystem (``storage.manifests``, ``storage.images``);
  on an object store each writer appends its rows as parts, folded in by ``close`` (and after each
  shard, so that the parts stay few).

``GenerateStage`` is the stage: ``units()`` makes or extends the plan (under a lock, so that many
workers may start at once) and returns its shards, one class after the other (with per-class LoRAs
the fused pipeline then changes once); ``warm()`` loads the pipeline ahead of the first shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from dermt2im.core.manifest import PLAN, SYNTHETIC, read_manifest
from dermt2im.core.runtime import GenerateRuntime
from dermt2im.core.specs import LABELS, GenerateConfig, TrainConfig
from dermt2im.core.workdir import Workdir
from dermt2im.core.writers import compact, writer_lock
from dermt2im.generate import pipeline, shards
from dermt2im.generate.model import GenerationError, RenderModel, resolve_model
from dermt2im.generate.plan import shards_of, update_plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateReport:
    plan_path: Path | str
    manifest_path: Path | str
    planned: int
    rendered: int
    skipped: int
    seconds: float
    lora: str | None = None
    shards: tuple[int, ...] = field(default_factory=tuple)
    lora_text: str = ""  # the LoRA and why it was chosen (``RenderModel.describe``)

    def summary(self) -> str:
        rate = f", {self.rendered / self.seconds:.2f} images/s" if self.rendered and self.seconds > 0 else ""
        return (
            f"generate: {self.planned} planned in {len(self.shards)} shard(s), {self.rendered} rendered, "
            f"{self.skipped} already done ({self.seconds:.1f} s{rate})\n"
            f"  LoRA: {self.lora_text or self.lora or 'none (base model alone)'}\n"
            f"  plan: {self.plan_path}\n  manifest: {self.manifest_path}"
        )


class RenderListener(Protocol):
    """What a stage after rendering may want to know while it goes on (``GenerateStage.listen``)."""

    # this process is about to render, keeping ``cores`` of the host's cores busy
    def rendering(self, cores: int) -> None: ...

    def rendered(self, rows: Sequence[dict]) -> None: ...  # these images are written (rows with sample_key, path)


def shard_order(shard_ids: Sequence[int]) -> list[int]:
    """Shards one class after the other (shard ids interleave the classes, see ``plan.shard_of``)."""
    return sorted(shard_ids, key=lambda s: (s % len(LABELS), s))


class GenerateStage:
    """Generate: one unit per shard of the plan; a shard is done when every image of it is recorded
    under its current render key and its file exists."""

    name = "generate"
    unit_noun = "shards"
    tags = ("gpu",)  # its task runs count against Prefect's `gpu` concurrency limit
    scalable = True  # with scale.ray_address its shards render on renderer actors of a Ray cluster

    def __init__(self, workdir: Workdir, spec: GenerateConfig, runtime: GenerateRuntime,
                 model: RenderModel | None = None, *, train: TrainConfig | None = None, lora: str | Path | None = None,
                 base_model_only: bool = False, per_class: int | None = None, shards: Sequence[int] | None = None,
                 pipe: Any = None) -> None:
        self.workdir, self.spec, self.runtime = workdir, spec, runtime
        self._model, self._choice = model, (train, lora, base_model_only)
        self.per_class, self.only, self.pipe = per_class, list(shards or []), pipe
        self._plan: pd.DataFrame | None = None
        self._planned_elsewhere = False
        self.listeners: list[RenderListener] = []
        self._t0 = time.perf_counter()

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any, *, lora: str | Path | None = None, base_model_only: bool = False,
           per_class: int | None = None, shards: Sequence[int] | None = None) -> "GenerateStage":
        """The stage as a factory config sets it up: it renders with the LoRA trained for ``cfg.train``
        (looked up when the stage first needs it, so the stage can be built before training runs),
        or with ``lora`` when given, or with the base model alone when ``base_model_only``."""
        return cls(workdir, cfg.generate, cfg.runtime.generate, train=cfg.train, lora=lora,
                   base_model_only=base_model_only, per_class=per_class, shards=shards)

    @property
    def model(self) -> RenderModel:
        """What this stage renders with (``model.resolve_model``), resolved once."""
        if self._model is None:
            train, lora, base_model_only = self._choice
            if train is None:
                raise GenerationError("GenerateStage needs a model or the train section that names its LoRA")
            self._model = resolve_model(self.workdir, lora, train=train, base_model_only=base_model_only)
        return self._model

    def plan(self) -> pd.DataFrame:
        """Make or extend the plan (once per stage object), under the plan's writer lock; a copy
        of a stage that has planned only reads it."""
        if self._plan is None:
            w = self.workdir
            if self._planned_elsewhere:
                self._plan = read_manifest(w.plan_manifest, PLAN)
            else:
                with writer_lock(w.plan_manifest, w.locks):
                    self._plan = update_plan(w.plan_manifest, self.spec, token=self.model.token,
                                             per_class=self.per_class)
        return self._plan

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to another process (a Ray renderer) reads the plan this stage made rather than
        # carrying it, and loads a pipeline of its own.
        # Listeners stay here too: a renderer elsewhere leaves the measuring to the gate.
        return {**self.__dict__, "_plan": None, "pipe": None, "listeners": [],
                "_planned_elsewhere": self._planned_elsewhere or self._plan is not None}

    def units(self) -> list[int]:
        log.info("generate: LoRA %s", self.model.describe())
        planned = shards_of(self.plan())
        chosen = planned if not self.only else sorted({int(s) for s in self.only})
        unknown = sorted(set(chosen) - set(planned))
        if unknown:
            raise GenerationError(f"shard(s) {unknown} not in the plan (0..{max(planned)})")
        return shard_order(chosen)

    def describe(self, shard: int) -> str:
        return f"render shard {shard} ({LABELS[shard % len(LABELS)]})"

    def key(self, shard: int) -> str:
        """The shard's key: the render key of every image it plans (parameters, base model, LoRA, code)
        and where the images and rows go."""
        return shards.expected_key(self.workdir, self.model, shard, self.plan())

    def finished(self, shard: int, key: str) -> dict[str, Any] | None:
        """Done when what is recorded (every planned image with its sha256 and file) has ``key``."""
        if shards.recorded_key(self.workdir, shard, self.plan()) != key:
            return None
        return {"shard": int(shard), "rendered": 0, "images": int((self.plan()["shard"] == shard).sum())}

    def warm(self) -> None:
        """Load the pipeline this process renders with, LoRA fused, before the first shard: a
        long-lived renderer (``dermt2im.runners.ray_workers``) pays the load once, not per shard."""
        units = self.units()
        if units:
            first = shards.shard_rows(self.workdir, units[0], self.plan()).iloc[0]
            pipeline.prepared_pipeline(self.model, self.runtime, self.model.for_label(first["label"]),
                                       first["lora_scale"], pipe=self.pipe)

    def listen(self, listener: "RenderListener") -> None:
        """Tell ``listener`` when this process starts rendering and of each batch as soon as it is
        written (the quality gate measures them meanwhile: ``pipelines.generate``)."""
        self.listeners.append(listener)

    def _written(self, rows: list[dict]) -> None:
        for listener in self.listeners:
            listener.rendered(rows)

    def renderer_cores(self) -> int:
        """The host's cores rendering keeps busy: one on a GPU (the process feeding it), torch's
        threads on a CPU (``OMP_NUM_THREADS``, else every core)."""
        from dermt2im.core.loading import first_import

        with first_import("torch"):  # before the first shard, usually
            import torch

            from dermt2im.diffusion.models import resolve_device

            device = self.pipe.device.type if self.pipe is not None else resolve_device(self.runtime.device)
        return 1 if str(device).startswith("cuda") else torch.get_num_threads()

    def run(self, shard: int, key: str) -> dict[str, Any]:
        if self.listeners:
            cores = self.renderer_cores()
            for listener in self.listeners:
                listener.rendering(cores)
        recorded = shards.render_shard(self.workdir, self.runtime, self.model, shard, pipe=self.pipe,
                                       on_written=self._written if self.listeners else None)
        if self.workdir.manifests_are_remote:  # keep the appended parts few, so every read stays cheap
            self.fold_parts()
        return {"shard": int(shard), "rendered": len(recorded), "images": int((self.plan()["shard"] == shard).sum())}

    def fold_parts(self) -> int:
        """Fold rows appended as parts (object stores) into the synthetic manifest."""
        return compact(self.workdir.synthetic_manifest, SYNTHETIC, self.workdir.locks)

    def close(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        folded = self.fold_parts()
        if folded:
            log.info("folded %d appended manifest part(s) into %s", folded, self.workdir.synthetic_manifest)
        planned = int(sum(r["images"] for r in results))
        rendered = int(sum(r["rendered"] for r in results))
        report = GenerateReport(self.workdir.plan_manifest, self.workdir.synthetic_manifest, planned, rendered,
                                planned - rendered, time.perf_counter() - self._t0,
                                str(self.model.lora) if self.model.lora else None,
                                tuple(int(r["shard"]) for r in results), self.model.describe())
        return {"plan": str(report.plan_path), "planned": planned, "rendered": rendered, "shards": list(report.shards),
                "lora": report.lora, "lora_chosen": self.model.chosen, "synthetic": str(report.manifest_path),
                "text": report.summary()}


__all__ = ["GenerateReport", "GenerateStage", "GenerationError", "RenderModel", "pipeline", "shard_order"]
