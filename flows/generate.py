"""The generate stage as a Prefect flow: plan -> render shards (gpu) -> quality gate + audit -> artifacts.

Deployable on its own to a CUDA work pool (the factory reaches it through run_deployment). With no
``config`` the workdir's saved W/config.yaml is used (a fresh workdir falls back to the smoke preset).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from dermt2im.core.config import LABELS
from dermt2im.generate.stage import resolve_lora, shard_missing
from dermt2im.core.manifest import PLAN, SYNTHETIC, compact, read_manifest
from dermt2im.core.workdir import Workdir, open_workdir
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
    With ``generate.parallel_workers`` > 0 (and no ``shards``) the shards are rendered by that many runs
    of the ``generate.worker_deployment`` deployment (flows.generate_worker) instead of here.
    """
    log = get_run_logger()
    w, cfg = open_workdir(workdir, config, overrides)
    token = cfg.train.instance_token
    fresh = not plan_is_complete(w, cfg.generate, token, per_class)
    plan = plan_task.with_options(refresh_cache=fresh or None)(workdir, cfg.generate, token, per_class,
                                                                cfg.storage.manifests)
    chosen = sorted(set(shards or plan["shards"]) & set(plan["shards"]))
    lora_root = resolve_lora(w, lora)
    lora_arg = str(lora_root) if lora_root else None
    log.info("%d planned samples in %d shard(s); rendering %d shard(s) with %s", plan["planned"],
             len(plan["shards"]), len(chosen), lora_arg or "the base model alone")

    progress = create_progress_artifact(progress=0.0, key="generate-progress", description="shards rendered")
    rendered = 0
    ordered = sorted(chosen, key=lambda s: (s % len(LABELS), s))  # one class after the other (per-class LoRAs)
    if cfg.generate.parallel_workers > 0 and not shards:
        rendered = fan_out(w, cfg, lora_root, progress)
        ordered = []  # the workers rendered every shard; the loop below has nothing left to do
    for n, shard in enumerate(ordered, start=1):
        missing = shard_missing(w, cfg, shard, lora_root)
        out = render_shard_task.with_options(refresh_cache=(missing > 0) or None)(workdir, cfg, shard, lora_arg)
        rendered += int(out["rendered"]) if missing else 0
        update_progress_artifact(artifact_id=progress, progress=100.0 * n / max(1, len(ordered)))

    folded = compact(w.synthetic_manifest, SYNTHETIC, w.locks)  # rows the workers appended as parts (object stores)
    if folded:
        log.info("folded %d appended manifest part(s) into %s", folded, w.synthetic_manifest)
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


def fan_out(w: Workdir, cfg, lora_root, progress_id, poll_seconds: float = 5.0) -> int:
    """Render the plan through ``generate.parallel_workers`` runs of ``generate.worker_deployment``
    (flows.generate_worker: shard leases, so the runs split the plan and survive a lost worker).

    Waits until every shard is done, or until every worker run has ended (an error if shards are
    still missing then), or ``orchestration.deployment_timeout_s``. A worker run that looks alive but
    whose machine died does not block: its shards are taken over when its leases expire, and the
    wait ends once the plan is complete. Returns how many images the workers had to render.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from dermt2im.runners.leased import plan_shards, shard_done

    log = get_run_logger()
    shards = plan_shards(w)
    missing = sum(shard_missing(w, cfg, s, lora_root) for s in shards)
    params = {"workdir": str(w.root), "config": None, "overrides": None,  # the workdir's saved config
              "lora": str(lora_root) if lora_root else None}
    n = cfg.generate.parallel_workers
    runs = [run_deployment(name=cfg.generate.worker_deployment, parameters=params, timeout=0) for _ in range(n)]
    log.info("dispatched %d run(s) of %s for %d shard(s) (%d image(s) missing)", n, cfg.generate.worker_deployment,
             len(shards), missing)
    deadline = cfg.orchestration.deployment_timeout_s
    t0 = time.monotonic()
    done: set[int] = set()
    while True:
        compact(w.synthetic_manifest, SYNTHETIC, w.locks)  # the workers' appended parts (object stores)
        plan, recorded = read_manifest(w.plan_manifest, PLAN), read_manifest(w.synthetic_manifest, SYNTHETIC)
        done |= {s for s in shards if s not in done and shard_done(w, cfg, s, lora_root, plan=plan, recorded=recorded)}
        update_progress_artifact(artifact_id=progress_id, progress=100.0 * len(done) / max(1, len(shards)))
        if len(done) == len(shards):
            break
        with get_client(sync_client=True) as client:
            states = [client.read_flow_run(r.id).state for r in runs]
        if all(st is not None and st.is_final() for st in states):
            names = sorted({st.name for st in states})
            raise RuntimeError(f"every worker run ended ({', '.join(names)}) with {len(shards) - len(done)} "
                               f"shard(s) not rendered: runs {[str(r.id) for r in runs]}")
        if deadline is not None and time.monotonic() - t0 > deadline:
            raise TimeoutError(f"{len(shards) - len(done)} shard(s) not rendered after {deadline:.0f} s")
        time.sleep(poll_seconds)
    return missing


if __name__ == "__main__":  # python -m flows.generate WORKDIR [CONFIG]
    import sys

    generate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
