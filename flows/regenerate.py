"""Scheduled regeneration: a further batch with fresh seeds into the same manifests, then re-validation."""

from __future__ import annotations

from prefect import flow

from dermt2im.core.workdir import Workdir, open_workdir, workdir_lock
from dermt2im.generate.plan import planned_per_class
from dermt2im.flows.dispatch import check_devices_here, placement, run_gpu_stage
from dermt2im.flows.generate import generate
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.flows.validate import validate


@flow(name="regenerate", log_prints=True, flow_run_name=in_workdir("regenerate"))
def regenerate(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    per_class_increment: int | None = None,
) -> dict:
    """Extend the plan by ``per_class_increment`` images per class (new plan rows carry new seeds),
    render only what is new, gate and audit it, then validate again against the grown set."""
    with workdir_lock(Workdir.at(workdir), "regenerate flow"):  # a scheduled run never overlaps another
        w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
        before = planned_per_class(w.plan_manifest)
        target = before + (per_class_increment or cfg.generate.per_class)
        settings = orchestration(cfg)
        where = placement(cfg, settings)
        check_devices_here(cfg, [stage for stage in ("generate", "validate") if where[stage] is None])
        gen = run_gpu_stage(generate, where["generate"], {"workdir": workdir, "per_class": target}, settings)
        val = run_gpu_stage(validate, where["validate"], {"workdir": workdir}, settings, wait_for=[gen])
    return {"per_class_before": before, "per_class_after": target, "generate": gen, "validate": val}
