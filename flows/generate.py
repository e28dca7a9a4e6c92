"""The generate stage as a Prefect flow: plan -> render shards (gpu) -> quality gate + audit -> fidelity report.

Deployable on its own to a CUDA work pool (the factory reaches it through run_deployment). With no
``config`` the workdir's saved W/config.yaml is used. Shards render here, one task run each; with
``scale.ray_address`` each task run's shard renders on the Ray cluster (one renderer actor per GPU,
``dermt2im.runners.ray_runner``); with ``orchestration.parallel_workers`` N, N runs of the worker
deployment render a static partition each (``dermt2im.flows.generate_worker``).
"""

from __future__ import annotations

from prefect import flow

from dermt2im import pipelines
from dermt2im.core.workdir import open_workdir
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.tasks.fanout import render_with_workers
from dermt2im.tasks.stage import run_pipeline


@flow(name="generate", log_prints=True, flow_run_name=in_workdir("generate"))
def generate(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    lora: str | None = None,
    per_class: int | None = None,
    shards: list[int] | None = None,
    base_model_only: bool = False,
) -> dict:
    """Plan (or extend the plan), render every shard that is not complete, gate and audit, report the
    set's fidelity (``dermt2im.pipelines.generate``).

    ``lora``: a LoRA run folder or weights file (default: the LoRA trained for the current config). ``shards``:
    render only these. With ``orchestration.parallel_workers`` > 0 (and no ``shards``) the shards are
    rendered by that many runs of the worker deployment (dermt2im.flows.generate_worker) instead of here.
    Renderer task runs carry the tag ``gpu`` in this process and ``ray`` on a cluster, where Ray, not
    Prefect's tag limit, shares out the GPUs.
    """
    w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
    stages = pipelines.generate(w, cfg, lora=lora, per_class=per_class, shards=shards, base_model_only=base_model_only)
    settings = orchestration(cfg)
    by_workers = render_with_workers(stages[0], settings) if settings.parallel_workers > 0 and not shards else 0
    done, artifacts = run_pipeline(stages, cfg.scale)
    rendered, assessed, fidelity = done["generate"], done["quality"], done["fidelity"]
    rendered["rendered"] += by_workers
    return {**rendered, "accepted": assessed["accepted"], "rejected": assessed["rejected"],
            "reasons": assessed["reasons"], "memorised": assessed["memorised"], "reports": assessed["files"],
            "fidelity": fidelity["md"], "artifacts": artifacts}


if __name__ == "__main__":  # python -m dermt2im.flows.generate WORKDIR [CONFIG]
    import sys

    generate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
