"""The one runner core: which units of a stage are done, run the rest in order, report, close.

Every way of running a stage goes through ``run_stage``: the CLI (``dermt2im.runners.sequential``),
the Prefect adapter (``dermt2im.tasks.stage``, which runs each unit as a task run), a stage placed on
a Ray cluster (``dermt2im.runners.scaling``: its ``run`` executes there) and a static partition
(``dermt2im.runners.partition``). What differs between them is passed in: how one unit is executed,
how units found up to date are reported, how the stage is closed.

1. ``survey``: the stage's units, each with its key (``stage.key``) and, when its output exists and
   was made for that key, the summary ``stage.finished(unit, key)`` returns. These keys are the only
   ones anything uses to decide what is stale.
2. The units that are not done run in the stage's order, ``concurrency`` at a time when their
   ``run`` executes elsewhere (a Ray cluster; each on a thread that waits for it), each reported as
   it ends. The first failure stops the units not started yet.
3. ``stage.close(results)``, with every unit's summary in the units' order.

``pending(stages)`` asks the same question of a whole pipeline without running anything: what
``dermt2im run`` asks before it imports torch or starts a server.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from dermt2im.core import progress
from dermt2im.stage import Stage, Summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One unit of a stage as a runner sees it: what it is, its key, and the summary of its output
    when that output is up to date (None: it has to run)."""

    unit: Any
    description: str
    key: str
    done: Summary | None

    @property
    def cached(self) -> bool:
        return self.done is not None


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


def survey(stage: Stage) -> list[Unit]:
    """Every unit of ``stage`` with its key and, when up to date, its output's summary."""
    out = []
    for unit in stage.units():
        key = stage.key(unit)
        out.append(Unit(unit, stage.describe(unit), key, stage.finished(unit, key)))
    return out


def pending(stages: Sequence[Stage]) -> tuple[Stage, list[Unit]] | None:
    """The first stage of a pipeline with units to run, and those units; None when every unit of
    every stage is up to date. Later stages are not asked: their inputs may still change."""
    for stage in stages:
        todo = [u for u in survey(stage) if not u.cached]
        if todo:
            return stage, todo
    return None


Execute = Callable[[Stage, Unit], Summary]


def _run_in_place(stage: Stage, unit: Unit) -> Summary:
    return stage.run(unit.unit, unit.key)


def run_stage(stage: Stage, *, execute: Execute = _run_in_place, concurrency: int = 1,
              on_cached: Callable[[list[Unit]], None] | None = None,
              on_unit: Callable[[int, int, UnitResult], None] | None = None,
              close: Callable[[Stage, list[Summary]], Summary] | None = None) -> StageRun:
    """Run every unit of ``stage`` that is not done (see the module docstring), then close it.

    ``execute(stage, unit)`` runs one unit (default: ``stage.run`` here); ``on_cached(units)`` is told
    once of the units found up to date; ``on_unit(i, n, result)`` after each unit, in the order they
    end; ``close(stage, summaries)`` closes the stage (default: ``stage.close``). A stage of several
    units (shards, validation cells) shows its progress over them."""
    units = survey(stage)
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

        cached = [u for u in units if u.cached]
        if cached and on_cached is not None:
            on_cached(cached)
        for position, u in enumerate(units):
            if u.cached:
                log.info("%s: up to date (nothing to do)", u.description)
                ended(position, UnitResult(u.description, u.done, cached=True))
        todo = [p for p, u in enumerate(units) if not u.cached]
        if concurrency > 1 and len(todo) > 1:
            _run_at_once(stage, units, todo, execute, concurrency, ended)
        else:
            for position in todo:
                ended(position, UnitResult(units[position].description, execute(stage, units[position]), cached=False))
    out.units = [results[i] for i in range(len(units))]
    out.closing = close(stage, out.summaries) if close is not None else stage.close(out.summaries)
    return out


def _run_at_once(stage: Stage, units: list[Unit], todo: list[int], execute: Execute, concurrency: int,
                 ended: Callable[[int, UnitResult], None]) -> None:
    """``todo`` on ``concurrency`` threads, each unit in a copy of this thread's context (a Prefect
    flow run's, so that a unit's task run belongs to it)."""
    with ThreadPoolExecutor(max_workers=min(concurrency, len(todo)), thread_name_prefix=f"{stage.name}-unit") as pool:
        running: dict[Future, int] = {
            pool.submit(contextvars.copy_context().run, execute, stage, units[p]): p for p in todo}
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
                ended(position, UnitResult(units[position].description, future.result(), cached=False))
