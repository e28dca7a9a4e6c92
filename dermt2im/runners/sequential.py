"""The CLI's runner: the runner core (``dermt2im.runners.core``) in this process.

Units run one after the other; with ``workers`` > 1 (a stage whose ``run`` executes elsewhere, on a
Ray cluster: ``dermt2im.runners.scaling``) that many run at once, each in a thread that waits for
its result. ``run_pipeline`` runs a pipeline's stages (``dermt2im.pipelines``) one after the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dermt2im.core.runtime import ScaleConfig
from dermt2im.runners.core import StageRun, UnitResult
from dermt2im.runners.core import run_stage as _core_run_stage
from dermt2im.stage import Stage

__all__ = ["StageRun", "UnitResult", "run_pipeline", "run_stage"]


def run_stage(stage: Stage, *, on_unit: Callable[[int, int, UnitResult], None] | None = None,
              workers: int = 1) -> StageRun:
    """Run every unit of ``stage`` that is not up to date (``workers`` at a time), then close it;
    ``on_unit(i, n, result)`` after each, in the order they end."""
    return _core_run_stage(stage, on_unit=on_unit, concurrency=workers)


def run_pipeline(stages: Sequence[Stage], scale: ScaleConfig | None = None, *,
                 on_unit: Callable[[int, int, UnitResult], None] | None = None) -> dict[str, StageRun]:
    """Every stage in order, in this process; a stage that can scale out (``scalable``) runs on the
    Ray cluster ``scale`` names, if any. Returns each stage's run by name."""
    from dermt2im.runners.scaling import scaled

    out: dict[str, StageRun] = {}
    for stage in stages:
        with scaled(stage, scale if getattr(stage, "scalable", False) else None) as placed:
            out[stage.name] = run_stage(placed.stage, on_unit=on_unit, workers=placed.concurrency)
    return out
