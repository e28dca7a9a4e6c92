"""What the gate and the audit need from the workdir's real seeds: every accepted seed with a
processed image, indexed for the memorisation audit (``audit.SeedIndex``) and measured like a
synthetic image (``checks.image_metrics`` and every detector's score), for the calibrated cuts, the
per-check rejection counts and the real flag rates of the shortcut audit.

The measures are cached by content in ``W/.stamps/quality/seed-measures.json`` (per processed
image: sample id and preprocess key; and per version of the checks' code), and the index in
``W/quality/seed-index/`` (per seed set), so a large seed set is measured and indexed once. A seed's
``hair_fraction`` score is the one preprocessing measured before removing its hair (the processed
image has none left).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.fileio import atomic_path, atomic_write_text
from dermt2im.core.views import seeds_view
from dermt2im.core.specs import QualityConfig
from dermt2im.core.workdir import Workdir
from dermt2im.quality.audit import LocalFeatures, SeedIndex, build_index, merge_indexes
from dermt2im.quality.checks import detector_scores, image_metrics
from dermt2im.quality.images import load_rgb, workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seeds:
    index: SeedIndex
    rows: pd.DataFrame  # one per indexed seed: sample_id, label, and every measure and detector score
    key: str = ""  # the index's key (``index_key``): what the audit's answers depend on

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


# --- the seed index, kept ---------------------------------------------------------------------------
# The audit's index of the seeds (SIFT keypoints of every seed, thousands for the paper) is built once
# per seed set and kept in W/quality/seed-index/<key>.npz (plain arrays, no pickle): the processes
# measuring images while rendering goes on read it instead of each building it again.


def index_key(df: pd.DataFrame) -> str:
    """The key of the index of these seeds (in this order: answers name seeds by position)."""
    return identity.content_key("seed-index", identity.code_digest(__name__),
                                [f"{s}:{k}" for s, k in zip(df["sample_id"], df["preprocess_key"])])


def _index_path(workdir: Workdir, key: str) -> Path:
    return workdir.quality / "seed-index" / f"{key[:24]}.npz"


def _save_index(path: Path, index: SeedIndex) -> None:
    n = index.size
    arrays = {
        "ids": np.array(index.ids, dtype="U128"), "refs": index.refs.astype(np.float32),
        "counts": np.array([len(f.points) for f in index.features], np.int64),
        "points": np.concatenate([f.points for f in index.features]) if n else np.zeros((0, 2), np.float32),
        "descriptors": (np.concatenate([f.descriptors for f in index.features]) if n
                        else np.zeros((0, 128), np.uint8)),
        "sides": np.array([f.side for f in index.features], np.int64),
        "thumbs": np.stack(index.thumbs) if n else np.zeros((0, 96, 96, 3), np.uint8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    for old in path.parent.glob("*.npz"):  # the indexes of earlier seed sets
        if old != path:
            old.unlink(missing_ok=True)


def _load_index(path: Path) -> SeedIndex | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    ends = np.cumsum(arrays["counts"])
    starts = ends - arrays["counts"]
    features = [LocalFeatures(arrays["points"][a:b], arrays["descriptors"][a:b], int(side))
                for a, b, side in zip(starts, ends, arrays["sides"])]
    return SeedIndex([str(i) for i in arrays["ids"]], arrays["refs"], features, list(arrays["thumbs"]))


def seed_index(workdir: Workdir, df: pd.DataFrame | None = None) -> tuple[str, SeedIndex]:
    """The key and the audit index of the accepted seeds (``df``: ``accepted_seeds``), read when kept,
    else built and kept, once, under a lock (processes measuring at once wait for the first)."""
    from dermt2im.core.writers import writer_lock

    df = accepted_seeds(workdir) if df is None else df
    key = index_key(df)
    path = _index_path(workdir, key)
    index = _load_index(path) if path.is_file() else None
    if index is None:
        with writer_lock(path):
            index = _load_index(path) if path.is_file() else None
            if index is None:
                index = _build_index(workdir, df)
                _save_index(path, index)
    return key, index


def _build_index(workdir: Workdir, df: pd.DataFrame) -> SeedIndex:
    def one(i: int) -> SeedIndex:
        rgb = load_rgb(storage.resolve(df.at[i, "processed_path"], workdir.root))
        return build_index([(str(df.at[i, "sample_id"]), rgb)])

    with ThreadPoolExecutor(workers()) as pool:
        return merge_indexes(list(pool.map(one, range(len(df)))))


def load_seeds(workdir: Workdir, q: QualityConfig) -> Seeds:
    """Index and measure every accepted, processed seed (the index and the measures from their caches
    where they have them)."""
    df = accepted_seeds(workdir)
    key = _measures_key(q)
    cache = _read_cache(_cache_path(workdir), key)
    content = [f"{s}:{k}" for s, k in zip(df["sample_id"], df["preprocess_key"])]

    def one(i: int) -> dict[str, float]:
        measures = cache.get(content[i])
        if measures is None:
            rgb = load_rgb(storage.resolve(df.at[i, "processed_path"], workdir.root))
            measures = {**image_metrics(rgb), **detector_scores(rgb, q)}
        return measures

    with ThreadPoolExecutor(workers()) as pool:
        done = list(pool.map(one, range(len(df))))
    measured = dict(zip(content, done))
    if measured.keys() - cache.keys() or len(cache) != len(measured):
        atomic_write_text(_cache_path(workdir), json.dumps({"key": key, "measures": measured}, sort_keys=True))
    index_id, index = seed_index(workdir, df)
    rows = pd.DataFrame(done)
    rows.insert(0, "sample_id", df["sample_id"].tolist())
    rows.insert(1, "label", df["label"].tolist())
    if len(df):  # hair as preprocessing found it, before removing it
        rows["hair_fraction"] = df["hair_fraction"].astype(float).fillna(0.0).to_numpy()
    return Seeds(index, rows, index_id)
