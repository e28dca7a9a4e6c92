"""What readers see: each stage's own table joined by the row's id (every manifest has one writer).

* ``seeds_view(manifest)``: a seeds or test-set manifest (ingest) with what preprocess made of each
  row (``processed/<name>``), joined by ``source_path`` where the bytes are the ones preprocess saw
  (``sample_id``). A row preprocess could not use is shown ``quarantined`` with its reason; a file
  that could not be read (``unreadable``) says that the next preprocess tries it again.
* ``synthetic_view(workdir)``: the renders (generate) and the imported sets (import-synthetic) with
  the quality gate's verdict on each (``quality.parquet``), joined by ``sample_key`` where the
  verdict is on the same bytes (``sha256``). An image without one is ``rendered``: not yet assessed.

Nothing here writes; the joins are by key, vectorised (a few thousand rows cost milliseconds).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dermt2im.core import identity
from dermt2im.core.manifest import (
    IMPORTED,
    PROCESSED,
    QUALITY,
    SEEDS,
    SYNTHETIC,
    processed_location,
    read_manifest,
)

PROCESSED_COLUMNS = ("processed_path", "preprocess_key", "hair_fraction", "hair_changed_fraction")
QUALITY_COLUMNS = tuple(c for c in QUALITY.columns if c not in ("sample_key", "sha256"))
UNREADABLE_NOTE = "; the next preprocess tries again"


def _same(a: pd.Series, b: pd.Series) -> pd.Series:
    return a.notna() & b.notna() & (a.astype(object) == b.astype(object))


def seeds_view(manifest: str | Path) -> pd.DataFrame:
    """The rows of a seeds (or test-set) manifest with preprocess's columns joined (see the module)."""
    seeds = read_manifest(manifest, SEEDS)
    processed = read_manifest(processed_location(manifest), PROCESSED)
    out = seeds.copy()
    for col in PROCESSED_COLUMNS:
        out[col] = pd.Series([None] * len(out), index=out.index, dtype=object if col in (
            "processed_path", "preprocess_key") else float)
    if processed.empty or seeds.empty:
        return out
    joined = seeds[["source_path", "sample_id", "status"]].merge(
        processed.rename(columns={"sample_id": "p_sample_id", "status": "p_status", "reason": "p_reason"}),
        on="source_path", how="left")
    joined.index = seeds.index
    current = _same(joined["sample_id"], joined["p_sample_id"])  # bytes changed since: nothing joined
    made = current & joined["p_status"].eq("processed")
    for col in PROCESSED_COLUMNS:
        out.loc[made, col] = joined.loc[made, col]
    refused = current & joined["p_status"].isin(["failed", "unreadable"]) & seeds["status"].eq("accepted")
    if refused.any():
        out.loc[refused, "status"] = "quarantined"
        out.loc[refused, "reason"] = joined.loc[refused, "p_reason"].astype(str) + [
            UNREADABLE_NOTE if s == "unreadable" else "" for s in joined.loc[refused, "p_status"]]
        out.loc[refused, "split"] = None
    return out


def made_synthetic(workdir) -> pd.DataFrame:
    """Every synthetic image as it came in, renders then imports (no verdicts)."""
    renders = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    imported = read_manifest(workdir.imported_manifest, IMPORTED)
    if imported.empty:
        return renders
    if renders.empty:
        return imported
    return pd.concat([renders, imported], ignore_index=True)


def synthetic_view(workdir) -> pd.DataFrame:
    """Every render and imported image with the quality gate's verdict joined (see the module)."""
    made = made_synthetic(workdir)
    verdicts = read_manifest(workdir.quality_manifest, QUALITY)
    out = made.copy()
    for col in QUALITY_COLUMNS:
        if col not in out.columns:
            out[col] = None
    if made.empty or verdicts.empty:
        out["memorised"] = out["memorised"].astype("boolean")
        return out
    joined = made[["sample_key", "sha256"]].merge(
        verdicts.rename(columns={"sha256": "q_sha256", "status": "q_status", "reason": "q_reason"}),
        on="sample_key", how="left")
    joined.index = made.index
    judged = _same(joined["sha256"], joined["q_sha256"]) & made["status"].ne("quarantined")
    for col in QUALITY_COLUMNS:
        if col in ("status", "reason"):
            continue
        out[col] = out[col].astype(object)
        out.loc[judged, col] = joined.loc[judged, col]
    out.loc[judged, "status"] = joined.loc[judged, "q_status"]
    out.loc[judged, "reason"] = joined.loc[judged, "q_reason"]
    out["memorised"] = out["memorised"].astype("boolean")
    return out


def seeds_digest(manifest: str | Path) -> str:
    """Digest of a seeds or test-set manifest as readers see it (preprocess's columns included)."""
    view = seeds_view(manifest)
    return identity.frame_digest(view, list(view.columns))
