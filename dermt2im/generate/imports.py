"""Bring any synthetic set to the factory: ``dermt2im import-synthetic SOURCE --name NAME``.

A folder of generated images (class folders, or a CSV of ``file,label``, like ingest) becomes rows
of W's imported manifest (``imported.parquet``, written by this stage only; the factory's own renders
are ``synthetic.parquet``, ``source = dermt2im``) with ``source = NAME``: one
row per file, bad input quarantined with a reason exactly as ingest does (unreadable, truncated,
not in a class folder, unknown class, byte-identical duplicates, ...), and whatever generation
parameters the files carry (``dermt2im.ingest.provenance``) parsed into the manifest's columns:
prompt, negative prompt, sampler, steps, CFG, seed, model and its hash, size, and the raw text.

Imported images are referenced where they are (like seeds) with their sha256; the quality gate and
the memorisation audit then treat them like rendered ones (``dermt2im.quality.stage``), and
validation can restrict a regime to them (``validate.synthetic_sources``). Re-importing changes
nothing; a changed file is assessed again; a file gone from the source is quarantined, not forgotten.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from dermt2im.core import identity
from dermt2im.core.errors import DermT2imError
from dermt2im.core.manifest import IMPORTED, read_manifest, upsert
from dermt2im.core.specs import LABELS, IngestConfig
from dermt2im.core.workdir import WORKDIR_MARKER, Workdir
from dermt2im.core.writers import writer_lock
from dermt2im.ingest.entries import Entry, read_entries, scan_source
from dermt2im.ingest.files import FileFacts, examine_files
from dermt2im.ingest.labels import label_map as make_label_map
from dermt2im.ingest.labels import resolve_label
from dermt2im.ingest.layouts import IngestError, LayoutPlan, _plan_layout
from dermt2im.ingest.licences import resolve
from dermt2im.ingest.rows import _row, resolve_ambiguous, resolve_duplicates
from dermt2im.stage import Stamps

OWN_SOURCE = "dermt2im"
LICENCE_COLUMNS = ("license", "license_note", "attribution")
IMPORT_LAYOUTS = ("auto", "folders", "csv")
GONE = "file not found: no longer in the source"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SyntheticImportError(DermT2imError, ValueError):
    """The import cannot start as asked (bad name, layout or source); nothing was written."""


@dataclass(frozen=True)
class ImportReport:
    name: str
    layout: str
    explanation: str
    total: int  # rows of this source in the manifest
    new: int
    changed: int
    quarantined: int
    reasons: dict[str, int]
    generators: dict[str, int]  # generator named by the metadata (or "none") -> accepted-for-assessment files

    def summary(self) -> str:
        gens = ", ".join(f"{k} {v}" for k, v in self.generators.items()) or "none"
        lines = [f"import {self.name}: layout {self.layout} ({self.explanation})",
                 f"{self.total} files: {self.new} new, {self.changed} changed, {self.quarantined} quarantined",
                 f"generation metadata: {gens}"]
        if self.reasons:
            lines.append("quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in self.reasons.items()))
        return "\n".join(lines)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise SyntheticImportError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), "
                                   "starting with a letter or digit")
    if name == OWN_SOURCE:
        raise SyntheticImportError(f"--name {OWN_SOURCE!r} is the factory's own renders; choose another name")
    if name in LABELS:  # its rows would be keyed <name>-000001, as the renders of that class are
        raise SyntheticImportError(f"--name {name!r} is a class, and the factory's renders are keyed by class; "
                                   "choose another name")
    return name


def plan_import(source: Path, layout: str, cfg: IngestConfig) -> LayoutPlan:
    """Class folders or a ``file,label`` CSV (what ingest accepts, minus the ISIC / HAM10000 layouts)."""
    if layout not in IMPORT_LAYOUTS:
        raise SyntheticImportError(f"unknown layout {layout!r}; choose one of {', '.join(IMPORT_LAYOUTS)}")
    try:
        plan = _plan_layout(Path(source), None if layout == "auto" else layout, make_label_map(cfg))
    except IngestError as err:
        raise SyntheticImportError(str(err)) from None
    if plan.layout not in ("folders", "csv"):
        raise SyntheticImportError(f"{source}: looks like a {plan.layout} dataset of real images ({plan.explanation}); "
                                   "import-synthetic reads class folders or a file,label CSV")
    return plan


def _fresh_rows(plan: LayoutPlan, cfg: IngestConfig) -> tuple[list[dict[str, Any]], dict[str, FileFacts]]:
    """One seeds-style row per input (status and reason as ingest gives them) and each file's facts."""
    label_map = make_label_map(cfg)
    entries: list[Entry] = read_entries(plan, scan_source(plan.root, cfg.extensions, skip=plan.metadata), label_map)
    labels = [resolve_label(e.label, e.diagnosis, label_map) for e in entries]
    jobs = [(e.path, e.problem is None and problem is None) for e, (_, problem) in zip(entries, labels) if e.readable]
    facts = examine_files(jobs, {}, cfg.max_pixels)
    # generated is what these files are meant to be: provenance is read into columns, never a reason
    licences = resolve([e.path for e in entries], [e.licence for e in entries], plan.root)
    rows = [_row(e, plan, label, e.problem or problem,
                 replace(facts[e.path], provenance="") if e.path in facts else None, lic)
            for e, (label, problem), lic in zip(entries, labels, licences)]
    return resolve_duplicates(resolve_ambiguous(rows, entries), set()), facts


def _generation_columns(facts: FileFacts | None) -> dict[str, Any]:
    g = facts.generation if facts is not None else None
    cols: dict[str, Any] = {"width": facts.width if facts else None, "height": facts.height if facts else None}
    if g is None:
        return cols
    cols.update(prompt=g.prompt, negative_prompt=g.negative_prompt, sampler=g.sampler, steps=g.steps,
                guidance_scale=g.cfg, seed=g.seed, base_model=g.model, model_hash=g.model_hash,
                generator=g.generator, generation_parameters=g.raw or None)
    if g.width and g.height:  # the size it was generated at, as the metadata states it
        cols.update(width=g.width, height=g.height)
    return cols


def _synthetic_row(name: str, index: int, row: dict[str, Any], facts: FileFacts | None) -> dict[str, Any]:
    bad = row["status"] != "accepted"
    return {"sample_key": f"{name}-{index:06d}", "label": row["label"], "index": index, "path": row["source_path"],
            "sha256": row["sample_id"], "source": name, "status": "quarantined" if bad else "rendered",
            "reason": row["reason"] if bad else None, **_generation_columns(facts),
            **{c: row[c] for c in LICENCE_COLUMNS}}


def _equal(a: Any, b: Any) -> bool:
    return (pd.isna(a) and pd.isna(b)) if (a is None or b is None or a != a or b != b) else a == b


def import_rows(name: str, plan: LayoutPlan, cfg: IngestConfig, existing: pd.DataFrame
                ) -> tuple[list[dict[str, Any]], ImportReport]:
    """Rows to upsert (new, changed and gone files of this source; unchanged ones are left alone, so
    they keep their verdicts) and the report."""
    fresh, facts = _fresh_rows(plan, cfg)
    mine = existing[existing["source"] == name]
    by_path = {p: r for p, r in zip(mine["path"], mine.to_dict("records"))}
    next_index = int(mine["index"].max()) + 1 if len(mine) else 0
    out, new, changed = [], 0, 0
    for row in sorted(fresh, key=lambda r: r["source_path"]):
        old = by_path.get(row["source_path"])
        if old is None:
            index, new, next_index = next_index, new + 1, next_index + 1
        else:
            index = int(old["index"])
        candidate = _synthetic_row(name, index, row, facts.get(row["source_path"]))
        quarantined = candidate["status"] == "quarantined"
        same = old is not None and all(_equal(old[k], candidate[k]) for k in ("sha256", "label", *LICENCE_COLUMNS)) and \
            (old["status"] == "quarantined") == quarantined and (not quarantined or old["reason"] == candidate["reason"])
        if not same:
            changed += old is not None
            out.append(candidate)
    seen = {r["source_path"] for r in fresh}
    out += [{**r, "status": "quarantined", "reason": GONE} for p, r in by_path.items()
            if p not in seen and r["reason"] != GONE]
    final = {r["sample_key"]: r for r in mine.to_dict("records")} | {r["sample_key"]: r for r in out}
    quarantined = [r for r in final.values() if r["status"] == "quarantined"]
    reasons = Counter(str(r["reason"]).split(":", 1)[0].split(" (", 1)[0] for r in quarantined)
    generators = Counter(r.get("generator") or "none" for r in final.values() if r["status"] != "quarantined")
    report = ImportReport(name, plan.layout, plan.explanation, len(final), new, changed, len(quarantined),
                          dict(reasons.most_common()), dict(generators.most_common()))
    return out, report


def import_synthetic(workdir: Workdir, source: str | Path, name: str, cfg: IngestConfig,
                     layout: str = "auto") -> ImportReport:
    """Import every image under ``source`` into W's synthetic manifest as source ``name``."""
    check_name(name)
    plan = plan_import(Path(source), layout, cfg)
    if Path(workdir.root).resolve() == plan.root:
        raise SyntheticImportError(f"{plan.root} is the workdir itself")
    with writer_lock(workdir.imported_manifest, workdir.locks):
        existing = read_manifest(workdir.imported_manifest, IMPORTED)
        rows, report = import_rows(name, plan, cfg, existing)
        if rows:
            upsert(workdir.imported_manifest, pd.DataFrame(rows), IMPORTED)
    return report


# --------------------------------------------------------------------------------------------------
# the stage

class ImportStage:
    """Import one external synthetic set: one unit (its name); done when its stamp holds the key of
    the same files (names, sizes, modification times), options and code, and its rows are in W."""

    name = "import"

    def __init__(self, workdir: Workdir, cfg: IngestConfig, source: str | Path, set_name: str,
                 layout: str = "auto") -> None:
        self.workdir, self.cfg, self.source, self.set_name, self.layout = workdir, cfg, Path(source), set_name, layout
        self.stamps = Stamps(workdir.stamps, self.name)

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any, *, source: str | Path, name: str, layout: str = "auto") -> "ImportStage":
        """The stage as a factory config sets it up: the set at ``source`` imported as ``name``."""
        return cls(workdir, cfg.ingest, source, name, layout)

    def units(self) -> list[str]:
        check_name(self.set_name)
        return [self.set_name]

    def describe(self, unit: str) -> str:
        return f"import synthetic set {unit}"

    def key(self, unit: str) -> str:
        root = self.source if self.source.is_dir() else self.source.parent
        return identity.content_key("import", str(self.source.resolve()), identity.tree_listing(
            root, skip_marked=WORKDIR_MARKER), unit, self.layout, identity.spec_digest(self.cfg),
            identity.code_digest(__name__))

    def finished(self, unit: str, key: str) -> dict[str, Any] | None:
        df = read_manifest(self.workdir.imported_manifest, IMPORTED)
        if not (df["source"] == unit).any():
            return None
        return self.stamps.matching(unit, key)

    def run(self, unit: str, key: str) -> dict[str, Any]:
        report = import_synthetic(self.workdir, self.source, unit, self.cfg, self.layout)
        summary = {"name": unit, "source": str(self.source), "layout": report.layout, "total": report.total,
                   "new": report.new, "changed": report.changed, "quarantined": report.quarantined,
                   "reasons": report.reasons, "generators": report.generators, "text": report.summary()}
        self.stamps.write(unit, key, summary)
        return summary

    def close(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return results[0]
