"""Validation of the synthetic data: {ViT, MobileNetV2} x regimes x seeds, tracked in MLflow.

Where things are: ``inputs`` (real splits, usable synthetic images, test sets, the leakage check),
``regimes`` (which images each regime trains on), ``plan`` (cells, keys, the MLflow parent run),
``classify`` (models, fit, predict), ``cell`` (one cell: fit, test, log), ``metrics`` (metrics,
McNemar), ``bootstrap`` (intervals over test images), ``table``, ``table_text`` and ``figures``
(Table IV and Fig. 10, rebuilt from MLflow alone), ``segmentation`` (the SAM check).

``ValidateStage`` is the stage: ``units()`` loads and checks the inputs (no tracking store is
opened for that); one unit per cell, done when its stamp holds the cell's key; a cell that runs does
so in a child run of the comparison's parent run (opened, or resumed by the comparison's key);
``close`` closes the parent and writes Table IV from MLflow.

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
from dermt2im.core.tracking import Tracker, open_tracker, tracking_uri
from dermt2im.core.workdir import Workdir
from dermt2im.stage import Stamps
from dermt2im.validate.cell import CellResult, run_cell
from dermt2im.validate.inputs import ValidationError
from dermt2im.validate.plan import Cell, Comparison, ValidationPlan, cell_key, open_parent_run, plan_comparison

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
    """Validate: one unit per (model, regime, seed) cell of the comparison.

    The cells and their keys come from the manifests alone (``plan.plan_comparison``); the MLflow
    parent run is opened only when a cell runs or the stage closes. A cell is done when its stamp
    (``W/.stamps/validate/<cell key>.json``) holds its summary: metrics, per-image predictions and the
    MLflow runs it was recorded in. Its key holds the comparison's key and the tracking store, so a
    finished cell is found again only for the same comparison in the same store, whose parent run
    ``close`` resumes to rebuild Table IV from MLflow."""

    name = "validate"
    unit_noun = "cells"
    scalable = True  # with scale.ray_address every cell runs as a Ray task

    def __init__(self, workdir: Workdir, spec: ValidateConfig, runtime: ValidateRuntime, tracking: TrackingConfig, *,
                 test_sets: dict[str, str | Path] | None = None, log_model: bool = True, resume: bool = True,
                 build_table: bool = True, batch_size: int | None = None) -> None:
        self.workdir, self.spec, self.runtime, self.tracking = workdir, spec, runtime, tracking
        self.test_sets, self.log_model, self.resume = test_sets, log_model, resume
        self.build_table, self.batch_size = build_table, batch_size
        self.stamps = Stamps(workdir.stamps, self.name)
        self._comparison: Comparison | None = None
        self._plan: ValidationPlan | None = None
        self._tracker: Tracker | None = None
        self.report: ValidationReport | None = None  # set by close()

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any, *, test_sets: dict[str, str | Path] | None = None,
           log_model: bool = True) -> "ValidateStage":
        """The stage as a factory config (``dermt2im.core.config.FactoryConfig``) sets it up.
        ``test_sets``: name -> ingested test-set manifest; None: every one in the workdir."""
        return cls(workdir, cfg.validation, cfg.runtime.validation, cfg.tracking, test_sets=test_sets,
                   log_model=log_model)

    @property
    def tags(self) -> tuple[str, ...]:
        return ("gpu" if self.runtime.device != "cpu" else "cpu", "validate")

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to another process (a Ray task running one cell) runs its cell under the parent
        # run this process opened, and opens a tracker of its own: a client belongs to its process.
        _ = self.plan
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = open_tracker(self.workdir, self.tracking)
        return self._tracker

    @property
    def comparison(self) -> Comparison:
        """The cells and the comparison's key, from the manifests alone (no tracking store)."""
        if self._comparison is None:
            self._comparison = plan_comparison(self.workdir, self.spec, self.test_sets)
        return self._comparison

    @property
    def plan(self) -> ValidationPlan:
        """The comparison with its MLflow parent run opened (or resumed)."""
        if self._plan is None:
            self._plan = open_parent_run(self.workdir, self.spec, self.tracker, self.comparison, resume=self.resume)
        return self._plan

    def units(self) -> list[Cell]:
        return list(self.comparison.cells)

    def describe(self, cell: Cell) -> str:
        return f"validate {cell.model} {cell.regime} seed {cell.seed}"

    def key(self, cell: Cell) -> str:
        c = self.comparison
        return cell_key(self.spec, c.inputs, cell, c.comparison_key, tracking_uri(self.workdir, self.tracking))

    def finished(self, cell: Cell, key: str) -> dict[str, Any] | None:
        found = self.stamps.matching(key, key)
        return {**found, "reused": True} if found is not None else None

    def run(self, cell: Cell, key: str) -> dict[str, Any]:
        from dermt2im.validate.classify import resolve_device

        result = run_cell(self.tracker, self.plan, cell, key, self.spec, resolve_device(self.runtime.device),
                          seeds_manifest=str(self.workdir.seeds_manifest), log_model=self.log_model,
                          batch_size=self.batch_size)
        summary = {**result.summary(), "parent_run_id": self.plan.parent_run_id}
        self.stamps.write(key, key, summary)
        return summary

    def close(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        cells = [CellResult.from_summary(r) for r in results]
        lost = sorted({r.get("parent_run_id") for r in results} - {self.plan.parent_run_id, None})
        if lost:
            raise ValidationError(
                f"the finished cells recorded in {self.stamps.root / self.name} belong to MLflow comparison run(s) "
                f"{', '.join(lost)}, which the tracking store {tracking_uri(self.workdir, self.tracking)} no longer "
                f"holds: delete {self.stamps.root / self.name} to train them again")
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
