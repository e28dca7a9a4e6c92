"""Seed preparation: (phantoms when no SOURCE) -> ingest -> preprocess, for the seeds and every
unseen real test set (``dermt2im.pipelines.seeds``)."""

from __future__ import annotations

from prefect import flow

from dermt2im import pipelines
from dermt2im.core.views import seeds_digest
from dermt2im.core.workdir import DEFAULTS, open_workdir
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.tasks.stage import run_pipeline


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
    done, _ = run_pipeline(pipelines.seeds(w, cfg, source=source, test_sets=test_sets, layout=layout))
    ingested = done["ingest"]
    return {"seeds": str(w.seeds_manifest), "seeds_digest": seeds_digest(w.seeds_manifest),
            "test_sets": {name: s["manifest"] for name, s in ingested.items() if name != "seeds"},
            "accepted": ingested["seeds"]["accepted"], "quarantined": ingested["seeds"]["quarantined"]}


if __name__ == "__main__":  # python -m dermt2im.flows.seeds WORKDIR [SOURCE]
    import sys

    prepare_seeds(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
