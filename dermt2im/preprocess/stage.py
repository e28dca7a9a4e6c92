"""Preprocessing of accepted seed images: DullRazor hair removal (``hair``), resize / centre-crop
(``resize``), on every core (``pool``).

``preprocess_manifest`` records, for every accepted row of a seeds (or test-set) manifest, what it
made of it in a table of its own beside the manifest (``processed/<name>``, the ``PROCESSED`` schema:
the only writer of that table; ingest's manifest is never written here), keyed by the row's
``source_path``: the processed image, its key and hair fractions, or why there is none. Readers see
the two joined (``dermt2im.core.views.seeds_view``). Output files are content-addressed
(``<sample_id>-<key[:8]>.png``) and carry their key and hair fraction in PNG text chunks, so a run
that was killed before it recorded them loses no work: the next run adopts the finished files.

A file that cannot be read now (a share away, a permission being fixed) is recorded ``unreadable``
and tried again by the next preprocess; one that cannot be used (not decodable, changed since
ingest) is ``failed``, a lasting verdict for those bytes and that key.

``PreprocessStage`` is the stage: one unit per dataset, done when every accepted row is recorded
with the processed image (or the lasting failure) its current key names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from dermt2im.core import identity, storage
from dermt2im.core.imaging import DEFAULT_MAX_PIXELS
from dermt2im.core.manifest import PROCESSED, SEEDS, processed_location, read_manifest, upsert
from dermt2im.core.specs import PreprocessConfig
from dermt2im.core.writers import writer_lock
from dermt2im.core.views import seeds_view
from dermt2im.preprocess.pool import TEXT_CHANGED, TEXT_HAIR, TEXT_KEY, _Job, is_transient, run_jobs, worker_count

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
    retried: int = 0  # rows whose file could not be read last time, tried again

    def summary(self) -> str:
        rate = f", {self.processed / self.seconds:.1f} images/s" if self.processed and self.seconds > 0 else ""
        retried = (f"; tried again {self.retried} row(s) whose file could not be read before" if self.retried else "")
        return (
            f"preprocess {self.manifest_path}: {self.processed} processed, {self.cached} cached, "
            f"{self.failed} quarantined in {self.seconds:.1f} s{rate}{retried}"
        )


@dataclass(frozen=True)
class _Plan:
    cached: int  # rows already recorded under their current key (processed, or a lasting failure)
    adopted: list[dict[str, Any]]  # rows whose image a killed run finished: recorded without processing
    jobs: list[_Job]  # one per sample_id
    rows_of: dict[str, list[dict[str, Any]]]  # sample_id -> the rows (source_path, sample_id) its job fills
    failed: list[dict[str, Any]]  # rows that cannot be processed (no sample_id)
    retried: int  # rows recorded unreadable last time, tried again


def _row(source_path: str, sample_id: Any, status: str, reason: str | None = None, path: str | None = None,
         key: str | None = None, hair: float | None = None, changed: float | None = None) -> dict[str, Any]:
    return {"source_path": source_path, "sample_id": sample_id if isinstance(sample_id, str) else None,
            "status": status, "reason": reason, "processed_path": path, "preprocess_key": key,
            "hair_fraction": hair, "hair_changed_fraction": changed}


def _recorded(processed: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return {r["source_path"]: r for r in processed.to_dict("records")}


def _done(record: dict[str, Any] | None, sample_id: str, key: str, target: Path) -> bool:
    """The row is recorded for these bytes under ``key``: processed into ``target`` (still there), or
    failed for good."""
    if record is None or record["sample_id"] != sample_id or record["preprocess_key"] != key:
        return False
    if record["status"] == "failed":
        return True
    return record["status"] == "processed" and record["processed_path"] == str(target) and target.is_file()


def plan_work(seeds: pd.DataFrame, processed: pd.DataFrame, out_dir: Path, cfg: PreprocessConfig) -> _Plan:
    """Sort the accepted rows into recorded under their current key, adoptable from a finished file,
    and to do (once per sample_id)."""
    out_dir = Path(out_dir).resolve()
    code = preprocess_code()
    recorded = _recorded(processed)
    cached, retried = 0, 0
    adopted: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    found: dict[str, tuple[str, str, float, float | None] | None] = {}
    todo: dict[str, tuple[list[str], str, str]] = {}  # sample_id -> (sources, target, key)
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for row in seeds[seeds["status"] == "accepted"].to_dict("records"):
        sample_id, source = row["sample_id"], row["source_path"]
        if not isinstance(sample_id, str) or not sample_id:
            failed.append(_row(source, None, "failed", "preprocess: accepted row has no sample_id"))
            continue
        key = preprocess_key(sample_id, cfg, code)
        target = processed_path(out_dir, sample_id, key)
        before = recorded.get(source)
        if _done(before, sample_id, key, target):
            cached += 1
            continue
        retried += before is not None and before["status"] == "unreadable" and before["sample_id"] == sample_id
        if sample_id not in found:
            record = read_processed_record(target) if target.is_file() else None
            found[sample_id] = (str(target), key, record[1], record[2]) if record and record[0] == key else None
        if found[sample_id] is not None:
            path, key, hair, changed = found[sample_id]
            adopted.append(_row(source, sample_id, "processed", None, path, key, hair, changed))
        else:
            todo.setdefault(sample_id, ([], str(target), key))[0].append(str(source))
            rows_of.setdefault(sample_id, []).append({"source_path": source, "sample_id": sample_id})
    jobs = [_Job(sid, tuple(src), target, key) for sid, (src, target, key) in todo.items()]
    return _Plan(cached, adopted, jobs, rows_of, failed, int(retried))


def _record(manifest: Path | str, rows: list[dict[str, Any]], lock_dir: Path | None) -> None:
    """Merge ``rows`` into the manifest's processed table by ``source_path``, under its writer lock
    (concurrent preprocesses of one manifest each merge with what the other wrote)."""
    table = processed_location(manifest)
    with writer_lock(table, lock_dir):
        upsert(table, pd.DataFrame(rows, columns=PROCESSED.columns), PROCESSED)


def preprocess_manifest(
    manifest_path: Path | str, out_dir: Path, cfg: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 0, lock_dir: Path | None = None,
) -> PreprocessReport:
    """Hair-remove, resize and crop every accepted row of a seeds manifest into ``out_dir``, and record
    each outcome in the manifest's processed table (see the module docstring). Rows recorded under
    their current key are skipped, so a second run does no work and writes nothing."""
    start = time.perf_counter()
    manifest_path = manifest_path if storage.is_remote(manifest_path) else storage.local_path(manifest_path)
    seeds = read_manifest(manifest_path, SEEDS)
    plan = plan_work(seeds, read_manifest(processed_location(manifest_path), PROCESSED), out_dir, cfg)
    if plan.retried:
        log.info("preprocess: trying again %d row(s) whose file could not be read last time", plan.retried)
    if plan.jobs:
        log.info("preprocess: %d image(s) to process on %d process(es), %d row(s) up to date",
                 len(plan.jobs), worker_count(cfg, len(plan.jobs), workers), plan.cached + len(plan.adopted))
    name = str(manifest_path).rsplit("/", 1)[-1].removesuffix(".parquet")
    outcomes = {o.sample_id: o for o in run_jobs(plan.jobs, cfg, max_pixels, workers, description=f"preprocess {name}")}

    rows = list(plan.failed) + list(plan.adopted)
    processed = 0
    failed = len(plan.failed)
    for job in plan.jobs:
        outcome = outcomes[job.sample_id]
        for row in plan.rows_of[job.sample_id]:
            if outcome.hair_fraction is None:
                reason = outcome.reason or "preprocess: failed"
                rows.append(_row(row["source_path"], row["sample_id"], "unreadable" if is_transient(reason) else "failed",
                                 reason, key=job.key))
                failed += 1
            else:
                rows.append(_row(row["source_path"], row["sample_id"], "processed", None, job.target, job.key,
                                 outcome.hair_fraction, outcome.changed_fraction))
                processed += 1
    if rows:
        _record(manifest_path, rows, lock_dir)
    report = PreprocessReport(manifest_path=manifest_path, processed=processed, cached=plan.cached + len(plan.adopted),
                              failed=failed, seconds=time.perf_counter() - start, retried=plan.retried)
    log.debug(report.summary())
    return report


# --------------------------------------------------------------------------- the stage


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _rows_key(rows: list[tuple[str, str, str]], out_dir: Path) -> str:
    return identity.content_key("preprocess", sorted(rows), str(Path(out_dir).resolve()))


def expected_key(manifest: Path | str, cfg: PreprocessConfig, out_dir: Path) -> str:
    """What a dataset's preprocessing must hold: every accepted row (its id and bytes) with the key of
    its processed image (the spec and the code), and where the images go."""
    seeds = read_manifest(manifest, SEEDS)
    code = preprocess_code()
    rows = [(str(p), str(s), preprocess_key(s, cfg, code) if isinstance(s, str) and s else "")
            for p, s, st in zip(seeds["source_path"], seeds["sample_id"], seeds["status"]) if st == "accepted"]
    return _rows_key(rows, out_dir)


def recorded_key(manifest: Path | str, out_dir: Path) -> str | None:
    """What the processed table holds for a dataset's accepted rows, in ``expected_key``'s form: None
    while a row is missing, was recorded for other bytes, waits to be read again (``unreadable``) or
    has lost its image file."""
    seeds = read_manifest(manifest, SEEDS)
    recorded = _recorded(read_manifest(processed_location(manifest), PROCESSED))
    rows = []
    for path, sample_id, status in zip(seeds["source_path"], seeds["sample_id"], seeds["status"]):
        if status != "accepted":
            continue
        r = recorded.get(path)
        if r is None or r["status"] == "unreadable" or (r["sample_id"] or None) != (sample_id or None):
            return None
        if r["status"] == "processed" and not (isinstance(r["processed_path"], str) and Path(r["processed_path"]).is_file()):
            return None
        rows.append((str(path), str(sample_id), r["preprocess_key"] or ""))
    return _rows_key(rows, out_dir)


def manifest_summary(manifest: Path | str) -> dict[str, Any]:
    df = seeds_view(manifest)
    by_preprocess = df["reason"].fillna("").str.startswith("preprocess")
    hair = pd.to_numeric(df.loc[df["status"] == "accepted", "hair_fraction"], errors="coerce").dropna()
    return {"manifest": str(manifest), "accepted": int((df["status"] == "accepted").sum()),
            "quarantined_by_preprocess": int(by_preprocess.sum()),
            "median_hair_fraction": float(hair.median()) if len(hair) else None}


class PreprocessStage:
    """Preprocess: one unit per dataset manifest; done when its processed table holds every accepted
    row under its current key (so a new ingested row, a changed spec or code, a deleted image or a
    row waiting to be read again makes it run again)."""

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
        return expected_key(self.manifests[name], self.cfg, self.out_dir)

    def finished(self, name: str, key: str) -> dict[str, Any] | None:
        manifest = self.manifests[name]
        return manifest_summary(manifest) if recorded_key(manifest, self.out_dir) == key else None

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
            hair = "\n".join([f"hair removal per class ({name}; W/reports/preprocess-{name}.md):", *lines])
            out[name] = {**summary, "hair": figures[name], "hair_text": hair,
                         "text": "\n".join([summary.get("text") or f"preprocess {name}: up to date", hair])}
        return out
