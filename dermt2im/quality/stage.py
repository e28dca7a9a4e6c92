"""The automatic quality gate and the memorisation audit over the synthetic manifest.

The paper discarded images "with noisy artifacts" by hand; here every image gets measured
(``checks``), compared with the seeds (``audit``) and with the other images (``dedupe``), and a
reason when it is rejected; ``report`` writes what people look at. Nothing is deleted: a rejected
image keeps its file, its manifest row gets ``status = rejected`` and a ``reason`` whose first word
is the check that failed.

``QualityStage`` is the stage: one unit, the whole synthetic set.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.manifest import SEEDS, SYNTHETIC, read_manifest, rewrite
from dermt2im.core.specs import QualityConfig
from dermt2im.core.workdir import Workdir
from dermt2im.core.writers import writer_lock
from dermt2im.quality.audit import audit, embed, load_seeds
from dermt2im.quality.checks import check_image, reason_code
from dermt2im.quality.dedupe import mark_duplicates, phash, phash_hex
from dermt2im.quality.images import load_rgb
from dermt2im.quality.report import (
    QualityReport,
    _write_audit,
    _write_grids,
    _write_quality_reports,
)
from dermt2im.stage import Stamps

log = logging.getLogger(__name__)
QUALITY_COLUMNS = [
    "status",
    "reason",
    "grey_std",
    "saturated_fraction",
    "sharpness",
    "high_frequency_ratio",
    "lesion_fraction",
    "lesion_contrast",
    "phash",
    "duplicate_of",
    "nearest_seed",
    "nearest_seed_distance",
    "memorised",
]


def _measure(path: Path | str, q: QualityConfig) -> dict:
    """Everything assess needs from one image; the full-size pixels are not kept (thousands of images)."""
    try:
        rgb = load_rgb(path)
    except FileNotFoundError:
        return {"reason": "missing: the PNG is not on disk (render again)", "metrics": {}}
    except Exception as err:  # noqa: BLE001 - recorded as the rejection reason
        return {"reason": f"unreadable: {err}", "metrics": {}}
    reason, metrics = check_image(rgb, q)
    return {
        "reason": reason,
        "metrics": metrics,
        "rgb_small": cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA),
        "pixels": hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest(),
        "phash": phash(rgb),
        "embedding": embed(rgb),
    }


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def measure_all(workdir: Workdir, df: pd.DataFrame, q: QualityConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Every image measured (in threads): the frame with the quality columns filled, and the measures."""
    paths = [storage.resolve(p, workdir.root) if isinstance(p, str) else Path("/nonexistent") for p in df["path"]]
    with ThreadPoolExecutor(_workers()) as pool:
        measured = list(pool.map(lambda p: _measure(p, q), paths))
    out = df.copy()
    for c in QUALITY_COLUMNS:
        out[c] = None
    for i, m in enumerate(measured):
        for k, v in m["metrics"].items():
            out.at[i, k] = v
        if "phash" in m:
            out.at[i, "phash"] = phash_hex(m["phash"])
    return out, measured


def assess(workdir: Workdir, q: QualityConfig) -> QualityReport:
    """Gate and audit every rendered image; write status / reason / metrics and the reports."""
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    if df.empty:
        log.warning("no synthetic images recorded in %s: nothing to assess", workdir.synthetic_manifest)
        return QualityReport(0, 0, {}, 0, workdir.reports, _write_quality_reports(workdir, df, q))
    out, measured = measure_all(workdir, df, q)
    reasons: list[str | None] = [m["reason"] for m in measured]

    # memorisation audit: every readable image, whatever its other checks say
    seeds = load_seeds(workdir)
    if not seeds.ids:
        log.warning("memorisation audit: no accepted seed images with processed_path in %s", workdir.seeds_manifest)
    audit_rows = audit(
        {i: m["embedding"] for i, m in enumerate(measured) if "embedding" in m}, seeds, q.memorisation_threshold)
    for r in audit_rows:
        i = r["i"]
        out.at[i, "nearest_seed"], out.at[i, "nearest_seed_distance"] = seeds.ids[r["seed"]], r["distance"]
        out.at[i, "memorised"] = r["memorised"]
        if r["memorised"] and q.exclude_memorised and reasons[i] is None:
            reasons[i] = f"near-copy of seed {seeds.ids[r['seed']]}"

    # duplicates among the images still accepted, the earliest sample (lowest index) kept
    order = sorted((i for i in range(len(out)) if reasons[i] is None),
                   key=lambda i: (int(out.at[i, "index"]), str(out.at[i, "label"])))
    for i, (reason, j) in mark_duplicates(measured, order, q.near_duplicate_hamming).items():
        reasons[i] = reason.format(out.at[j, "sample_key"])
        out.at[i, "duplicate_of"] = out.at[j, "sample_key"]

    out["reason"] = reasons
    out["status"] = ["rejected" if r else "accepted" for r in reasons]
    out["memorised"] = out["memorised"].astype("boolean")
    _save(workdir, out)

    files = _write_quality_reports(workdir, out, q)
    files.update(_write_grids(workdir, out, measured))
    files.update(_write_audit(workdir, out, measured, seeds, audit_rows, q))
    codes = pd.Series([reason_code(r) for r in reasons if r]).value_counts()
    report = QualityReport(
        accepted=int((out["status"] == "accepted").sum()), rejected=int((out["status"] == "rejected").sum()),
        reasons={str(k): int(v) for k, v in codes.items()}, memorised=int(out["memorised"].fillna(False).sum()),
        report_dir=workdir.reports, files=files, seeds_compared=len(seeds.ids),
    )
    log.info("quality gate: %d accepted, %d rejected %s; %d near-copies of seeds", report.accepted,
             report.rejected, report.reasons, report.memorised)
    return report


def _save(workdir: Workdir, assessed: pd.DataFrame) -> None:
    """Write the quality columns back, under the manifest's writer lock, for rows whose image is
    unchanged (a shard re-rendered meanwhile keeps its fresh 'rendered' row; on an object store a
    part appended after this read is kept and still wins)."""
    by_key = assessed.set_index("sample_key")

    def with_quality(current: pd.DataFrame) -> pd.DataFrame:
        current = current.copy()
        for i, key in enumerate(current["sample_key"]):
            if key in by_key.index and by_key.at[key, "sha256"] == current.at[i, "sha256"]:
                for c in QUALITY_COLUMNS:
                    current.at[i, c] = by_key.at[key, c]
        return current

    with writer_lock(workdir.synthetic_manifest, workdir.locks):
        rewrite(workdir.synthetic_manifest, SYNTHETIC, with_quality)


# --------------------------------------------------------------------------------------------------
# the stage

QUALITY_MODULES = ("checks", "dedupe", "audit", "report", "images", "stage")


def report_summary(report: QualityReport) -> dict:
    return {"accepted": report.accepted, "rejected": report.rejected, "reasons": report.reasons,
            "memorised": report.memorised, "seeds_compared": report.seeds_compared,
            "report_dir": str(report.report_dir), "files": {k: str(v) for k, v in report.files.items()},
            "text": report.summary()}


class QualityStage:
    """The quality gate and memorisation audit: one unit, the whole synthetic set; done when its
    stamp holds the current key (images, seeds, ``quality`` spec, code), the reports exist and no
    image waits for assessment."""

    name = "quality"
    UNIT = "synthetic"

    def __init__(self, workdir: Workdir, spec: QualityConfig) -> None:
        self.workdir, self.spec = workdir, spec
        self.stamps = Stamps(workdir.stamps, self.name)

    def units(self) -> list[str]:
        return [self.UNIT]

    def describe(self, unit: str) -> str:
        return "quality gate and memorisation audit"

    def key(self, unit: str) -> str:
        w = self.workdir
        images = identity.manifest_digest(w.synthetic_manifest, SYNTHETIC, ["sample_key", "sha256", "render_key"])
        seeds = identity.manifest_digest(w.seeds_manifest, SEEDS, ["source_path", "sample_id", "status", "processed_path"])
        modules = [importlib.import_module(f"dermt2im.quality.{m}") for m in QUALITY_MODULES]
        return identity.content_key("assess", images, seeds, identity.spec_digest(self.spec),
                                    identity.code_digest(*modules))

    def finished(self, unit: str) -> dict | None:
        df = read_manifest(self.workdir.synthetic_manifest, SYNTHETIC)
        if (df["status"] == "rendered").any() or not (self.workdir.reports / "quality.json").is_file():
            return None
        return self.stamps.matching(unit, self.key(unit))

    def run(self, unit: str) -> dict:
        summary = report_summary(assess(self.workdir, self.spec))
        self.stamps.write(unit, self.key(unit), summary)
        return summary

    def close(self, results) -> dict:
        return results[0]
