"""The generate stage as a Prefect flow: plan -> render shards (gpu) -> quality gate + audit -> artifacts.

Deployable on its own to a CUDA work pool (the factory reaches it through run_deployment). With no
``config`` the workdir's saved W/config.yaml is used (a fresh workdir falls back to the smoke preset).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from dermt2im.config import LABELS
from dermt2im.generation import resolve_lora, shard_missing
from dermt2im.workdir import Workdir, workdir_config
from tasks.generate import (
    assess_is_current,
    assess_task,
    plan_is_complete,
    plan_task,
    publish_reports,
    render_shard_task,
)


@flow(name="generate", log_prints=True)
def generate(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    lora: str | None = None,
    per_class: int | None = None,
    shards: list[int] | None = None,
) -> dict:
    """Plan (or extend the plan), render every shard that is not complete, gate and audit.

    ``lora``: a LoRA run folder or weights file (default: the newest run in W/lora, else the base
    model). ``shards``: render only these (scale-out); the quality gate runs over everything rendered.
    """
    log = get_run_logger()
    w = Workdir.at(workdir)
    cfg = workdir_config(w, config, overrides)
    token = cfg.train.instance_token
    fresh = not plan_is_complete(w, cfg.generate, token, per_class)
    plan = plan_task.with_options(refresh_cache=fresh or None)(workdir, cfg.generate, token, per_class)
    chosen = sorted(set(shards or plan["shards"]) & set(plan["shards"]))
    lora_root = resolve_lora(w, lora)
    lora_arg = str(lora_root) if lora_root else None
    log.info("%d planned samples in %d shard(s); rendering %d shard(s) with %s", plan["planned"],
             len(plan["shards"]), len(chosen), lora_arg or "the base model alone")

    progress = create_progress_artifact(progress=0.0, key="generate-progress", description="shards rendered")
    rendered = 0
    ordered = sorted(chosen, key=lambda s: (s % len(LABELS), s))  # one class after the other (per-class LoRAs)
    for n, shard in enumerate(ordered, start=1):
        missing = shard_missing(w, cfg, shard, lora_root)
        out = render_shard_task.with_options(refresh_cache=(missing > 0) or None)(workdir, cfg, shard, lora_arg)
        rendered += int(out["rendered"]) if missing else 0
        update_progress_artifact(artifact_id=progress, progress=100.0 * n / max(1, len(ordered)))

    assessed = assess_task.with_options(refresh_cache=(not assess_is_current(w)) or None)(workdir, cfg)
    artifacts = publish_reports(w, assessed)
    log.info("%s", assessed.get("summary", ""))
    return {
        "plan": plan["plan"],
        "planned": plan["planned"],
        "shards": chosen,
        "rendered": rendered,
        "lora": lora_arg,
        "synthetic": str(w.synthetic_manifest),
        "accepted": assessed["accepted"],
        "rejected": assessed["rejected"],
        "reasons": assessed["reasons"],
        "memorised": assessed["memorised"],
        "reports": assessed["files"],
        "artifacts": artifacts,
    }


if __name__ == "__main__":  # python -m flows.generate WORKDIR [CONFIG]
    import sys

    generate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
