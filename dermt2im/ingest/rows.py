"""Rows of the seeds manifest: one per input, with its label, file facts and status, merged with
what the manifest already holds (re-running on the same source changes nothing; a grown source adds
only its new files; rows keep their split). What preprocessing makes of a row is preprocess's own
table (``dermt2im.core.manifest.PROCESSED``), never written here."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from dermt2im.core.specs import IngestConfig
from dermt2im.ingest.entries import Entry, _within, link_target
from dermt2im.ingest.files import FileFacts, examine_files
from dermt2im.ingest.labels import resolve_label
from dermt2im.ingest.layouts import LayoutPlan, _shown
from dermt2im.ingest.licences import UNSTATED, Licence, resolve

ACCEPTED, QUARANTINED = "accepted", "quarantined"
GONE_REASON = "file not found: no longer in the source"


def _row(
    entry: Entry, plan: LayoutPlan, label: str | None, problem: str | None, facts: FileFacts | None,
    licence: Licence = UNSTATED,
) -> dict[str, Any]:
    # a generated image is never real, whatever else is wrong with it: that reason comes first
    synthetic = f"synthetic: {facts.provenance}" if facts is not None and facts.synthetic else None
    problem = synthetic or problem or (facts.problem if facts else None)
    return {
        "sample_id": facts.sample_id if facts else None,
        "source_path": entry.path,
        "source_root": str(plan.root),
        "dataset": plan.layout,
        "label": label,
        "diagnosis": entry.diagnosis,
        "lesion_id": entry.lesion_id,
        "width": facts.width if facts else None,
        "height": facts.height if facts else None,
        "mode": facts.mode if facts else None,
        "exif_rotated": facts.exif_rotated if facts else None,
        "status": QUARANTINED if problem else ACCEPTED,
        "reason": problem,
        "duplicate_of": None,
        "split": None,
        "provenance": facts.provenance if facts else None,
        **licence.row(),
        "link_target": link_target(entry.path, str(plan.root)) if entry.readable else None,
    }


def _quarantine(row: dict[str, Any], reason: str, **extra: Any) -> dict[str, Any]:
    return {**row, "status": QUARANTINED, "reason": reason, "split": None, **extra}


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root) if _within(root, path) else path


def resolve_ambiguous(rows: list[dict[str, Any]], entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """A CSV line that matched several files with different bytes: quarantine them all."""
    by_origin: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.matches > 1:
            by_origin.setdefault(e.origin, []).append(i)
    out = list(rows)
    for origin, idxs in by_origin.items():
        ids = {rows[i]["sample_id"] for i in idxs}
        if len(ids) > 1:
            names = _shown([_rel(rows[i]["source_path"], rows[i]["source_root"]) for i in idxs], 4)
            for i in idxs:
                if out[i]["status"] == ACCEPTED:
                    out[i] = _quarantine(out[i], f"ambiguous: {origin} matches {len(idxs)} different files ({names})")
    return out


def resolve_duplicates(rows: list[dict[str, Any]], preferred: set[str]) -> list[dict[str, Any]]:
    """Among accepted rows with identical bytes: one label -> keep one (a previously accepted copy,
    else the first by path) and mark the rest duplicates; several labels -> quarantine every copy."""
    by_id: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["status"] == ACCEPTED and r["sample_id"]:
            by_id.setdefault(r["sample_id"], []).append(i)
    out = list(rows)
    for idxs in by_id.values():
        if len(idxs) < 2:
            continue
        order = sorted(idxs, key=lambda i: (rows[i]["source_path"] not in preferred, rows[i]["source_path"]))
        if len({rows[i]["label"] for i in idxs}) > 1:
            copies = _shown([f"{rows[i]['label']} ({_rel(rows[i]['source_path'], rows[i]['source_root'])})"
                             for i in order], 4)
            for i in idxs:
                out[i] = _quarantine(out[i], f"label conflict: identical bytes are labelled {copies}")
            continue
        keep = rows[order[0]]["source_path"]
        for i in order[1:]:
            out[i] = _quarantine(out[i], f"duplicate of {keep}", duplicate_of=keep)
    return out


def size_problem(facts: FileFacts | None, cfg: IngestConfig) -> str | None:
    """Why an image's size rules it out (too small to be a lesion, or a strip), else None."""
    if facts is None or facts.width is None or facts.height is None:
        return None
    short, long = sorted((facts.width, facts.height))
    if short < cfg.min_side:
        return (f"image too small: {facts.width}x{facts.height}, the shorter side is under "
                f"ingest.min_side ({cfg.min_side} px)")
    if long > cfg.max_aspect_ratio * short:
        return (f"image too elongated: {facts.width}x{facts.height} is {long / short:.1f} times longer than wide "
                f"(ingest.max_aspect_ratio {cfg.max_aspect_ratio:g})")
    return None


def build_rows(plan: LayoutPlan, entries: Sequence[Entry], label_map: Mapping[str, str],
               known: Mapping[str, FileFacts], cfg: IngestConfig, preferred: set[str],
               description: str = "ingest") -> list[dict[str, Any]]:
    """Fresh rows for every entry, before splits: labels, file facts, then ambiguity and duplicates."""
    labels = [resolve_label(e.label, e.diagnosis, label_map) for e in entries]
    jobs = [(e.path, e.problem is None and problem is None) for e, (_, problem) in zip(entries, labels) if e.readable]
    facts = examine_files(jobs, known, cfg.max_pixels, description=description)
    licences = resolve([e.path for e in entries], [e.licence for e in entries], plan.root)
    rows = [
        _row(e, plan, label, e.problem or problem or size_problem(facts.get(e.path), cfg), facts.get(e.path), lic)
        for e, (label, problem), lic in zip(entries, labels, licences)
    ]
    return resolve_duplicates(resolve_ambiguous(rows, entries), preferred)


def _carry_over(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The fresh row for a key the manifest already has, keeping what must not change."""
    row = dict(new)
    if row["status"] == ACCEPTED and old["status"] == ACCEPTED and old["split"]:
        row["split"] = old["split"]
    return row


def _gone(old: Mapping[str, Any]) -> dict[str, Any]:
    """A row of this source whose file has disappeared and that nothing lists any more."""
    if old["status"] == QUARANTINED and old["reason"] == GONE_REASON:
        return dict(old)
    return _quarantine(dict(old), GONE_REASON, duplicate_of=None)


def merge_rows(existing: Sequence[Mapping[str, Any]], fresh: Sequence[dict[str, Any]],
               root: str) -> tuple[list[dict[str, Any]], int]:
    """Existing rows in their order (updated), then new keys sorted by path; and how many are new."""
    fresh_by_key = {r["source_path"]: r for r in fresh}
    out: list[dict[str, Any]] = []
    for old in existing:
        key = old["source_path"]
        if key in fresh_by_key:
            out.append(_carry_over(old, fresh_by_key[key]))
        elif old["source_root"] == root:
            out.append(_gone(old))
        else:
            out.append(dict(old))
    seen = {r["source_path"] for r in existing}
    new = sorted((r for r in fresh if r["source_path"] not in seen), key=lambda r: r["source_path"])
    return out + new, len(new)
