"""The sequential runner: every unit of a stage, one after the other, in this process (the CLI)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from dermt2im.core import progress
from dermt2im.stage import Stage, Summary

log = logging.getLogger(__name__)


@dataclass
class UnitResult:
    description: str
    summary: Summary
    cached: bool


@dataclass
class StageRun:
    """What running a stage did: one result per unit, then the stage's closing summary."""

    stage: str
    units: list[UnitResult] = field(default_factory=list)
    closing: Summary = field(default_factory=dict)

    @property
    def ran(self) -> int:
        return sum(not u.cached for u in self.units)

    @property
    def cached(self) -> int:
        return sum(u.cached for u in self.units)

    @property
    def summaries(self) -> list[Summary]:
        return [u.summary for u in self.units]


def run_stage(stage: Stage, *, on_unit: Callable[[int, int, UnitResult], None] | None = None) -> StageRun:
    """Run every unit that is not finished, then close the stage; ``on_unit(i, n, result)`` after each.

    A stage of several units (shards, validation cells) reports its progress over them."""
    units = list(stage.units())
    out = StageRun(stage.name)
    noun = getattr(stage, "unit_noun", "units")
    with progress.task(stage.name, total=len(units), unit=noun) if len(units) > 1 else nullcontext() as bar:
        for i, unit in enumerate(units, start=1):
            description = stage.describe(unit)
            done = stage.finished(unit)
            if done is not None:
                log.info("%s: up to date (nothing to do)", description)
                result = UnitResult(description, done, cached=True)
            else:
                result = UnitResult(description, stage.run(unit), cached=False)
            out.units.append(result)
            if bar is not None:
                bar.update(i, note=f"{description}{' (up to date)' if result.cached else ''}")
            if on_unit is not None:
                on_unit(i, len(units), result)
    out.closing = stage.close(out.summaries)
    return out
