"""The one Prefect adapter over the Stage protocol (``dermt2im.stage``): every unit of a stage
becomes a task run named by what it does ("render shard 3 (benign)", "validate vit hybrid seed 0").

A unit whose output is up to date (``stage.finished(unit)`` is not None) is not run again: the units
of a stage found up to date before it starts share one task run (a task run costs more bookkeeping
than checking a unit), which ends in a ``Completed`` state named ``Cached`` carrying their stored
summaries; a unit found up to date only once its own task run started ends ``Cached`` too. Nothing is
persisted by Prefect: no task result is ever written to or read from Prefect's result storage, so a
file planted in a shared workdir can never be unpickled (the stages' own records are JSON and
Parquet). Retries are for transient faults only (I/O, network, a locked tracking store).

Units run one after the other in the flow's thread, in the order the stage gives them: they share
one device and one loaded pipeline. With ``concurrency`` > 1 (a stage placed on a Ray cluster,
``dermt2im.runners.scaling``) that many task runs go at once, each on a thread that waits for its
unit to come back from the cluster. ``run_stage`` also keeps a progress artifact per stage and
closes the stage in a task of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from dermt2im.stage import Stage, Summary
from dermt2im.tasks.retries import retry_transient_only


@task(name="stage-unit", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient_only)
def run_unit(stage: Stage, unit: Any) -> Summary | State:
    """Run one unit of ``stage`` unless its output is up to date."""
    done = stage.finished(unit)
    if done is not None:
        return Completed(name="Cached", data=done, message=f"{stage.describe(unit)}: up to date, not run again")
    return stage.run(unit)


@task(name="stage-up-to-date", cache_policy=NO_CACHE, persist_result=False)
def units_up_to_date(descriptions: Sequence[str], summaries: Sequence[Summary]) -> State:
    """The units of a stage already up to date, recorded as one ``Cached`` task run."""
    listed = "; ".join(descriptions[:20]) + (f"; ... {len(descriptions) - 20} more" if len(descriptions) > 20 else "")
    return Completed(name="Cached", data=list(summaries), message=f"up to date, not run again: {listed}")


@task(name="stage-close", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient_only)
def close_stage(stage: Stage, results: Sequence[Summary]) -> Summary:
    """What a stage does once every unit is done (fold manifest parts in, write its reports)."""
    return stage.close(results)


def run_stage(stage: Stage, *, tags: Sequence[str] = (), wait_for: Sequence[Any] | None = None,
              concurrency: int = 1) -> Summary:
    """Every unit of ``stage`` as a task run (``concurrency`` at a time), then its closing task;
    returns the closing summary."""
    units = list(stage.units())
    all_tags = {*tags, f"stage:{stage.name}"}
    progress = create_progress_artifact(progress=0.0, key=f"{stage.name}-progress",
                                        description=f"{stage.name}: units done")
    results: list[Summary | None] = [stage.finished(unit) for unit in units]
    cached = [i for i, r in enumerate(results) if r is not None]
    if cached:
        up_to_date = units_up_to_date.with_options(
            name=stage.name, task_run_name=f"{stage.name}: {len(cached)} of {len(units)} up to date", tags=all_tags)
        up_to_date([stage.describe(units[i]) for i in cached], [results[i] for i in cached], wait_for=wait_for)
        update_progress_artifact(artifact_id=progress, progress=100.0 * len(cached) / max(1, len(units)))
    pending = [i for i, r in enumerate(results) if r is None]

    def unit_task(unit: Any) -> Any:
        return run_unit.with_options(name=stage.name, task_run_name=stage.describe(unit), tags=all_tags)

    if concurrency > 1 and len(pending) > 1:
        ran = _run_at_once(stage, [units[i] for i in pending], unit_task, wait_for, concurrency, progress,
                           done_before=len(cached), total=len(units))
        for i, summary in zip(pending, ran):
            results[i] = summary
    else:
        for done, i in enumerate(pending, start=len(cached) + 1):
            results[i] = unit_task(units[i])(stage, units[i], wait_for=wait_for)
            update_progress_artifact(artifact_id=progress, progress=100.0 * done / max(1, len(units)))
    closing = close_stage.with_options(name=f"{stage.name}-close", task_run_name=f"{stage.name}: close",
                                       tags={*tags, f"stage:{stage.name}-close"})
    return closing(stage, results)


def _run_at_once(stage: Stage, units: list, unit_task: Any, wait_for: Sequence[Any] | None, concurrency: int,
                 progress: Any, *, done_before: int = 0, total: int | None = None) -> list[Summary]:
    """The units' task runs on ``concurrency`` threads; their summaries in the units' order, or the
    first failure once every started run has ended."""
    from prefect.futures import as_completed
    from prefect.task_runners import ThreadPoolTaskRunner

    with ThreadPoolTaskRunner(max_workers=min(concurrency, len(units))) as runner:
        futures = [runner.submit(unit_task(unit), {"stage": stage, "unit": unit}, wait_for=wait_for)
                   for unit in units]
        for i, _ in enumerate(as_completed(futures), start=1):
            update_progress_artifact(artifact_id=progress, progress=100.0 * (done_before + i) / (total or len(units)))
    return [future.result() for future in futures]
