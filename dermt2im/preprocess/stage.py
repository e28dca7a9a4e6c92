"""Preprocessing of accepted seed images: DullRazor hair removal (``hair``), resize / centre-crop
(``resize``), on every core (``pool``).

``preprocess_manifest`` fills ``processed_path``, ``preprocess_key`` and ``hair_fraction`` of a seeds
(or test-set) manifest. Output files are content-addressed (``<sample_id>-<key[:8]>.png``) and carry
their key and hair fraction in PNG text chunks, so a run that was killed before it updated the
manifest loses no work: the next run adopts the finished files.

``PreprocessStage`` is the stage: one unit per dataset, done when every accepted row holds the
processed image its current key names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dermt2im.core import identity, storage
from dermt2im.core.imaging import DEFAULT_MAX_PIXELS
from dermt2im.core.manifest import SEEDS, is_transient, read_manifest, rewrite
from dermt2im.core.specs import PreprocessConfig
from dermt2im.core.writers import writer_lock
from dermt2im.preprocess.pool import TEXT_CHANGED, TEXT_HAIR, TEXT_KEY, _Job, run_jobs, worker_count

log = logging.getLogger(__name__)
_HAIR_PARAMS = ("hair_kernel_size", "hair_threshold", "hair_line_threshold", "hair_line_length", "hair_min_length",
                "hair_min_elongation", "inpaint_radius", "inpaint_method")


def preprocess_code() -> str:
    """The processing's code identity: ``dermt2im/preprocess/`` and every project module it imports."""
    return identity.code_digest(__name__)


def preprocess_key(sample_id: str, cfg: PreprocessConfig, code: str | None = None) -> str:
    """Key of one processed image (``identity.preprocess_key``): the input's content hash, the
    parameters that change the output (not the hair parameters when hair removal is off) and the
    processing's code (``preprocess_code``; pass it when keying many images)."""
    params = cfg.model_dump(mode="json")
    if not cfg.hair_removal:
        for name in _HAIR_PARAMS:
            params.pop(name, None)
    return identity.preprocess_key(sample_id, params, code or preprocess_code())


def processed_path(out_dir: Path, sample_id: str, key: str) -> Path:
    """Content-addressed output location: ``out_dir/<sample_id[:2]>/<sample_id>-<key[:8]>.png``."""
    return Path(out_dir) / sample_id[:2] / f"{sample_id}-{key[:8]}.png"


def read_processed_record(path: Path) -> tuple[str, float, float | None] | None:
    """(preprocess key, hair fraction, changed fraction) stored in a processed PNG, or None when absent
    / unreadable."""
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {})
            changed = text.get(TEXT_CHANGED)
            return text[TEXT_KEY], float(text[TEXT_HAIR]), float(changed) if changed is not None else None
    except (OSError, KeyError, ValueError, SyntaxError):
        return None


@dataclass(frozen=True)
class PreprocessReport:
    """Counts are manifest rows; byte-identical duplicates share one processed file."""

    manifest_path: Path | str  # a local path, or an fsspec URL (storage.manifests)
    processed: int
    cached: int
    failed: int
    seconds: float
    retried: int = 0  # rows quarantined earlier because their file could not be read, tried again

    def summary(self) -> str:
        rate = f", {self.processed / self.seconds:.1f} images/s" if self.processed and self.seconds > 0 else ""
        retried = (f"; tried again {self.retried} row(s) whose file could not be read before" if self.retried else "")
        return (
            f"preprocess {self.manifest_path}: {self.processed} processed, {self.cached} cached, "
            f"{self.failed} quarantined in {self.seconds:.1f} s{rate}{retried}"
        )


@dataclass(frozen=True)
class _Plan:
    cached: list[int]  # manifest row positions already up to date
    adopted: dict[int, tuple[str, str, float, float | None]]  # row -> (path, key, hair, changed) found on disk
    jobs: list[_Job]  # one per sample_id
    rows_of: dict[str, list[int]]  # sample_id -> rows to fill from its job
    missing_id: list[int]  # accepted rows without a sample_id


def _is_cached(row: pd.Series, target: Path, key: str) -> bool:
    return (
        row["preprocess_key"] == key
        and row["processed_path"] == str(target)
        and pd.notna(row["hair_fraction"])
        and target.is_file()
    )


def plan_work(df: pd.DataFrame, out_dir: Path, cfg: PreprocessConfig) -> _Plan:
    """Sort accepted rows into up to date, adoptable from a finished file, and to do (once per sample_id)."""
    out_dir = Path(out_dir).resolve()
    plan = _Plan([], {}, [], {}, [])
    found: dict[str, tuple[str, str, float, float | None] | None] = {}
    code = preprocess_code()
    todo: dict[str, tuple[list[str], str, str]] = {}  # sample_id -> (sources, target, key)
    for pos, row in df[df["status"] == "accepted"].iterrows():
        sample_id = row["sample_id"]
        if not isinstance(sample_id, str) or not sample_id:
            plan.missing_id.append(pos)
            continue
        key = preprocess_key(sample_id, cfg, code)
        target = processed_path(out_dir, sample_id, key)
        if _is_cached(row, target, key):
            plan.cached.append(pos)
            continue
        if sample_id not in found:
            record = read_processed_record(target) if target.is_file() else None
            found[sample_id] = (str(target), key, record[1], record[2]) if record and record[0] == key else None
        if found[sample_id] is not None:
            plan.adopted[pos] = found[sample_id]
        else:
            todo.setdefault(sample_id, ([], str(target), key))[0].append(str(row["source_path"]))
            plan.rows_of.setdefault(sample_id, []).append(pos)
    plan.jobs.extend(_Job(sid, tuple(src), target, key) for sid, (src, target, key) in todo.items())
    return plan


def _quarantine(row: pd.Series, reason: str) -> pd.Series:
    row = row.copy()
    row["status"], row["reason"] = "quarantined", reason
    row["processed_path"], row["preprocess_key"], row["hair_fraction"] = None, None, np.nan
    row["hair_changed_fraction"] = np.nan
    return row


def _filled(row: pd.Series, path: str, key: str, fraction: float, changed: float | None) -> pd.Series:
    row = row.copy()
    row["processed_path"], row["preprocess_key"], row["hair_fraction"] = path, key, fraction
    row["hair_changed_fraction"] = np.nan if changed is None else changed
    return row


_WRITES = ["status", "reason", "processed_path", "preprocess_key", "hair_fraction", "hair_changed_fraction"]


def _record(manifest: Path | str, updates: pd.DataFrame, lock_dir: Path | None) -> None:
    """Write preprocess's columns into the manifest as it is now, under its writer lock: rows ingest
    changed meanwhile (other bytes at the same path) and rows it added are left as they are."""
    by_key = updates.set_index("source_path")

    def apply(current: pd.DataFrame) -> pd.DataFrame:
        current = current.copy()
        for i, (path, sample_id) in enumerate(zip(current["source_path"], current["sample_id"])):
            if path in by_key.index and by_key.at[path, "sample_id"] == sample_id:
                for col in _WRITES:
                    current.iat[i, current.columns.get_loc(col)] = by_key.at[path, col]
        return current

    with writer_lock(manifest, lock_dir):
        rewrite(manifest, SEEDS, apply)


def preprocess_manifest(
    manifest_path: Path | str, out_dir: Path, cfg: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 0, lock_dir: Path | None = None,
) -> PreprocessReport:
    """Hair-remove, resize and crop every accepted row of a seeds manifest into ``out_dir``.

    Fills ``processed_path``, ``preprocess_key`` and ``hair_fraction``; a row that fails to read or
    decode becomes ``quarantined`` with the reason. No other column changes. Rows already done with
    the same key are skipped, so a second run does no work and does not rewrite the manifest.
    """
    start = time.perf_counter()
    manifest_path = manifest_path if storage.is_remote(manifest_path) else storage.local_path(manifest_path)
    df = read_manifest(manifest_path, SEEDS)
    retry = df["status"].eq("quarantined") & df["reason"].map(is_transient)
    if retry.any():  # a file that could not be read last time may be back: try it again
        log.info("preprocess: trying again %d row(s) quarantined earlier because their file could not be read",
                 int(retry.sum()))
        df.loc[retry, ["status", "reason"]] = ["accepted", None]
    plan = plan_work(df, out_dir, cfg)
    if plan.jobs:
        log.info("preprocess: %d image(s) to process on %d process(es), %d row(s) up to date",
                 len(plan.jobs), worker_count(cfg, len(plan.jobs), workers), len(plan.cached) + len(plan.adopted))
    name = str(manifest_path).rsplit("/", 1)[-1].removesuffix(".parquet")
    outcomes = {o.sample_id: o for o in run_jobs(plan.jobs, cfg, max_pixels, workers, description=f"preprocess {name}")}

    updates: list[pd.Series] = []
    failed = len(plan.missing_id)
    for pos in plan.missing_id:
        updates.append(_quarantine(df.loc[pos], "preprocess: accepted row has no sample_id"))
    for pos, (path, key, fraction, changed) in plan.adopted.items():
        updates.append(_filled(df.loc[pos], path, key, fraction, changed))
    processed = 0
    jobs = {job.sample_id: job for job in plan.jobs}
    for sample_id, positions in plan.rows_of.items():
        outcome, job = outcomes[sample_id], jobs[sample_id]
        for pos in positions:
            if outcome.hair_fraction is None:
                updates.append(_quarantine(df.loc[pos], outcome.reason or "preprocess: failed"))
                failed += 1
            else:
                updates.append(_filled(df.loc[pos], job.target, job.key, outcome.hair_fraction,
                                       outcome.changed_fraction))
                processed += 1
    if updates:
        _record(manifest_path, pd.DataFrame(updates).reset_index(drop=True), lock_dir)
    report = PreprocessReport(
        manifest_path=manifest_path,
        processed=processed,
        cached=len(plan.cached) + len(plan.adopted),
        failed=failed,
        seconds=time.perf_counter() - start,
        retried=int(retry.sum()),
    )
    log.debug(report.summary())
    return report


# --------------------------------------------------------------------------- the stage


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def outputs_current(manifest: Path | str, cfg: PreprocessConfig) -> bool:
    """Every accepted row holds the processed image its current key names (and the file exists), and
    no row waits to be tried again (quarantined because its file could not be read)."""
    df = read_manifest(manifest, SEEDS)
    if df["reason"].map(is_transient).any():
        return False
    accepted = df[df["status"] == "accepted"]
    if accepted.empty:
        return storage.is_file(manifest)
    code = preprocess_code()
    keys = accepted["sample_id"].map(lambda s: preprocess_key(s, cfg, code) if isinstance(s, str) else None)
    return bool((accepted["preprocess_key"] == keys).all()
                and accepted["processed_path"].map(lambda p: isinstance(p, str) and Path(p).is_file()).all())


def manifest_summary(manifest: Path | str) -> dict[str, Any]:
    df = read_manifest(manifest, SEEDS)
    by_preprocess = df["reason"].fillna("").str.startswith("preprocess:")
    hair = df.loc[df["status"] == "accepted", "hair_fraction"].dropna()
    return {"manifest": str(manifest), "accepted": int((df["status"] == "accepted").sum()),
            "quarantined_by_preprocess": int(by_preprocess.sum()),
            "median_hair_fraction": float(hair.median()) if len(hair) else None}


class PreprocessStage:
    """Preprocess: one unit per dataset manifest; done when every accepted row is processed under its
    current key (so a new ingested row, a changed spec or a deleted file makes it run again)."""

    name = "preprocess"

    def __init__(self, cfg: PreprocessConfig, manifests: dict[str, Path | str], out_dir: Path, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 0, locks: Path | None = None,
                 reports: Path | None = None) -> None:
        self.cfg, self.manifests, self.out_dir = cfg, dict(manifests), Path(out_dir)
        self.max_pixels, self.workers, self.locks = max_pixels, workers, locks
        self.reports = Path(reports) if reports is not None else self.out_dir.parent / "reports"  # W/reports

    @classmethod
    def of(cls, workdir: Any, cfg: Any, *, datasets: Sequence[Any]) -> "PreprocessStage":
        """The stage as a factory config sets it up, for the ingested ``datasets`` (``ingest.stage.Dataset``)."""
        return cls(cfg.preprocess, {d.name: d.manifest for d in datasets}, workdir.processed,
                   max_pixels=cfg.ingest.max_pixels, workers=cfg.runtime.preprocess.workers, locks=workdir.locks,
                   reports=workdir.reports)

    def units(self) -> list[str]:
        return list(self.manifests)

    def describe(self, name: str) -> str:
        return "preprocess seeds" if name == "seeds" else f"preprocess test set {name}"

    def key(self, name: str) -> str:
        df = read_manifest(self.manifests[name], SEEDS)
        return identity.content_key("preprocess", identity.frame_digest(df, ["source_path", "sample_id", "status"]),
                                    identity.spec_digest(self.cfg), str(self.out_dir), preprocess_code())

    def finished(self, name: str, key: str) -> dict[str, Any] | None:
        manifest = self.manifests[name]
        return manifest_summary(manifest) if outputs_current(manifest, self.cfg) else None

    def run(self, name: str, key: str) -> dict[str, Any]:
        report = preprocess_manifest(self.manifests[name], self.out_dir, self.cfg, max_pixels=self.max_pixels,
                                     workers=self.workers, lock_dir=self.locks)
        return {**manifest_summary(self.manifests[name]), "processed": report.processed, "failed": report.failed,
                "seconds": round(report.seconds, 3), "text": report.summary()}

    def close(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The per-class hair figures of every dataset (``report``), in each summary and W/reports."""
        from dermt2im.preprocess.report import write_preprocess_report

        figures = write_preprocess_report(self.reports, self.manifests, self.cfg)
        out = {}
        for name, summary in zip(self.manifests, results):
            lines = [f"  {label}: hair found on {f['with_hair']} of {f['images']}; pixels changed median "
                     f"{_pct(f['changed']['median'])}, p90 {_pct(f['changed']['p90'])}; drawn-hair gain median "
                     f"{_db(f['drawn_hair_gain_db']['median'])} dB" for label, f in figures[name].items()]
            hair = "\n".join([f"hair removal per class ({name}; W/reports/preprocess.md):", *lines])
            out[name] = {**summary, "hair": figures[name], "hair_text": hair,
                         "text": "\n".join([summary.get("text") or f"preprocess {name}: up to date", hair])}
        return out
