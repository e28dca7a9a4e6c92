"""Generation fanned out over Prefect worker runs: ``orchestration.parallel_workers`` runs of the
``generate-worker`` deployment (``dermt2im.flows.generate_worker``), run ``i`` of N rendering the static
partition ``shard % N == i``.

For work pools without a Ray cluster (one batch job per flow run). The parent waits until every
run has ended (or ``orchestration.deployment_timeout_s``), folds in the rows the runs appended on
an object store, and fails naming the runs that did not complete and the shards still missing. A
failed partition is made good by running the generate flow again: the finished shards of every
partition are skipped.
"""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from dermt2im.generate.model import GenerationError
from dermt2im.generate.shards import shard_missing
from dermt2im.generate.stage import GenerateStage
from dermt2im.runners.core import survey
from dermt2im.flows.settings import OrchestrationSettings


def render_with_workers(stage: GenerateStage, settings: OrchestrationSettings, poll_seconds: float = 5.0) -> int:
    """Returns how many images the workers had to render."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    log = get_run_logger()
    shards = stage.units()
    missing = sum(shards_missing(stage, s) for s in shards)
    n = settings.parallel_workers
    params = {"workdir": str(stage.workdir.root), "config": None, "overrides": None,  # the workdir's saved config
              "lora": str(stage.model.lora) if stage.model.lora else None, "base_model_only": stage.model.lora is None,
              "num_shards": n}
    runs = [run_deployment(name=settings.worker_deployment, parameters={**params, "shard_index": i}, timeout=0)
            for i in range(n)]
    log.info("dispatched %d run(s) of %s, one partition of %d shard(s) each", n, settings.worker_deployment,
             len(shards))
    progress = create_progress_artifact(progress=0.0, key="generate-workers-progress", description="worker runs ended")
    t0 = time.monotonic()
    while True:
        with get_client(sync_client=True) as client:
            states = [client.read_flow_run(r.id).state for r in runs]
        ended = sum(st is not None and st.is_final() for st in states)
        update_progress_artifact(artifact_id=progress, progress=100.0 * ended / n)
        if ended == n:
            break
        if settings.deployment_timeout_s is not None and time.monotonic() - t0 > settings.deployment_timeout_s:
            raise TimeoutError(f"{n - ended} of {n} worker run(s) not ended after {settings.deployment_timeout_s:.0f} s")
        time.sleep(poll_seconds)
    stage.fold_parts()  # the runs' appended parts (object stores)
    failed = [f"partition {i} (flow run {r.id}): {st.name}" for i, (r, st) in enumerate(zip(runs, states))
              if not st.is_completed()]
    left = [u.unit for u in survey(stage) if not u.cached]
    if failed or left:
        raise GenerationError(f"{len(left)} shard(s) not rendered ({left[:10]}); worker runs that did not complete: "
                              f"{', '.join(failed) or 'none'}. Run the generate flow again: finished shards are skipped")
    return missing


def shards_missing(stage: GenerateStage, shard: int) -> int:
    return shard_missing(stage.workdir, stage.model, shard)
