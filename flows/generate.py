"""The generate stage as a Prefect flow: plan -> render shards (gpu) -> quality gate + audit.

Deployable on its own to a CUDA work pool (the factory reaches it through run_deployment). With no
``config`` the workdir's saved W/config.yaml is used. Shards render here, one task run each; with
``scale.ray_address`` each task run's shard renders on the Ray cluster (one renderer actor per GPU,
``dermt2im.runners.ray_runner``); with ``orchestration.parallel_workers`` N, N runs of the worker
deployment render a static partition each (``flows.generate_worker``).
"""

from __future__ import annotations

from prefect import flow

from dermt2im.core.workdir import open_workdir
from dermt2im.generate.model import resolve_model
from dermt2im.generate.stage import GenerateStage
from dermt2im.quality.stage import QualityStage
from dermt2im.runners.scaling import scaled
from flows.names import in_workdir
from flows.settings import orchestration
from tasks.artifacts import publish_quality
from tasks.fanout import render_with_workers
from tasks.stage import run_stage


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
    """Plan (or extend the plan), render every shard that is not complete, gate and audit.

    ``lora``: a LoRA run folder or weights file (default: the newest run in W/lora). ``shards``:
    render only these. With ``orchestration.parallel_workers`` > 0 (and no ``shards``) the shards are
    rendered by that many runs of the worker deployment (flows.generate_worker) instead of here.
    Renderer task runs carry the tag ``gpu`` in this process and ``ray`` on a cluster, where Ray, not
    Prefect's tag limit, shares out the GPUs.
    """
    w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
    model = resolve_model(w, lora, base_model_only=base_model_only, base_model=cfg.train.base_model,
                          revision=cfg.train.revision, token=cfg.train.instance_token,
                          base_config=cfg.train.base_config)
    stage = GenerateStage(w, cfg.generate, cfg.runtime.generate, model, per_class=per_class, shards=shards)
    settings = orchestration(cfg)
    by_workers = render_with_workers(stage, settings) if settings.parallel_workers > 0 and not shards else 0
    with scaled(stage, cfg.scale) as placed:
        rendered = run_stage(placed.stage, tags=["ray" if placed.on_ray else "gpu"], concurrency=placed.concurrency)
    rendered["rendered"] += by_workers
    assessed = run_stage(QualityStage(w, cfg.quality))
    artifacts = publish_quality(w, assessed)
    return {**rendered, "accepted": assessed["accepted"], "rejected": assessed["rejected"],
            "reasons": assessed["reasons"], "memorised": assessed["memorised"], "reports": assessed["files"],
            "artifacts": artifacts}


if __name__ == "__main__":  # python -m flows.generate WORKDIR [CONFIG]
    import sys

    generate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
