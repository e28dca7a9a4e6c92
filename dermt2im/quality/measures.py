"""What the gate measures on each image, measured once per image bytes and kept.

The costly part of the gate is per image and depends on no calibrated cut: the image measures and
detector scores (``checks.gate_measures``), the hashes and thumbnails duplicates and grids need, what
the typicality embedding sees (``fidelity.embeddings.seed_input``), the skin tone around the lesion
(``fidelity.skin_tone``) and the memorisation audit against the seed index (``audit``). ``measure``
computes all of it from the pixels; the gate's decisions (cuts calibrated on the seeds, duplicates
across the set, the shortcut audit) are taken later, on the whole set, from these measures alone
(``stage.assess``), so an image measured while rendering goes on gets the verdict it would get if
measured after.

The cache lives in ``W/quality/measures/`` and belongs to the quality stage: one row per image bytes
(``sample_key``, ``sha256`` of the bytes measured) and ``measures_key`` (this code and the one setting
the scores depend on), with the audit's answer under its own ``audit_key`` (the seed index and the
audit's settings: new seeds redo the audit, not the rest). Each measuring task writes its rows as one
Parquet part (a new file, written whole: many processes may add parts at once, nobody reads and
rewrites); the stage folds the parts into ``measures.parquet`` when it closes (``MeasureCache.fold``).
Plain Parquet, arrays as raw bytes of a known shape: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermt2im.core import identity, storage
from dermt2im.core.fileio import atomic_path, sha256_bytes
from dermt2im.core.specs import QualityConfig
from dermt2im.fidelity.embeddings import IMAGE_SIZE, seed_input
from dermt2im.fidelity.skin_tone import SkinTone, skin_tone
from dermt2im.quality.audit import AuditResult, SeedIndex, audit_image
from dermt2im.quality.checks import SCORE_COLUMNS, gate_measures
from dermt2im.quality.dedupe import THUMB_SIDE, phash, phash_hex, thumbnail

log = logging.getLogger(__name__)

GRID_SIDE = 96  # the grids' cells (``figures.write_grids``)
METRICS = ("grey_std", "saturated_fraction", "sharpness", "high_frequency_ratio", "lesion_fraction",
           "lesion_contrast", *SCORE_COLUMNS.values())
ARRAYS = {"rgb_small": GRID_SIDE, "thumb": THUMB_SIDE, "seed_input": IMAGE_SIZE}  # square RGB uint8, by side
TONE = ("ita", "skin_tone", "skin_fraction", "skin_lightness", "skin_b")
SCHEMA = pa.schema(
    [pa.field("sample_key", pa.string()), pa.field("sha256", pa.string()), pa.field("measures_key", pa.string())]
    + [pa.field(m, pa.float64()) for m in METRICS]
    + [pa.field("pixels", pa.string()), pa.field("phash", pa.string())]
    + [pa.field(a, pa.binary()) for a in ARRAYS]
    + [pa.field("ita", pa.float64()), pa.field("skin_tone", pa.string()), pa.field("skin_fraction", pa.float64()),
       pa.field("skin_lightness", pa.float64()), pa.field("skin_b", pa.float64())]
    + [pa.field("audit_key", pa.string()), pa.field("audit_seed", pa.int64()), pa.field("audit_distance", pa.float64()),
       pa.field("audit_inliers", pa.int64()), pa.field("audit_memorised", pa.bool_()),
       pa.field("audit_method", pa.string())]
)
Measured = dict[str, Any]  # one image's measures, as ``measure`` returns them (see ``from_row``)


def measures_key(q: QualityConfig) -> str:
    """What the measures depend on: the gate's code and the ruler threshold (the labels beside a
    flagged ruler are not text)."""
    return identity.content_key("gate-measures", identity.code_digest(__name__), q.max_ruler_score)


def audit_key(index_key: str, q: QualityConfig) -> str:
    """What the audit's answer depends on: the seed index and the audit's settings."""
    return identity.content_key("audit", index_key, q.memorisation_min_inliers, q.memorisation_threshold)


def read_image(path: str | Path) -> tuple[np.ndarray, str]:
    """RGB pixels of a local image or one on an image store, and the sha256 of its bytes."""
    import io

    from PIL import Image

    data = storage.read_bytes(path)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), sha256_bytes(data)


def measure_audit(rgb: np.ndarray, index: SeedIndex, q: QualityConfig) -> AuditResult:
    return audit_image(rgb, index, min_inliers=q.memorisation_min_inliers, global_threshold=q.memorisation_threshold)


def measure(rgb: np.ndarray, q: QualityConfig, index: SeedIndex | None) -> Measured:
    """Everything the gate keeps from one image (never the full pixels); the audit when ``index`` is given."""
    tone = skin_tone(rgb)
    out: Measured = {
        "metrics": gate_measures(rgb, q),
        "rgb_small": cv2.resize(np.ascontiguousarray(rgb[..., :3]), (GRID_SIDE, GRID_SIDE), interpolation=cv2.INTER_AREA),
        "thumb": thumbnail(rgb),
        "seed_input": seed_input(rgb),
        "pixels": hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest(),
        "phash": phash(rgb),
        "skin_tone": tone,
    }
    if index is not None:
        out["audit"] = measure_audit(rgb, index, q)
    return out


def measure_file(path: str | Path, q: QualityConfig, index: SeedIndex | None,
                 have: Measured | None = None) -> Measured:
    """``measure`` on the image at ``path``, with the ``sha256`` of the bytes read; ``have``: measures of
    these bytes already known (only the audit is then redone). A missing or unreadable file gets its
    ``reason`` and nothing else."""
    try:
        rgb, sha = read_image(path)
    except FileNotFoundError:
        return {"reason": "missing: the image file is not there (render or import again)"}
    except Exception as err:  # noqa: BLE001 - recorded as the rejection reason
        return {"reason": f"unreadable: {err}"}
    if have is not None and have.get("sha256") == sha:
        out = {k: v for k, v in have.items() if k != "audit"}
        if index is not None:
            out["audit"] = measure_audit(rgb, index, q)
    else:
        out = measure(rgb, q, index)
    out["sha256"] = sha
    return out


# --- the cache ------------------------------------------------------------------------------------


def to_row(sample_key: str, m: Measured, keys: tuple[str, str | None]) -> dict[str, Any]:
    """One cache row of the measures ``m`` of ``sample_key``; ``keys``: (measures key, audit key or
    None when ``m`` has no audit)."""
    tone: SkinTone = m["skin_tone"]
    row: dict[str, Any] = {"sample_key": sample_key, "sha256": m["sha256"], "measures_key": keys[0],
                           **{k: float(m["metrics"][k]) for k in METRICS},
                           "pixels": m["pixels"], "phash": phash_hex(m["phash"]),
                           **{a: np.ascontiguousarray(m[a], np.uint8).tobytes() for a in ARRAYS},
                           "ita": tone.ita, "skin_tone": tone.category, "skin_fraction": tone.skin_fraction,
                           "skin_lightness": tone.lightness, "skin_b": tone.b}
    a: AuditResult | None = m.get("audit")
    if a is not None and keys[1] is not None:
        row.update(audit_key=keys[1], audit_seed=a.seed, audit_distance=a.distance, audit_inliers=a.inliers,
                   audit_memorised=a.memorised, audit_method=a.method)
    return row


def from_row(row: dict[str, Any], audit: str | None) -> Measured:
    """The measures of a cache row; its audit only when made under the audit key ``audit``."""
    out: Measured = {
        "sha256": row["sha256"],
        "metrics": {k: float(row[k]) for k in METRICS},
        "pixels": row["pixels"],
        "phash": int(row["phash"], 16),
        **{a: np.frombuffer(row[a], np.uint8).reshape(side, side, 3) for a, side in ARRAYS.items()},
        "skin_tone": SkinTone(float(row["ita"]), str(row["skin_tone"]), float(row["skin_fraction"]),
                              float(row["skin_lightness"]), float(row["skin_b"])),
    }
    if audit is not None and row.get("audit_key") == audit:
        out["audit"] = AuditResult(int(row["audit_seed"]), float(row["audit_distance"]), int(row["audit_inliers"]),
                                   bool(row["audit_memorised"]), str(row["audit_method"]))
    return out


class MeasureCache:
    """The measures of every image measured in a workdir (see the module docstring)."""

    BASE = "measures.parquet"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def append(self, rows: Sequence[dict[str, Any]]) -> Path | None:
        """Add rows as a new part, written whole under a temporary name (safe for many writers)."""
        if not rows:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
        with atomic_path(part) as tmp:
            pq.write_table(pa.Table.from_pylist(list(rows), schema=SCHEMA), tmp)
        return part

    def _read(self, path: Path) -> pd.DataFrame | None:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as err:
            log.warning("measure cache %s is unreadable (%s); its images are measured again", path, err)
            return None
        if not table.schema.equals(SCHEMA, check_metadata=False):
            return None  # written by another version of this code: its keys would not match anyway
        return table.to_pandas()

    def read(self) -> tuple[pd.DataFrame, list[Path]]:
        """Every row (later parts win over earlier ones and over the base), and the parts read."""
        parts = self.parts()
        frames = [f for f in (self._read(p) for p in [self.folder / self.BASE, *parts] if p.is_file()) if f is not None]
        if not frames:
            return pd.DataFrame(columns=SCHEMA.names), parts
        rows = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return rows.drop_duplicates(["sample_key", "sha256", "measures_key"], keep="last"), parts

    def lookup(self, images: pd.DataFrame, measures: str, audit: str | None) -> dict[int, Measured]:
        """Measures of the rows of ``images`` (``sample_key``, ``sha256``) made under ``measures``,
        by row position; each with its audit when made under ``audit``."""
        rows, _ = self.read()
        rows = rows[rows["measures_key"] == measures]
        if rows.empty or images.empty:
            return {}
        # rows with the current audit last, so that they win
        rows = rows.assign(_current=rows["audit_key"] == audit).sort_values("_current", kind="stable")
        by_key = {(r["sample_key"], r["sha256"]): r for r in rows.to_dict("records")}
        found = {}
        for i, pair in enumerate(zip(images["sample_key"], images["sha256"])):
            row = by_key.get(pair)
            if row is not None:
                found[i] = from_row(row, audit)
        return found

    def fold(self, keep: set[tuple[str, str]], measures: str) -> int:
        """Rewrite the base with the current rows of the images in ``keep`` (sample key, sha256) and
        delete the parts read; a part added meanwhile stays. One folder per workdir, folded by its
        stage only, under the workdir's lock for it. Returns how many parts were folded."""
        from dermt2im.core.writers import writer_lock

        with writer_lock(self.folder / self.BASE):
            rows, parts = self.read()
            if not parts:
                return 0
            current = rows[(rows["measures_key"] == measures)
                           & pd.Series([p in keep for p in zip(rows["sample_key"], rows["sha256"])], index=rows.index,
                                       dtype=bool)]
            with atomic_path(self.folder / self.BASE) as tmp:
                pq.write_table(pa.Table.from_pandas(current.reset_index(drop=True), schema=SCHEMA,
                                                    preserve_index=False), tmp)
            for part in parts:
                part.unlink(missing_ok=True)
            return len(parts)
