"""One generation worker as a Prefect flow: render shards of the workdir's plan until all are done.

Start as many runs as there are GPUs / workers (``flows.generate`` does it with
``generate.parallel_workers``, or ``prefect deployment run generate-worker/<name>`` N times); each
run claims shards through leases in W/synthetic/.leases, so the runs split the plan with no
duplicate and no missing image, and a run whose worker died is replaced by the others once its
lease expires (``generate.lease_seconds``). The plan must exist (the generate flow makes it).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dermt2im.generate.stage import GenerationError, resolve_lora
from dermt2im.core.workdir import open_workdir
from dermt2im.runners.leased import run_worker


@flow(name="generate-worker", log_prints=True)
def generate_worker(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    lora: str | None = None,
    owner: str | None = None,
    poll_seconds: float = 2.0,
    timeout_seconds: float | None = None,
) -> dict:
    """Claim, render and release shards until the plan is complete; returns this worker's counts."""
    log = get_run_logger()
    w, cfg = open_workdir(workdir, config, overrides)
    if owner is None:
        from prefect.runtime import flow_run

        owner = f"flow-run-{flow_run.id}"
    lora_root = resolve_lora(w, lora)
    out = run_worker(w, cfg, lora=lora_root, owner=owner, poll_seconds=poll_seconds, timeout=timeout_seconds)
    log.info("worker %s rendered %d image(s) in shard(s) %s (%d taken over); %d/%d shards done", owner,
             out["images"], out["shards"], out["takeovers"], out["done_shards"], out["planned_shards"])
    if not out["complete"]:
        raise GenerationError(f"{out['planned_shards'] - out['done_shards']} shard(s) not done after "
                              f"{timeout_seconds} s (other workers still hold them)")
    return out


if __name__ == "__main__":  # python -m flows.generate_worker WORKDIR
    import sys

    generate_worker(sys.argv[1])
