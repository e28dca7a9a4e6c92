"""The one Prefect adapter over the Stage protocol (``dermt2im.stage``): the runner core
(``dermt2im.runners.core``) with every unit of a stage run as a task run named by what it does
("render shard 3 (benign)", "validate vit hybrid seed 0").

The core decides which units are done; those found up to date before the stage starts share one
task run (a task run costs more bookkeeping than checking a unit), which ends in a ``Completed``
state named ``Cached`` carrying their stored summaries; a unit found up to date only once its own
task run started (a retry) ends ``Cached`` too. Nothing is persisted by Prefect: no task result is
ever written to or read from Prefect's result storage, so a file planted in a shared workdir can
never be unpickled (the stages' own records are JSON and Parquet). Retries are for transient faults
only (I/O, network, a locked tracking store).

Units run one after the other in the flow's thread, in the order the stage gives them: they share
one device and one loaded pipeline. With ``concurrency`` > 1 (a stage placed on a Ray cluster,
``dermt2im.runners.scaling``) that many task runs go at once, each on a thread that waits for its
unit to come back from the cluster. ``run_stage`` also keeps a progress artifact per stage and
closes the stage in a task of its own; ``run_pipeline`` runs a pipeline's stages
(``dermt2im.pipelines``), each where it may run, and publishes what each stage made (``artifacts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from dermt2im.core.runtime import ScaleConfig
from dermt2im.runners import core
from dermt2im.stage import Stage, Summary
from dermt2im.tasks.retries import retry_transient_only


@task(name="stage-unit", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient_only)
def run_unit(stage: Stage, unit: Any, key: str) -> Summary | State:
    """Run one unit of ``stage`` unless its output is up to date for ``key``."""
    done = stage.finished(unit, key)
    if done is not None:
        return Completed(name="Cached", data=done, message=f"{stage.describe(unit)}: up to date, not run again")
    return stage.run(unit, key)


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
    all_tags = {*tags, f"stage:{stage.name}"}
    progress = create_progress_artifact(progress=0.0, key=f"{stage.name}-progress",
                                        description=f"{stage.name}: units done")

    def cached(units: list[core.Unit]) -> None:
        up_to_date = units_up_to_date.with_options(
            name=stage.name, task_run_name=f"{stage.name}: {len(units)} up to date", tags=all_tags)
        up_to_date([u.description for u in units], [u.done for u in units], wait_for=wait_for)

    def execute(stage: Stage, unit: core.Unit) -> Summary:
        one = run_unit.with_options(name=stage.name, task_run_name=unit.description, tags=all_tags)
        return one(stage, unit.unit, unit.key, wait_for=wait_for)

    def reported(i: int, n: int, _result: core.UnitResult) -> None:
        update_progress_artifact(artifact_id=progress, progress=100.0 * i / max(1, n))

    def close(stage: Stage, results: list[Summary]) -> Summary:
        closing = close_stage.with_options(name=f"{stage.name}-close", task_run_name=f"{stage.name}: close",
                                           tags={*tags, f"stage:{stage.name}-close"})
        return closing(stage, results)

    return core.run_stage(stage, execute=execute, concurrency=concurrency, on_cached=cached, on_unit=reported,
                          close=close).closing


def placed_tags(stage: Stage, on_ray: bool) -> list[str]:
    """The tags of a stage's task runs: its own (``gpu`` or ``cpu``, ...), with ``ray`` in place of the
    device when its units run on a Ray cluster (Ray, not Prefect's ``gpu`` limit, shares the GPUs)."""
    own = list(getattr(stage, "tags", ()))
    return ["ray", *(t for t in own if t not in ("gpu", "cpu"))] if on_ray else own


def run_pipeline(stages: Sequence[Stage], scale: ScaleConfig | None = None, *,
                 wait_for: Sequence[Any] | None = None) -> tuple[dict[str, Summary], list[str]]:
    """Every stage of a pipeline in order, each as ``run_stage``; a stage that can scale out
    (``scalable``) runs on the Ray cluster ``scale`` names, if any. After each stage, what it made is
    published as artifacts (``artifacts.publish``). Returns each stage's closing summary by name, and
    the keys of the artifacts made."""
    from dermt2im.runners.scaling import scaled
    from dermt2im.tasks.artifacts import publish

    out: dict[str, Summary] = {}
    made: list[str] = []
    for stage in stages:
        with scaled(stage, scale if getattr(stage, "scalable", False) else None) as placed:
            out[stage.name] = run_stage(placed.stage, tags=placed_tags(stage, placed.on_ray), wait_for=wait_for,
                                        concurrency=placed.concurrency)
        made += publish(stage, out[stage.name])
    return out, made
