"""Validation flow: one task per (model, regime, seed) cell (on a Ray cluster with scale.ray_address),
McNemar, Table IV, the SAM check."""

from __future__ import annotations

from prefect import flow

from dermt2im.core.workdir import open_workdir
from dermt2im.runners.scaling import scaled
from dermt2im.validate.segmentation import SegmentationStage
from dermt2im.validate.stage import ValidateStage
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.tasks.artifacts import publish_segmentation, publish_table_iv
from dermt2im.tasks.stage import run_stage


@flow(name="validate", log_prints=True, flow_run_name=in_workdir("validate"))
def validate(
    workdir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    test_sets: dict[str, str] | None = None,
    log_model: bool = True,
) -> dict:
    """Validate the synthetic images of ``workdir``.

    ``config``: a preset or file, saved as the workdir's config; None (the default, as the factory
    and the deployments call it): the workdir's saved config. ``test_sets``: name -> ingested
    test-set manifest; default: every manifest under W/manifests/test_sets plus the seeds' own test
    split."""
    w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
    tags = ["gpu" if cfg.runtime.validation.device != "cpu" else "cpu", "validate"]
    stage = ValidateStage.of(w, cfg, test_sets=test_sets, log_model=log_model)
    with scaled(stage, cfg.scale) as placed:  # scale.ray_address: every cell a Ray task (scale.gpus_per_cell)
        compared = run_stage(placed.stage, tags=["ray", "validate"] if placed.on_ray else tags,
                             concurrency=placed.concurrency)
    publish_table_iv(w, compared, cfg.tracking)
    segmentation = run_stage(SegmentationStage(w, cfg.validation))
    publish_segmentation(segmentation)
    return {**compared, "segmentation": segmentation}


if __name__ == "__main__":  # python -m dermt2im.flows.validate WORKDIR [CONFIG]
    import sys

    validate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
