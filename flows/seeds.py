"""Seed preparation: (phantoms when no SOURCE) -> ingest -> preprocess, for the seeds and every
unseen real test set."""

from __future__ import annotations

from prefect import flow

from dermt2im.core.identity import manifest_digest
from dermt2im.core.manifest import SEEDS
from dermt2im.core.workdir import DEFAULTS, open_workdir
from dermt2im.ingest.stage import IngestStage, seed_datasets
from dermt2im.phantoms import PhantomStage
from dermt2im.preprocess.stage import PreprocessStage
from dermt2im.stage import Stamps
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.tasks.artifacts import publish_datasets
from dermt2im.tasks.stage import run_stage


@flow(name="prepare-seeds", log_prints=True, flow_run_name=in_workdir("seeds and test sets"))
def prepare_seeds(
    workdir: str,
    source: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    layout: str | None = None,
    test_sets: dict[str, str] | None = None,
) -> dict:
    """Ingest and preprocess the seed set and every test set; returns their manifests.

    With no ``source`` the factory makes its own phantom seed set and phantom test sets of each
    configured style, so a new user sees the whole pipeline work offline.
    """
    w, cfg = open_workdir(workdir, config, overrides, fallback="smoke" if source is None else DEFAULTS,
                          check=orchestration)
    tests = {**cfg.validation.test_sets, **(test_sets or {})}
    if source is None:
        phantoms = run_stage(PhantomStage(cfg.phantoms, w.data, Stamps(w.stamps, "phantoms")))
        source = phantoms.pop("seeds")
        tests = {**phantoms, **tests}
    datasets = seed_datasets(w, source, tests, layout)
    ingested = run_stage(IngestStage(cfg.ingest, datasets, w))
    processed = run_stage(PreprocessStage(cfg.preprocess, {d.name: d.manifest for d in datasets}, w.processed,
                                          max_pixels=cfg.ingest.max_pixels, workers=cfg.runtime.preprocess.workers, locks=w.locks))
    publish_datasets("ingest", ingested)
    publish_datasets("preprocess", processed)
    return {"seeds": str(w.seeds_manifest), "seeds_digest": manifest_digest(w.seeds_manifest, SEEDS),
            "test_sets": {d.name: d.manifest for d in datasets if d.split == "test"},
            "accepted": ingested["seeds"]["accepted"], "quarantined": ingested["seeds"]["quarantined"]}


if __name__ == "__main__":  # python -m dermt2im.flows.seeds WORKDIR [SOURCE]
    import sys

    prepare_seeds(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
