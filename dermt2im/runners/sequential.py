"""The CLI's runner: every unit of a stage that is not finished, in this process.

Units run one after the other; with ``workers`` > 1 (a stage whose ``run`` executes elsewhere, on
a Ray cluster: ``dermt2im.runners.ray_runner``) that many run at once, each in a thread that waits
for its result. Either way a unit is asked ``finished`` first, results keep the units' order, and
the first failure stops the units that have not started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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


def run_stage(stage: Stage, *, on_unit: Callable[[int, int, UnitResult], None] | None = None,
              workers: int = 1) -> StageRun:
    """Run every unit that is not finished (``workers`` at a time), then close the stage;
    ``on_unit(i, n, result)`` after each, in the order they end. A stage of several units (shards,
    validation cells) reports its progress over them."""
    units = list(stage.units())
    out = StageRun(stage.name)
    results: dict[int, UnitResult] = {}
    noun = getattr(stage, "unit_noun", "units")
    with progress.task(stage.name, total=len(units), unit=noun) if len(units) > 1 else nullcontext() as bar:

        def ended(position: int, result: UnitResult) -> None:
            results[position] = result
            if bar is not None:
                bar.update(len(results), note=f"{result.description}{' (up to date)' if result.cached else ''}")
            if on_unit is not None:
                on_unit(len(results), len(units), result)

        todo: list[int] = []
        for position, unit in enumerate(units):
            description = stage.describe(unit)
            done = stage.finished(unit)
            if done is None:
                todo.append(position)
                if workers <= 1:
                    ended(position, UnitResult(description, stage.run(unit), cached=False))
                continue
            log.info("%s: up to date (nothing to do)", description)
            ended(position, UnitResult(description, done, cached=True))
        if workers > 1 and todo:
            _run_at_once(stage, units, todo, workers, ended)
    out.units = [results[i] for i in range(len(units))]
    out.closing = stage.close(out.summaries)
    return out


def _run_at_once(stage: Stage, units: list, todo: list[int], workers: int,
                 ended: Callable[[int, UnitResult], None]) -> None:
    with ThreadPoolExecutor(max_workers=min(workers, len(todo)), thread_name_prefix=f"{stage.name}-unit") as pool:
        running: dict[Future, int] = {pool.submit(stage.run, units[p]): p for p in todo}
        while running:
            # FIRST_COMPLETED, not FIRST_EXCEPTION: the latter waits for every unit unless one fails, so
            # units would be reported (progress, on_unit) only at the end, in no particular order
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=running.__getitem__):
                position = running.pop(future)
                if future.exception() is not None:
                    for other in running:
                        other.cancel()  # units not started yet; those running end on their own
                    raise future.exception()
                ended(position, UnitResult(stage.describe(units[position]), future.result(), cached=False))
