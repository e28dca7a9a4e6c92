"""Test fixtures for manifests: rows given in the shape readers see (the joined views,
``dermt2im.core.views``), written as the stages write them, each table by its own writer's schema."""

from __future__ import annotations

import pandas as pd

from dermt2im.core.manifest import (
    PROCESSED,
    QUALITY,
    SEEDS,
    SYNTHETIC,
    processed_location,
    write_manifest,
)
from dermt2im.core.views import PROCESSED_COLUMNS, seeds_view, synthetic_view


def write_seeds(manifest, rows) -> pd.DataFrame:
    """Seeds (or test-set) rows with preprocess's columns (``processed_path`` ...): the ingest columns
    into ``manifest``, the rest into its processed table. Returns the view."""
    df = pd.DataFrame(rows).reset_index(drop=True)
    write_manifest(df[[c for c in df.columns if c in SEEDS.columns]], manifest, SEEDS)
    if "processed_path" in df.columns:
        made = df[df["processed_path"].notna()]
        processed = pd.DataFrame({"source_path": made["source_path"], "sample_id": made["sample_id"],
                                  "status": "processed"})
        for col in PROCESSED_COLUMNS:
            processed[col] = made[col] if col in made.columns else None
        write_manifest(processed, processed_location(manifest), PROCESSED)
    return seeds_view(manifest)


def write_synthetic(workdir, rows) -> pd.DataFrame:
    """Synthetic rows as readers see them: the render columns into ``synthetic.parquet`` (status
    ``rendered``), and for rows with a verdict (``status`` accepted / rejected) the gate's columns
    into ``quality.parquet``. Returns the view."""
    df = pd.DataFrame(rows).reset_index(drop=True)
    status = df["status"] if "status" in df.columns else pd.Series([None] * len(df))
    made = df[[c for c in df.columns if c in SYNTHETIC.columns]].assign(
        status=["quarantined" if s == "quarantined" else "rendered" for s in status],
        reason=[r if s == "quarantined" else None for s, r in zip(status, df.get("reason", [None] * len(df)))])
    write_manifest(made, workdir.synthetic_manifest, SYNTHETIC)
    judged = df[status.isin(["accepted", "rejected"])]
    write_manifest(judged[[c for c in judged.columns if c in QUALITY.columns]], workdir.quality_manifest, QUALITY)
    return synthetic_view(workdir)
