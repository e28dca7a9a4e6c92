"""Entries: every input of a source, with what its layout says about it, before any file is read.

One entry per path: the files a metadata CSV names (found by path, by trailing path or by id), every
scanned image it does not name (quarantined as not listed), and for class folders every image under
the source. Paths that a CSV names outside the source are never opened.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from dermt2im.core.workdir import is_workdir
from dermt2im.ingest import isic_formats
from dermt2im.ingest.layouts import (
    _SPEC_BY_LAYOUT,
    IngestError,
    LayoutPlan,
    _folder_class,
)
from dermt2im.ingest.licences import Licence, from_row


@dataclass(frozen=True)
class Entry:
    """One input: a file the metadata names or the scan found, with what the layout says of it."""

    path: str  # absolute and normalised: the manifest key
    label: str | None = None  # explicit label as written (label, benign_malignant, class folder)
    diagnosis: str | None = None
    lesion_id: str | None = None
    origin: str = ""  # where it was named, for reasons: "line 7 of labels.csv"
    problem: str | None = None  # a quarantine reason known without reading the file
    readable: bool = True  # False: never open it (missing, or outside the source)
    matches: int = 1  # how many files the naming CSV line matched
    licence: Licence | None = None  # what the metadata row states (``dermt2im.ingest.licences``)


@dataclass(frozen=True)
class Scan:
    """Every file under a source: the images to read, and every other path with the reason it
    cannot be an input (each becomes a quarantined row: nothing under the source is left out)."""

    images: list[str]
    refused: dict[str, str]


def _printable(path: str) -> str:
    """A path as text that can be stored: bytes that are not UTF-8 shown as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _symlink_problem(path: str) -> str | None:
    """Why a symbolic link cannot be followed: it is broken, or it loops. A link that leads out of
    the source is followed, as the file's owner would open it (the row records the target too)."""
    try:
        os.path.realpath(path, strict=True)
    except OSError as err:
        return (f"symbolic link loop: {_printable(os.readlink(path))}" if getattr(err, "errno", None) == errno.ELOOP
                else f"broken symbolic link: points to {_printable(os.readlink(path))}, which does not exist")
    return None


def link_target(path: str, root: str) -> str | None:
    """Where ``path`` (under the source ``root``) really is when a symbolic link below the root leads
    there (the file is a link, or a linked folder holds it); None for a plain file or a broken link."""
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    plain = os.path.join(os.path.realpath(root), os.path.relpath(path, root)) if _within(root, path) else path
    return _printable(real) if real != os.path.normpath(plain) else None


def scan_source(root: Path, extensions: Iterable[str], skip: Iterable[str] = ()) -> Scan:
    """Every file under ``root`` (folders are walked by hand so that none is passed over silently):
    images with a known extension to read, and the reason for everything else. ``skip``: paths
    that are no inputs (the layout's own metadata CSV). Factory workdirs (folders holding the
    workdir marker) are never entered.

    Symbolic links are followed as the file's owner would open them, inside the source or out of it
    (a class folder of links into one image pool is a common layout): a linked file is read through
    its link and keeps the link's path as its key; a linked folder outside the source is walked
    under the link's path; a linked folder inside it is walked once, as itself. Broken links and
    loops (a link to itself, a folder link leading back to a folder already walked) are refused."""
    exts = {e.lower() for e in extensions}
    base = os.path.normpath(str(root))
    real_base = os.path.realpath(base)
    skipped = {os.path.normpath(str(s)) for s in skip}
    images: list[str] = []
    refused: dict[str, str] = {}
    stack: list[tuple[str, tuple[str, ...]]] = [(base, ())]  # a folder, and the real folders above it
    while stack:
        folder, above = stack.pop()
        above = (*above, os.path.realpath(folder))
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as err:
            refused[_printable(folder)] = f"folder cannot be read: {err.strerror or err} (its files are not ingested)"
            continue
        for entry in found:
            path = os.path.normpath(entry.path)
            if path in skipped:
                continue
            if not _is_utf8(path):
                refused[_printable(path)] = ("file name is not valid UTF-8 (shown with \\x escapes): rename it, "
                                             "e.g. with convmv, and ingest again")
                continue
            if entry.is_symlink():
                problem = _symlink_problem(path)
                if problem is not None:
                    refused[path] = problem
                    continue
                if os.path.isdir(path):
                    target = os.path.realpath(path)
                    if _within(real_base, target):
                        continue  # a link to a folder inside the source: that folder is walked as itself
                    if any(_within(target, real) for real in above):
                        refused[path] = (f"symbolic link loop: {_printable(os.readlink(path))} leads back to a "
                                         "folder it is in")
                        continue
            if entry.is_dir():
                if not is_workdir(path):  # a factory workdir below the source: its images are never real seeds
                    stack.append((path, above))
            elif os.path.splitext(entry.name)[1].lower() in exts:
                images.append(path)
            else:
                kind = os.path.splitext(entry.name)[1].lower() or "no extension"
                refused[path] = f"not an image file ({kind}): only {', '.join(sorted(exts))} are read"
    return Scan(sorted(images), dict(sorted(refused.items())))


def _within(folder: str, path: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _listed_path(plan: LayoutPlan, base: Path, raw: str) -> tuple[str, bool]:
    """Absolute normalised path a CSV cell names (relative to ``base``), and whether it stays inside
    the source. Purely lexical: a path that leaves the source is never touched."""
    text = raw.replace("\\", "/")
    path = os.path.normpath(text if os.path.isabs(text) else os.path.join(base, text))
    for alias in (str(plan.root), plan.given_root):
        if alias and _within(alias, path):
            return os.path.normpath(os.path.join(plan.root, os.path.relpath(path, alias))), True
    return path, False


def _cell(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise IngestError(f"cannot read {path}: {type(err).__name__}: {str(err).strip()[:200]}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame.to_dict("records")


def _index_by(images: Sequence[str], key: Callable[[str], str]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for p in images:
        index.setdefault(key(p), []).append(p)
    return index


def _entries_from_csv(plan: LayoutPlan, images: Sequence[str]) -> list[Entry]:
    """Plain CSV: ``file`` relative to the CSV's folder, else found by its trailing path under the source."""
    assert plan.csv_path is not None
    by_name = _index_by(images, os.path.basename)
    entries: list[Entry] = []
    for line, row in enumerate(_read_rows(plan.csv_path), start=2):
        origin = f"line {line} of {plan.csv_path.name}"
        meta = dict(label=_cell(row, "label"), diagnosis=_cell(row, "diagnosis"), lesion_id=_cell(row, "lesion_id"),
                    licence=from_row(row, plan.csv_path.name))
        raw = _cell(row, "file")
        if raw is None:
            entries.append(Entry(f"{plan.csv_path}#line-{line}", origin=origin, readable=False,
                                 problem=f"missing file name: empty 'file' cell ({origin})", **meta))
            continue
        path, inside = _listed_path(plan, plan.csv_path.parent, raw)
        if not inside:
            entries.append(Entry(path, origin=origin, readable=False,
                                 problem=f"path escapes source folder: {raw!r} ({origin})", **meta))
            continue
        if os.path.isfile(path):
            entries.append(Entry(path, origin=origin, **meta))
            continue
        parts = Path(raw.replace("\\", "/")).parts
        found = [p for p in by_name.get(parts[-1], []) if Path(p).parts[-len(parts):] == parts] if parts else []
        if found:
            entries.extend(Entry(p, origin=origin, matches=len(found), **meta) for p in found)
        else:
            entries.append(Entry(path, origin=origin, readable=False,
                                 problem=f"file not found: {raw!r} ({origin})", **meta))
    return entries


def _id_row_meta(layout: str, row: Mapping[str, Any], one_hot: Sequence[str]) -> dict[str, Any]:
    """label / diagnosis / lesion_id (and a problem, if any) of one row of an id-keyed CSV."""
    if layout == "ham10000":
        return dict(diagnosis=_cell(row, "dx"), lesion_id=_cell(row, "lesion_id"))
    if layout == "isic-challenge":
        diagnosis, problem = isic_formats.one_hot_diagnosis(row, one_hot)
        return dict(diagnosis=diagnosis, problem=problem)
    return dict(label=isic_formats.archive_label(row), diagnosis=isic_formats.archive_diagnosis(row),
                lesion_id=_cell(row, "lesion_id"))


def _entries_from_ids(plan: LayoutPlan, images: Sequence[str]) -> list[Entry]:
    """ISIC / ISIC challenge / HAM10000: each id names ``<id>.<ext>`` anywhere under the source."""
    assert plan.csv_path is not None
    rows = _read_rows(plan.csv_path)
    columns = list(rows[0]) if rows else []
    id_column = _SPEC_BY_LAYOUT[plan.layout].id_column(columns)
    one_hot = isic_formats.one_hot_columns(columns)
    by_stem = _index_by(images, lambda p: os.path.splitext(os.path.basename(p))[0])
    entries: list[Entry] = []
    for line, row in enumerate(rows, start=2):
        origin = f"line {line} of {plan.csv_path.name}"
        meta = {**_id_row_meta(plan.layout, row, one_hot), "licence": from_row(row, plan.csv_path.name)}
        row_problem = meta.pop("problem", None)
        image_id = _cell(row, id_column)
        if image_id is None:
            entries.append(Entry(f"{plan.csv_path}#line-{line}", origin=origin, readable=False,
                                 problem=f"missing file name: empty {id_column!r} cell ({origin})", **meta))
            continue
        found = by_stem.get(image_id, [])
        if found:
            # every copy gets the row: byte-identical copies (HAM10000 downloads repeat whole
            # folders) then resolve as duplicates, different ones as ambiguous
            problem = f"{row_problem} ({origin})" if row_problem else None
            entries.extend(Entry(p, origin=origin, matches=len(found), problem=problem, **meta) for p in found)
            continue
        path, inside = _listed_path(plan, plan.root, f"{image_id}.jpg")
        problem = (
            f"file not found: no image named {image_id}.<ext> under the source ({origin})"
            if inside
            else f"path escapes source folder: {image_id!r} ({origin})"
        )
        entries.append(Entry(path, origin=origin, readable=False, problem=problem, **meta))
    return entries


def _entries_from_folders(plan: LayoutPlan, images: Sequence[str], label_map: Mapping[str, str]) -> list[Entry]:
    """Class folders: every folder between the source and the file that names a class counts."""
    entries: list[Entry] = []
    for path in images:
        rel_dir = Path(os.path.relpath(path, plan.root)).parent
        origin = f"folder {rel_dir.as_posix()}/"
        if not rel_dir.parts:
            entries.append(Entry(path, origin=origin, problem="not in a class folder: files must sit in "
                                 "benign/, malignant/ or a folder named by diagnosis"))
            continue
        classes = [c for part in rel_dir.parts if (c := _folder_class(part, label_map)) is not None]
        labels = sorted({c[0] for c in classes if c[0]})
        diagnoses = sorted({c[1] for c in classes if c[1]})
        if not classes:
            problem = (f"unknown class folder: {rel_dir.as_posix()!r} (not benign, malignant or a diagnosis "
                       "in the label map; add it under ingest.diagnosis_labels)")
        elif len(labels) > 1 or len(diagnoses) > 1:
            problem = f"conflicting class folders: {rel_dir.as_posix()!r}"
        else:
            problem = None
        entries.append(Entry(path, label=labels[0] if labels else None, diagnosis=diagnoses[0] if diagnoses else None,
                             origin=origin, problem=problem))
    return entries


def read_entries(plan: LayoutPlan, scan: Scan, label_map: Mapping[str, str]) -> list[Entry]:
    """Every input of the source, one entry per path: what the layout names, every scanned image it
    does not name (quarantined as not listed), and every other file with the reason it is no input."""
    images = scan.images
    if plan.layout == "folders":
        entries = _entries_from_folders(plan, images, label_map)
    else:
        entries = _entries_from_csv(plan, images) if plan.layout == "csv" else _entries_from_ids(plan, images)
        entries = _merge_repeated(entries)
        listed = {e.path for e in entries}
        assert plan.csv_path is not None
        unlisted = f"not listed in {plan.csv_path.name}"
        entries += [Entry(p, origin="scan", problem=unlisted) for p in images if p not in listed]
    named = {e.path for e in entries}
    return entries + [Entry(p, origin="scan", problem=why, readable=False)
                      for p, why in scan.refused.items() if p not in named]


def _merge_repeated(entries: Sequence[Entry]) -> list[Entry]:
    """One entry per path: repeats that agree collapse; repeats that disagree are quarantined."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.path, []).append(e)
    out: list[Entry] = []
    for same in groups.values():
        first = same[0]
        meta = {(e.label, e.diagnosis, e.lesion_id) for e in same}
        if len(meta) > 1:
            listing = "; ".join(
                f"{e.origin}: {e.label or '-'}/{e.diagnosis or '-'}/{e.lesion_id or '-'}" for e in same[:4]
            )
            reason = f"listed {len(same)} times with different entries ({listing})"
            first = replace(first, problem=first.problem or reason)
        out.append(first)
    return out
