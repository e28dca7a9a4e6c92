"""Scheduled regeneration: a further batch with fresh seeds into the same manifests, then re-validation."""

from __future__ import annotations

from prefect import flow, get_run_logger

from dermt2im.core.manifest import PLAN, read_manifest
from dermt2im.core.workdir import Workdir, open_workdir
from flows.dispatch import run_gpu_stage
from flows.generate import generate
from flows.validate import validate


def planned_per_class(w: Workdir) -> int:
    plan = read_manifest(w.plan_manifest, PLAN)
    if plan.empty:
        return 0
    return int(plan.groupby("label")["index"].max().min()) + 1


@flow(name="regenerate", log_prints=True)
def regenerate(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    per_class_increment: int | None = None,
) -> dict:
    """Extend the plan by ``per_class_increment`` images per class (new plan rows carry new seeds),
    render only what is new, gate and audit it, then validate again against the grown set."""
    w, cfg = open_workdir(workdir, config, overrides)
    before = planned_per_class(w)
    target = before + (per_class_increment or cfg.generate.per_class)
    get_run_logger().info("regenerating: %d -> %d images per class", before, target)
    gen = run_gpu_stage(generate, cfg.orchestration.generate_deployment,
                        {"workdir": workdir, "per_class": target}, cfg.orchestration)
    val = validate(workdir)
    return {"per_class_before": before, "per_class_after": target, "generate": gen, "validate": val}
