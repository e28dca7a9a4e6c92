"""Prefect tasks for the validation stage: plan, one task per (model, regime, seed), close, report.

The cell task is cached on content: the training mixture's rows, the validation rows, the test
manifests' digests, the validate config digest, the model, regime and seed, the code of the
modules that compute a cell, and the MLflow parent run it belongs to (the parent of an identical
comparison is resumed, so a re-run hits the cache; a wiped tracking store gives a new parent and
so a miss instead of a result pointing at runs that no longer exist).

Retries are for transient faults only: I/O and network hiccups (``tasks.caching.is_transient``), a
locked SQLite tracking store, and CUDA out-of-memory, which is retried with half the batch size.
"""

from __future__ import annotations


from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from dermt2im.core import storage
from dermt2im.validate import stage as val
from dermt2im.core.config import FactoryConfig
from dermt2im.core.workdir import Workdir
from tasks.caching import content_key, is_transient, retry_transient_only, source_of

# cell key -> how many times the cell hit CUDA OOM in this process (each halves the batch size)
_OOM_HALVINGS: dict[str, int] = {}


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _is_locked_store(exc: BaseException) -> bool:
    return "database is locked" in str(exc).lower()


def retry_cell(task, task_run, state) -> bool:
    """``retry_condition_fn`` of the cell task: transient I/O, a locked store, or CUDA OOM."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classified, never swallowed
        return is_transient(exc) or _is_oom(exc) or _is_locked_store(exc)
    return False


def _cell_cache_key(context, p) -> str:
    cfg: FactoryConfig = p["cfg"]
    plan: val.ValidationPlan = p["plan"]
    cell: val.Cell = p["cell"]
    return content_key(
        "validate-cell",
        val.cell_key(cfg, plan.inputs, cell),
        plan.parent_run_id,
        p.get("log_model", True),
    )


@task(name="validate-plan", cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient_only, tags=["cpu"])
def plan_task(workdir: str, cfg: FactoryConfig, test_sets: dict[str, str] | None = None) -> val.ValidationPlan:
    """Inputs, leakage check, mixtures and the (new or resumed) MLflow parent run."""
    return val.prepare(Workdir.of(workdir, cfg), cfg, dict(test_sets) if test_sets is not None else None)


@task(name="validate-cell", cache_key_fn=_cell_cache_key, persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_cell)
def cell_task(workdir: str, cfg: FactoryConfig, plan: val.ValidationPlan, cell: val.Cell,
              log_model: bool = True) -> val.CellResult:
    """Fine-tune and test one (model, regime, seed) in its own MLflow child run."""
    key = val.cell_key(cfg, plan.inputs, cell)
    halvings = _OOM_HALVINGS.get(key, 0)
    batch_size = max(1, cfg.validation.batch_size // (2**halvings))
    try:
        return val.run_cell(Workdir.of(workdir, cfg), cfg, plan, cell, log_model=log_model, batch_size=batch_size)
    except BaseException as exc:
        if _is_oom(exc):
            _OOM_HALVINGS[key] = halvings + 1
        raise


@task(name="validate-finish", cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient_only, tags=["cpu"])
def finish_task(workdir: str, cfg: FactoryConfig, plan: val.ValidationPlan,
                results: list[val.CellResult]) -> dict:
    """McNemar tests on the parent run, which is then closed."""
    report = val.finish(Workdir.of(workdir, cfg), cfg, plan, results, build_table=False, segmentation=False)
    return {"parent_run_id": report.parent_run_id, "experiment": report.experiment, "runs": report.runs,
            "reused": report.reused, "skipped": report.skipped}


@task(name="table-iv", cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient_only, tags=["cpu"])
def report_task(workdir: str, cfg: FactoryConfig, parent_run_id: str) -> dict[str, str]:
    """Table IV and Fig. 10 from MLflow; Table IV is published as a Prefect markdown artifact."""
    from dermt2im.validate.table import build_report

    paths = build_report(Workdir.of(workdir, cfg), cfg, parent_run_id=parent_run_id)
    create_markdown_artifact(
        key="table-iv",
        markdown=paths["table_md"].read_text(),
        description=f"Table IV rebuilt from MLflow comparison run {parent_run_id}",
    )
    return {k: str(v) for k, v in paths.items()}


def _segmentation_key(context, p) -> str:
    from dermt2im.validate import segmentation

    cfg: FactoryConfig = p["cfg"]
    images = segmentation.sample_images(Workdir.of(p["workdir"], cfg), cfg)
    files = [(path, storage.version_token(path)) for path in (sorted(images["path"]) if not images.empty else [])]
    v = cfg.validation
    return content_key("segmentation", p["workdir"], files, v.tiny, v.sam_model, v.segmentation_samples,
                       v.image_size, source_of(segmentation))


@task(name="segmentation-check", cache_key_fn=_segmentation_key, persist_result=True, retries=1,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def segmentation_task(workdir: str, cfg: FactoryConfig) -> dict:
    """The zero-shot SAM check; an unavailable model gives a message, not a failure."""
    from dermt2im.validate.segmentation import segmentation_check

    report = segmentation_check(Workdir.of(workdir, cfg), cfg)
    md = report.paths.get("md")
    if md is not None:
        create_markdown_artifact(key="segmentation-check", markdown=md.read_text(),
                                 description="SAM mask statistics, real vs synthetic")
    return {"status": report.status, "message": report.message, **{k: str(v) for k, v in report.paths.items()}}
