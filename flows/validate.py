"""Validation flow: plan -> one cached task per (model, regime, seed) -> McNemar -> Table IV artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from dermt2im.core.workdir import open_workdir
from tasks.validate import cell_task, finish_task, plan_task, report_task, segmentation_task


# Cells run one at a time in this process: they share the device, and torch's global RNG is seeded
# per cell (determinism). Spread cells over machines by deploying this flow per model / regime.
@flow(name="validate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def validate(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    test_sets: dict[str, str] | None = None,
    log_model: bool = True,
) -> dict:
    """Validate the synthetic images of ``workdir``.

    ``config``: a preset or file, saved as the workdir's config; None (the default, as the factory
    and the deployments call it): the workdir's saved config, or the smoke preset in a fresh
    workdir. ``test_sets``: name -> ingested test-set manifest; default: every manifest under
    W/manifests/test_sets plus the seeds' own test split."""
    log = get_run_logger()
    w, cfg = open_workdir(workdir, config, overrides)
    plan = plan_task(str(w.root), cfg, test_sets)
    for name, why in sorted(plan.skipped.items()):
        log.warning("regime %s skipped: %s", name, why)
    gpu = cfg.validation.device != "cpu"
    cell = cell_task.with_options(tags=["gpu" if gpu else "cpu", "validate"])
    futures = [cell.submit(str(w.root), cfg, plan, c, log_model) for c in plan.cells]
    progress = create_progress_artifact(progress=0.0, key="validate-progress",
                                        description="classifier runs (model x regime x seed) finished")
    results = []
    for f in futures:
        results.append(f.result())
        update_progress_artifact(artifact_id=progress, progress=100.0 * len(results) / max(1, len(futures)))
    closed = finish_task(str(w.root), cfg, plan, results)
    report = report_task(str(w.root), cfg, plan.parent_run_id)
    out = {**closed, "report": report}
    if cfg.validation.segmentation_samples > 0:
        missing = not (w.reports / "segmentation.md").is_file()  # a cache hit must not point at deleted reports
        out["segmentation"] = segmentation_task.with_options(refresh_cache=missing or None)(str(w.root), cfg)
    log.info("Table IV: %s", report["table_md"])
    return out


if __name__ == "__main__":  # python -m flows.validate WORKDIR [CONFIG]
    import sys

    validate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
