"""Generation fanned out over Prefect worker runs (``orchestration.parallel_workers`` runs of the
``generate-worker`` deployment, ``flows.generate_worker``), which split the shards through leases.

The parent waits until every shard is finished, or until every worker run has ended (an error if
shards are still missing then), or ``orchestration.deployment_timeout_s``. A worker run that looks
alive but whose machine died does not block: its shards are taken over when its leases expire, and
the wait ends once every shard is finished.
"""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from dermt2im.generate.shards import shard_missing
from dermt2im.generate.stage import GenerateStage
from flows.settings import OrchestrationSettings


def render_with_workers(stage: GenerateStage, settings: OrchestrationSettings, poll_seconds: float = 5.0) -> int:
    """Returns how many images the workers had to render."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    log = get_run_logger()
    shards = stage.units()
    missing = sum(shards_missing(stage, s) for s in shards)
    params = {"workdir": str(stage.workdir.root), "config": None, "overrides": None,  # the workdir's saved config
              "lora": str(stage.model.lora) if stage.model.lora else None, "base_model_only": stage.model.lora is None}
    runs = [run_deployment(name=settings.worker_deployment, parameters=params, timeout=0)
            for _ in range(settings.parallel_workers)]
    log.info("dispatched %d run(s) of %s for %d shard(s)", len(runs), settings.worker_deployment, len(shards))
    progress = create_progress_artifact(progress=0.0, key="generate-workers-progress", description="shards rendered")
    t0 = time.monotonic()
    done: set[int] = set()
    while True:
        stage.fold_parts()  # the workers' appended parts (object stores)
        done |= {s for s in shards if s not in done and stage.finished(s) is not None}
        update_progress_artifact(artifact_id=progress, progress=100.0 * len(done) / max(1, len(shards)))
        if len(done) == len(shards):
            return missing
        with get_client(sync_client=True) as client:
            states = [client.read_flow_run(r.id).state for r in runs]
        if all(st is not None and st.is_final() for st in states):
            names = sorted({st.name for st in states})
            raise RuntimeError(f"every worker run ended ({', '.join(names)}) with {len(shards) - len(done)} "
                               f"shard(s) not rendered: runs {[str(r.id) for r in runs]}")
        if settings.deployment_timeout_s is not None and time.monotonic() - t0 > settings.deployment_timeout_s:
            raise TimeoutError(f"{len(shards) - len(done)} shard(s) not rendered after {settings.deployment_timeout_s:.0f} s")
        time.sleep(poll_seconds)


def shards_missing(stage: GenerateStage, shard: int) -> int:
    return shard_missing(stage.workdir, stage.model, shard)
