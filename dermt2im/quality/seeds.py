"""What the gate and the audit need from the workdir's real seeds: every accepted seed with a
processed image, indexed for the memorisation audit (``audit.SeedIndex``) and measured like a
synthetic image (``checks.image_metrics`` and every detector's score), for the calibrated cuts, the
per-check rejection counts and the real flag rates of the shortcut audit.

The measures are cached by content in ``W/.stamps/quality/seed-measures.json`` (per processed
image: sample id and preprocess key; and per version of the checks' code), so a large seed set is
measured once. A seed's ``hair_fraction`` score is the one preprocessing measured before removing
its hair (the processed image has none left).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.fileio import atomic_write_text
from dermt2im.core.views import seeds_view
from dermt2im.core.specs import QualityConfig
from dermt2im.core.workdir import Workdir
from dermt2im.quality.audit import SeedIndex, build_index, merge_indexes
from dermt2im.quality.checks import detector_scores, image_metrics
from dermt2im.quality.images import load_rgb, workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seeds:
    index: SeedIndex
    rows: pd.DataFrame  # one per indexed seed: sample_id, label, and every measure and detector score

    @property
    def measures(self) -> dict[str, list[float]]:
        return {c: self.rows[c].astype(float).tolist() for c in self.rows.columns if c not in ("sample_id", "label")}


def _measures_key(q: QualityConfig) -> str:
    # the ruler threshold decides which labels beside a ruler are not text
    return identity.content_key("seed-measures", identity.code_digest(__name__), q.max_ruler_score)


def _cache_path(workdir: Workdir) -> Path:
    return workdir.stamps / "quality" / "seed-measures.json"


def _read_cache(path: Path, key: str) -> dict[str, dict[str, float]]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(record, dict) and record.get("key") == key and isinstance(record.get("measures"), dict)
    return record["measures"] if ok else {}


def accepted_seeds(workdir: Workdir) -> pd.DataFrame:
    """Accepted seed rows whose processed image exists."""
    df = seeds_view(workdir.seeds_manifest)
    df = df[(df["status"] == "accepted") & df["processed_path"].notna()].drop_duplicates("sample_id")
    present = [storage.is_file(storage.resolve(p, workdir.root)) for p in df["processed_path"]]
    for sid, p, ok in zip(df["sample_id"], df["processed_path"], present):
        if not ok:
            log.warning("seed %s: processed image %s is missing; left out of the gate's calibration and the audit",
                        sid, p)
    return df[pd.Series(present, index=df.index, dtype=bool)].reset_index(drop=True)


def load_seeds(workdir: Workdir, q: QualityConfig) -> Seeds:
    """Index and measure every accepted, processed seed (measures from the cache where it has them)."""
    df = accepted_seeds(workdir)
    key = _measures_key(q)
    cache = _read_cache(_cache_path(workdir), key)
    content = [f"{s}:{k}" for s, k in zip(df["sample_id"], df["preprocess_key"])]

    def one(i: int) -> tuple[SeedIndex, dict[str, float]]:
        rgb = load_rgb(storage.resolve(df.at[i, "processed_path"], workdir.root))
        measures = cache.get(content[i])
        if measures is None:
            measures = {**image_metrics(rgb), **detector_scores(rgb, q)}
        return build_index([(str(df.at[i, "sample_id"]), rgb)]), measures

    with ThreadPoolExecutor(workers()) as pool:
        done = list(pool.map(one, range(len(df))))
    measured = {c: m for c, (_, m) in zip(content, done)}
    if measured.keys() - cache.keys() or len(cache) != len(measured):
        atomic_write_text(_cache_path(workdir), json.dumps({"key": key, "measures": measured}, sort_keys=True))
    rows = pd.DataFrame([m for _, m in done])
    rows.insert(0, "sample_id", df["sample_id"].tolist())
    rows.insert(1, "label", df["label"].tolist())
    if len(df):  # hair as preprocessing found it, before removing it
        rows["hair_fraction"] = df["hair_fraction"].astype(float).fillna(0.0).to_numpy()
    return Seeds(merge_indexes([i for i, _ in done]), rows)
