"""Seed ingest: a folder of dermoscopic images -> rows of the ``seeds`` manifest.

``ingest_source`` turns a source into one row per input file (key: its absolute path), each
``accepted`` or ``quarantined`` with a reason: the layout (``layouts``) says what each file is
(``entries``), the files are read once (``files``), labels come from the diagnosis table
(``labels``), rows are merged with the manifest (``rows``) and get a split by lesion (``splits``).
Patient metadata (age, sex, site) in the CSVs is never read into the manifest.

``IngestStage`` is the stage: one unit per source (the seeds, or one named test set).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dermt2im.core import storage
from dermt2im.core.identity import code_digest, content_key, spec_digest, tree_listing
from dermt2im.core.manifest import (
    SEEDS,
    conform,
    manifest_exists,
    read_manifest,
    write_manifest,
)
from dermt2im.core.specs import IngestConfig
from dermt2im.core.workdir import WORKDIR_MARKER
from dermt2im.core.writers import writer_lock
from dermt2im.ingest.entries import read_entries, scan_source
from dermt2im.ingest.files import _decode_cache
from dermt2im.ingest.labels import label_map as make_label_map
from dermt2im.ingest.layouts import IngestError, LayoutPlan, _plan_layout
from dermt2im.ingest.rows import ACCEPTED, build_rows, merge_rows
from dermt2im.ingest.splits import SPLITS, fill_splits
from dermt2im.stage import Stamps

log = logging.getLogger(__name__)


def reason_category(reason: str) -> str:
    """The kind of a quarantine reason, for counting: the text before ':' or ' ('."""
    if reason.startswith("duplicate of "):
        return "duplicate"
    head = reason.split(":", 1)[0]
    return head.split(" (", 1)[0].strip()


@dataclass(frozen=True)
class IngestReport:
    layout: str
    explanation: str
    manifest_path: Path | str  # a local path, or an fsspec URL (storage.manifests)
    total: int  # rows of this source in the manifest
    new: int  # rows this run added
    accepted: int
    quarantined: int
    reasons: dict[str, int]  # quarantine reason category -> count
    labels: dict[str, int] = field(default_factory=dict)  # accepted rows per label
    splits: dict[str, int] = field(default_factory=dict)  # accepted rows per split

    def summary(self) -> str:
        def counts(d: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

        lines = [
            f"layout: {self.layout}",
            f"  because: {self.explanation}",
            f"manifest: {self.manifest_path}",
            f"{self.total} files ({self.new} new): {self.accepted} accepted, {self.quarantined} quarantined",
            f"accepted by label: {counts(self.labels)}; by split: {counts(self.splits)}",
        ]
        if self.reasons:
            top = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("quarantine reasons: " + counts(dict(top[:6])) + (" …" if len(top) > 6 else ""))
        return "\n".join(lines)


def _report(plan: LayoutPlan, manifest_path: Path | str, rows: Sequence[Mapping[str, Any]], new: int) -> IngestReport:
    mine = [r for r in rows if r["source_root"] == str(plan.root)]
    accepted = [r for r in mine if r["status"] == ACCEPTED]
    reasons = Counter(reason_category(r["reason"] or "") for r in mine if r["status"] != ACCEPTED)
    return IngestReport(
        layout=plan.layout,
        explanation=plan.explanation,
        manifest_path=manifest_path,
        total=len(mine),
        new=new,
        accepted=len(accepted),
        quarantined=len(mine) - len(accepted),
        reasons=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        labels=dict(sorted(Counter(r["label"] for r in accepted).items())),
        splits={s: n for s in SPLITS if (n := sum(r["split"] == s for r in accepted))},
    )


def check_source(source: str | Path, cfg: IngestConfig, layout: str | None = None) -> LayoutPlan:
    """What ``ingest_source`` would ingest, or the ``IngestError`` it would stop with (missing source,
    unknown layout, a metadata CSV without its columns): the source as a whole is checked before
    anything is written."""
    wanted = layout or cfg.layout
    return _plan_layout(Path(source), None if wanted == "auto" else wanted, make_label_map(cfg))


def ingest_source(
    source: Path,
    manifest_path: Path | str,
    cfg: IngestConfig,
    *,
    layout: str | None = None,
    split: str | None = None,
    lock_dir: Path | None = None,
) -> IngestReport:
    """Ingest every image under ``source`` into the seeds manifest at ``manifest_path``.

    ``layout`` None uses ``cfg.layout`` ("auto" detects). ``split`` None assigns train / val / test
    by lesion from ``cfg.splits``; a split name puts every accepted row of this source there (for
    unseen test sets). Problems with the source as a whole raise ``IngestError`` before any file
    is read; problems with single files become quarantined rows.
    """
    if split is not None and split not in SPLITS:
        raise IngestError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    wanted = layout or cfg.layout
    label_map = make_label_map(cfg)
    plan = _plan_layout(Path(source), None if wanted == "auto" else wanted, label_map)

    manifest_path = manifest_path if storage.is_remote(manifest_path) else storage.local_path(manifest_path)
    # The whole read-merge-write holds the manifest's writer lock: a concurrent ingest into the same
    # manifest waits, then merges with what this one wrote (no row is lost).
    with writer_lock(manifest_path, lock_dir):
        before = conform(read_manifest(manifest_path, SEEDS), SEEDS)
        existing = before.to_pylist()
        scan = scan_source(plan.root, cfg.extensions, skip=plan.metadata)
        entries = read_entries(plan, scan, label_map)
        preferred = {r["source_path"] for r in existing if r["status"] == ACCEPTED}
        fresh = build_rows(plan, entries, label_map, _decode_cache(existing), cfg, preferred,
                           description=f"ingest {Path(source).name}")

        rows, new = merge_rows(existing, fresh, str(plan.root))
        rows = fill_splits(rows, str(plan.root), cfg.splits, split)
        frame = pd.DataFrame(rows, columns=SEEDS.columns)
        if not (storage.exists(manifest_path) and conform(frame, SEEDS).equals(before)):
            write_manifest(frame, manifest_path, SEEDS)
    return _report(plan, manifest_path, rows, new)


# --------------------------------------------------------------------------------------------------
# the stage

@dataclass(frozen=True)
class Dataset:
    """One source to ingest: the seeds, or an unseen real test set."""

    name: str  # "seeds", or the test set's name
    source: str  # a folder, or a metadata CSV
    manifest: str  # where its rows go: a local path or an fsspec URL
    split: str | None = None  # None: train / val / test by lesion; "test": every accepted row is test data
    layout: str | None = None  # None: ingest.layout

    @property
    def unit_id(self) -> str:
        return self.name if self.split is None else f"test-set-{self.name}"


def ingest_summary(report: IngestReport) -> dict[str, Any]:
    return {"manifest": str(report.manifest_path), "layout": report.layout, "total": report.total, "new": report.new,
            "accepted": report.accepted, "quarantined": report.quarantined, "reasons": report.reasons,
            "labels": report.labels, "splits": report.splits, "text": report.summary()}


class IngestStage:
    """Ingest: one unit per dataset; done when its manifest exists and was made from the same files
    (names, sizes, modification times), the same ``ingest`` spec and the same code."""

    name = "ingest"

    def __init__(self, cfg: IngestConfig, datasets: Sequence[Dataset], workdir: Any) -> None:
        self.cfg, self.datasets = cfg, list(datasets)
        self.stamps, self.locks = Stamps(workdir.stamps, self.name), workdir.locks

    @classmethod
    def of(cls, workdir: Any, cfg: Any, *, datasets: Sequence[Dataset]) -> "IngestStage":
        """The stage as a factory config sets it up, for ``datasets`` (``seed_datasets``)."""
        return cls(cfg.ingest, datasets, workdir)

    def units(self) -> list[Dataset]:
        return self.datasets

    def describe(self, d: Dataset) -> str:
        return "ingest seeds" if d.split is None else f"ingest test set {d.name}"

    def key(self, d: Dataset) -> str:
        source = Path(d.source)
        root = source if source.is_dir() else source.parent
        return content_key("ingest", tree_listing(root, skip_marked=WORKDIR_MARKER), spec_digest(self.cfg), d.layout,
                           d.split, d.manifest, code_digest(__name__))

    def finished(self, d: Dataset, key: str) -> dict[str, Any] | None:
        if not manifest_exists(d.manifest):
            return None
        return self.stamps.matching(d.unit_id, key)

    def run(self, d: Dataset, key: str) -> dict[str, Any]:
        report = ingest_source(Path(d.source), d.manifest, self.cfg, layout=d.layout, split=d.split, lock_dir=self.locks)
        summary = ingest_summary(report)
        self.stamps.write(d.unit_id, key, summary)
        return summary

    def close(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {d.name: r for d, r in zip(self.datasets, results)}


def seed_datasets(workdir: Any, source: str | Path, test_sets: Mapping[str, str | Path],
                  layout: str | None = None) -> list[Dataset]:
    """The seeds (from ``source``) and every unseen real test set (name -> source), where their rows go."""
    out = [Dataset("seeds", str(source), str(workdir.seeds_manifest), None, layout)]
    out += [Dataset(name, str(src), str(workdir.test_set_manifest(name)), "test", layout)
            for name, src in sorted(test_sets.items())]
    return out
