"""One generation worker as a Prefect flow: render shards of the workdir's plan until all are done.

Start as many runs as there are GPUs / workers (``flows.generate`` does it with
``orchestration.parallel_workers``, or ``prefect deployment run generate-worker/<name>`` N times);
the runs split the shards through leases (``dermt2im.runners.leased``), and a run whose worker died
is replaced by the others once its lease expires (``runtime.generate.lease_seconds``).
"""

from __future__ import annotations

from prefect import flow

from dermt2im.core.workdir import open_workdir
from dermt2im.generate.model import GenerationError, resolve_model
from dermt2im.generate.stage import GenerateStage
from dermt2im.runners.leased import run_claimed
from flows.names import in_workdir
from flows.settings import orchestration


@flow(name="generate-worker", log_prints=True, flow_run_name=in_workdir("generation worker"))
def generate_worker(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    lora: str | None = None,
    owner: str | None = None,
    poll_seconds: float = 2.0,
    timeout_seconds: float | None = None,
    base_model_only: bool = False,
) -> dict:
    """Claim, render and release shards until the plan is complete; returns this worker's counts."""
    w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
    if owner is None:
        from prefect.runtime import flow_run

        owner = f"flow-run-{flow_run.id}"
    model = resolve_model(w, lora, base_model_only=base_model_only, base_model=cfg.train.base_model,
                          revision=cfg.train.revision, token=cfg.train.instance_token)
    stage = GenerateStage(w, cfg.generate, cfg.runtime.generate, model)
    out = run_claimed(stage, w.leases, ttl=cfg.runtime.generate.lease_seconds, owner=owner,
                      poll_seconds=poll_seconds, timeout=timeout_seconds)
    if not out["complete"]:
        raise GenerationError(f"{out['planned_shards'] - out['done_shards']} shard(s) not done after "
                              f"{timeout_seconds} s (other workers still hold them)")
    return out


if __name__ == "__main__":  # python -m flows.generate_worker WORKDIR
    import sys

    generate_worker(sys.argv[1])
