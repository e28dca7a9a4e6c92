"""One generation worker as a Prefect flow: render a static partition of the workdir's plan.

For work pools whose flow runs are batch jobs (a Kubernetes Job, a docker container per run) and
no Ray cluster: ``dermt2im.flows.generate`` with ``orchestration.parallel_workers: N`` starts N runs, run
``i`` rendering the shards whose number modulo N is ``i`` (``dermt2im.runners.partition``), one
task run per shard. Nothing is claimed or shared: a run that failed is run again with the same
``shard_index``, and its finished shards are skipped.
"""

from __future__ import annotations

from prefect import flow

from dermt2im import pipelines
from dermt2im.core.workdir import open_workdir
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.runners.partition import Partition
from dermt2im.tasks.stage import run_pipeline


@flow(name="generate-worker", log_prints=True, flow_run_name=in_workdir("generation worker"))
def generate_worker(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    lora: str | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    base_model_only: bool = False,
) -> dict:
    """Render the shards ``s`` of the plan with ``s % num_shards == shard_index`` (the plan is made or
    extended first, under a lock); returns this partition's counts."""
    w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
    (render,) = pipelines.generate(w, cfg, lora=lora, base_model_only=base_model_only, gated=False)
    done, _ = run_pipeline([Partition(render, shard_index, num_shards)])
    return {**done["generate"], "shard_index": shard_index, "num_shards": num_shards}


if __name__ == "__main__":  # python -m dermt2im.flows.generate_worker WORKDIR [SHARD_INDEX NUM_SHARDS]
    import sys

    generate_worker(sys.argv[1], shard_index=int(sys.argv[2]) if len(sys.argv) > 2 else 0,
                    num_shards=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
