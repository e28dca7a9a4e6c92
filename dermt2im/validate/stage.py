"""Validation of the synthetic data: {ViT, MobileNetV2} x regimes x seeds, tracked in MLflow.

Where things are: ``inputs`` (real splits, usable synthetic images, test sets, the leakage check),
``regimes`` (which images each regime trains on), ``plan`` (cells, keys, the MLflow parent run),
``classify`` (models, fit, predict), ``cell`` (one cell: fit, test, log), ``metrics`` (metrics,
McNemar), ``bootstrap`` (intervals over test images), ``table``, ``table_text`` and ``figures``
(Table IV and Fig. 10, rebuilt from MLflow alone), ``segmentation`` (the SAM check).

``ValidateStage`` is the stage: ``units()`` loads and checks the inputs and opens (or resumes) the
comparison's parent run; one unit per cell, done when a finished child run of the same cell key
exists under that parent; ``close`` closes the parent and writes Table IV from MLflow.

- No usable synthetic images: regimes that need them are skipped (reason logged on the parent run
  and shown in the report) and the baseline still runs; if nothing is left to run, a
  ``ValidationError`` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermt2im.core.runtime import TrackingConfig, ValidateRuntime
from dermt2im.core.specs import ValidateConfig
from dermt2im.core.tracking import Tracker, open_tracker
from dermt2im.core.workdir import Workdir
from dermt2im.validate.cell import CellResult, reuse_cell, run_cell
from dermt2im.validate.inputs import ValidationError
from dermt2im.validate.plan import Cell, ValidationPlan, cell_key, prepare

log = logging.getLogger(__name__)

__all__ = ["ValidateStage", "ValidationError", "ValidationReport"]


@dataclass(frozen=True)
class ValidationReport:
    parent_run_id: str
    experiment: str
    runs: int
    table_path: Path | None
    skipped: dict[str, str] = field(default_factory=dict)
    verdict: str = ""
    reused: int = 0

    def summary(self) -> str:
        lines = [f"comparison run {self.parent_run_id} in MLflow experiment {self.experiment!r}: "
                 f"{self.runs} child runs ({self.reused} reused from an earlier identical run)"]
        for name, why in sorted(self.skipped.items()):
            lines.append(f"skipped regime {name}: {why}")
        if self.table_path is not None:
            lines.append(f"Table IV: {self.table_path}")
        if self.verdict:
            lines.append(self.verdict)
        return "\n".join(lines)


class ValidateStage:
    """Validate: one unit per (model, regime, seed) cell of the comparison."""

    name = "validate"
    unit_noun = "cells"

    def __init__(self, workdir: Workdir, spec: ValidateConfig, runtime: ValidateRuntime, tracking: TrackingConfig, *,
                 test_sets: dict[str, str | Path] | None = None, log_model: bool = True, resume: bool = True,
                 build_table: bool = True, batch_size: int | None = None) -> None:
        self.workdir, self.spec, self.runtime, self.tracking = workdir, spec, runtime, tracking
        self.test_sets, self.log_model, self.resume = test_sets, log_model, resume
        self.build_table, self.batch_size = build_table, batch_size
        self._plan: ValidationPlan | None = None
        self._tracker: Tracker | None = None
        self.report: ValidationReport | None = None  # set by close()

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any, **kw: Any) -> "ValidateStage":
        """The stage as a factory config (``dermt2im.core.config.FactoryConfig``) sets it up."""
        return cls(workdir, cfg.validation, cfg.runtime.validation, cfg.tracking, **kw)

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to another process (a Ray task running one cell) opens a tracker of its own:
        # a tracker's client belongs to the process that made it.
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = open_tracker(self.workdir, self.tracking)
        return self._tracker

    @property
    def plan(self) -> ValidationPlan:
        if self._plan is None:
            self._plan = prepare(self.workdir, self.spec, self.tracker, self.test_sets, resume=self.resume)
            for name, why in sorted(self._plan.skipped.items()):
                log.warning("regime %s skipped: %s", name, why)
        return self._plan

    def units(self) -> list[Cell]:
        return list(self.plan.cells)

    def describe(self, cell: Cell) -> str:
        return f"validate {cell.model} {cell.regime} seed {cell.seed}"

    def key(self, cell: Cell) -> str:
        return cell_key(self.spec, self.plan.inputs, cell)

    def finished(self, cell: Cell) -> dict[str, Any] | None:
        found = reuse_cell(self.tracker, self.plan, cell, self.key(cell))
        return found.summary() if found is not None else None

    def run(self, cell: Cell) -> dict[str, Any]:
        from dermt2im.validate.classify import resolve_device

        result = run_cell(self.tracker, self.plan, cell, self.key(cell), self.spec,
                          resolve_device(self.runtime.device), seeds_manifest=str(self.workdir.seeds_manifest),
                          log_model=self.log_model, batch_size=self.batch_size)
        return result.summary()

    def close(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        cells = [CellResult.from_summary(r) for r in results]
        self.tracker.finish(self.plan.parent_run_id)  # the report's statistics come from MLflow alone
        table_path, verdict, paths = None, "", {}
        if self.build_table:
            from dermt2im.validate.table import build_report

            paths = build_report(self.workdir, self.tracking, parent_run_id=self.plan.parent_run_id)
            table_path = paths.get("table_md")
            verdict_file = paths.get("verdict")
            verdict = verdict_file.read_text().strip() if verdict_file and verdict_file.is_file() else ""
        report = ValidationReport(self.plan.parent_run_id, self.plan.experiment, len(cells), table_path,
                                  dict(self.plan.skipped), verdict, sum(c.reused for c in cells))
        self.report = report
        return {"parent_run_id": report.parent_run_id, "experiment": report.experiment,
                "experiment_id": self.plan.experiment_id, "runs": report.runs,
                "reused": report.reused, "skipped": report.skipped,
                "table_md": str(table_path) if table_path else None, "report": {k: str(v) for k, v in paths.items()},
                "text": report.summary()}
