"""Validation flow: one task per (model, regime, seed) cell (on a Ray cluster with scale.ray_address),
McNemar, Table IV, the SAM check (``dermt2im.pipelines.validate``)."""

from __future__ import annotations

from prefect import flow

from dermt2im import pipelines
from dermt2im.core.workdir import open_workdir
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.tasks.stage import run_pipeline


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
    and the deployments call it): the workdir's saved config. ``test_sets``: name -> source of
    unseen real test sets, ingested and preprocessed first, and the only ones tested on; default:
    every test set the workdir holds (those of ``validate.test_sets`` ingested first) plus the seeds'
    own test split."""
    w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
    done, _ = run_pipeline(pipelines.validate(w, cfg, test_sets=test_sets, log_model=log_model), cfg.scale)
    return {**done["validate"], "segmentation": done["segmentation"]}


if __name__ == "__main__":  # python -m dermt2im.flows.validate WORKDIR [CONFIG]
    import sys

    validate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
