"""Seed ingest: read a dataset layout, label every file, quarantine bad input, assign splits.

``ingest_source`` turns a folder of dermoscopic images into rows of the ``seeds`` manifest, one row
per input file (key: its absolute path), each ``accepted`` or ``quarantined`` with a reason.

Layouts (``detect_layout`` picks one and says why):

* ``isic``: an ISIC Archive metadata CSV (``isic_id``, or ``image_name`` in the 2020 challenge, plus
  ``diagnosis`` / ``benign_malignant`` or the newer ``diagnosis_1`` / ``diagnosis_3``, optional
  ``lesion_id``); images are ``<isic_id>.<ext>`` anywhere under the source.
* ``isic-challenge``: an ISIC challenge ground-truth CSV with one-hot class columns (2018 / 2019:
  ``image, MEL, NV, ...``; 2017: ``image_id, melanoma, seborrheic_keratosis``); see
  ``dermt2im.ingest.isic_formats``.
* ``ham10000``: HAM10000 metadata (``image_id``, ``dx``, ``lesion_id``); images ``<image_id>.<ext>``
  anywhere under the source (e.g. ``HAM10000_images_part_1/`` and ``_part_2/``).
* ``csv``: a plain CSV with ``file`` and ``label`` and/or ``diagnosis`` (optional ``lesion_id``);
  ``file`` is relative to the CSV's folder, or found by its trailing path under the source.
* ``folders``: class folders: ``benign/`` and ``malignant/``, or folders named by diagnosis.

A metadata CSV wins over class folders when both are present: it is explicit and may carry lesion
ids. Labels come from ``IngestConfig.label_map()``; an unknown diagnosis, or a diagnosis that
disagrees with an explicit label, is quarantined, never guessed. Patient metadata (age, sex, site)
in the CSVs is never read into the manifest.

Re-running on the same source rewrites nothing; on a grown source only new files are added, and
existing rows keep their split and whatever preprocessing wrote into them.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from dermt2im.ingest import isic_formats

from dermt2im.core import storage
from dermt2im.core.config import LABELS, IngestConfig, SplitConfig, normalise_diagnosis
from dermt2im.core.fileio import sha256_bytes
from dermt2im.core.imaging import DecodeError, decode_image
from dermt2im.core.manifest import SEEDS, conform, read_manifest, write_manifest

LAYOUTS: tuple[str, ...] = ("isic", "isic-challenge", "ham10000", "folders", "csv")
SPLITS: tuple[str, ...] = ("train", "val", "test")
ACCEPTED, QUARANTINED = "accepted", "quarantined"
PREPROCESS_COLUMNS: tuple[str, ...] = ("processed_path", "preprocess_key", "hair_fraction")
GONE_REASON = "file not found: no longer in the source"

__all__ = [
    "LAYOUTS",
    "SPLITS",
    "IngestError",
    "IngestReport",
    "assign_splits",
    "detect_layout",
    "ingest_source",
    "reason_category",
    "resolve_label",
    "scan_images",
    "split_counts",
]


class IngestError(ValueError):
    """A problem with the source as a whole, found before any file is read."""


# --------------------------------------------------------------------------------------------------
# Layout detection


@dataclass(frozen=True)
class _CsvSpec:
    layout: str
    id_columns: tuple[str, ...]  # the presence of one says the CSV is meant as this layout; it names the image
    required: tuple[str, ...] = ()  # needed besides the id column
    any_of: tuple[str, ...] = ()  # at least one of these is needed too
    optional: tuple[str, ...] = ()
    description: str = ""

    def id_column(self, columns: Sequence[str]) -> str:
        return next((c for c in self.id_columns if c in columns), self.id_columns[0])


# Checked in this order: an explicit file path is the most precise reference to an image. A CSV whose
# id column two layouts share (image_id: HAM10000, ISIC 2017) goes to the first whose columns it has.
_CSV_SPECS: tuple[_CsvSpec, ...] = (
    _CsvSpec("csv", ("file",), (), ("label", "diagnosis"), ("lesion_id",), "a plain CSV of files and labels"),
    _CsvSpec("ham10000", ("image_id",), ("dx", "lesion_id"), (), (), "HAM10000 metadata"),
    _CsvSpec("isic", ("isic_id", "image_name"), (), ("diagnosis", "benign_malignant", "diagnosis_1", "diagnosis_3"),
             ("lesion_id",), "ISIC Archive metadata"),
    _CsvSpec("isic-challenge", ("image", "image_id"), (), (*isic_formats.ONE_HOT_CODES, *isic_formats.ONE_HOT_2017),
             (), "an ISIC challenge ground truth (one-hot classes)"),
)
_SPEC_BY_LAYOUT = {s.layout: s for s in _CSV_SPECS}
_ID_COLUMNS = sorted({c for s in _CSV_SPECS for c in s.id_columns})


@dataclass(frozen=True)
class LayoutPlan:
    """What to read: the layout, why it was chosen, the source folder and the metadata CSV if any."""

    layout: str
    explanation: str
    root: Path  # resolved source folder
    csv_path: Path | None = None
    given_root: str = ""  # the folder as the user named it, for absolute paths written against it


def _read_columns(path: Path) -> list[str] | str:
    """Normalised column names of a CSV, or the reason it cannot be read."""
    try:
        frame = pd.read_csv(path, nrows=0, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        return f"unreadable ({type(err).__name__}: {str(err).strip()[:120]})"
    return [str(c).strip().lower() for c in frame.columns]


def _intent(columns: Sequence[str]) -> _CsvSpec | None:
    """Which layout a CSV means to be, judged by its identifying column (and, where two layouts share
    it, by which one's other columns it has)."""
    meant = [s for s in _CSV_SPECS if any(c in columns for c in s.id_columns)]
    return next((s for s in meant if not _missing_columns(s, columns)), meant[0] if meant else None)


def _missing_columns(spec: _CsvSpec, columns: Sequence[str]) -> list[str]:
    missing = [] if any(c in columns for c in spec.id_columns) else [" or ".join(repr(c) for c in spec.id_columns)]
    missing += [c for c in spec.required if c not in columns]
    if spec.any_of and not any(c in columns for c in spec.any_of):
        missing.append(" or ".join(repr(c) for c in spec.any_of))
    return [m if "'" in m else repr(m) for m in missing]


def _check_columns(spec: _CsvSpec, path: Path, columns: Sequence[str]) -> None:
    missing = _missing_columns(spec, columns)
    if missing:
        raise IngestError(
            f"{path}: missing required column {', '.join(missing)} for the {spec.layout} layout "
            f"(needs {' or '.join(spec.id_columns)}{''.join(', ' + c for c in spec.required)}"
            + (f" and {' or '.join(spec.any_of)}" if spec.any_of else "")
            + f"; the file has: {', '.join(columns) or 'no columns'})"
        )


def _folder_class(name: str, label_map: Mapping[str, str]) -> tuple[str | None, str | None] | None:
    """(label, diagnosis) a folder name stands for, or None when it names no class."""
    key = normalise_diagnosis(name)
    if key in LABELS:
        return key, None
    if key in label_map:
        return None, name
    return None


def _walk_dirs(root: Path) -> list[str]:
    """Every folder under ``root`` as a sorted relative POSIX path."""
    out: list[str] = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        out.extend(Path(rel, d).as_posix() if rel != "." else d for d in dirnames)
    return sorted(out)


def _class_folders(root: Path, label_map: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Folders named by a class, and top-level folders that neither are nor hold one."""
    dirs = _walk_dirs(root)
    known = [d for d in dirs if _folder_class(d.rsplit("/", 1)[-1], label_map) is not None]
    other = [d for d in dirs if "/" not in d and not any(k == d or k.startswith(d + "/") for k in known)]
    return known, other


def _shown(items: Sequence[str], limit: int = 6) -> str:
    head = ", ".join(items[:limit])
    return head + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _csv_explanation(spec: _CsvSpec, path: Path, columns: Sequence[str], folders: Sequence[str]) -> str:
    used = [c for c in (spec.id_column(columns), *spec.required, *spec.any_of, *spec.optional) if c in columns]
    lookup = {
        "csv": "files are named by the 'file' column",
        "ham10000": "images are <image_id>.jpg anywhere under the source",
        "isic": f"images are <{spec.id_column(columns)}>.jpg/.png anywhere under the source",
        "isic-challenge": f"images are <{spec.id_column(columns)}>.jpg/.png anywhere under the source; the class is "
                          "the column holding 1",
    }[spec.layout]
    text = f"{path.name} is {spec.description} (columns {', '.join(used)}); {lookup}"
    if folders:
        why = "it has lesion_id" if "lesion_id" in columns else "it states each file's label explicitly"
        text += (
            f"; class folders ({_shown([f + '/' for f in folders])}) are present too, but the CSV is "
            f"used because it is richer ({why})"
        )
    return text


def _plan_layout(source: Path, forced: str | None, label_map: Mapping[str, str]) -> LayoutPlan:
    """Choose the layout (``forced`` or detected) and the metadata CSV, checking its columns."""
    if forced is not None and forced not in LAYOUTS:
        raise IngestError(f"unknown layout {forced!r}; choose one of auto, {', '.join(LAYOUTS)}")
    source = Path(source)
    if not source.exists():
        raise IngestError(f"source not found: {source}")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise IngestError(f"source {source} is a file but not a metadata CSV; give a folder or a .csv")
        if forced == "folders":
            raise IngestError(f"the folders layout needs a folder, got the file {source}")
        root, csvs, given = source.resolve().parent, [source.resolve()], os.path.abspath(source.parent)
    else:
        root, given = source.resolve(), os.path.abspath(source)
        csvs = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    columns = {p: _read_columns(p) for p in csvs}
    intents = {p: s for p, c in columns.items() if isinstance(c, list) and (s := _intent(c)) is not None}
    folders, other = _class_folders(root, label_map) if source.is_dir() else ([], [])

    def plan(layout: str, explanation: str, csv_path: Path | None = None) -> LayoutPlan:
        return LayoutPlan(layout, explanation, root, csv_path, os.path.normpath(given))

    if forced == "folders":
        return plan("folders", f"layout folders as requested; {_folders_explanation(folders, other)}")
    if forced is not None:
        spec = _SPEC_BY_LAYOUT[forced]
        matching = [p for p, s in intents.items() if s.layout == forced]
        if not matching:
            readable = [p for p, c in columns.items() if isinstance(c, list)]
            if len(readable) == 1:
                _check_columns(spec, readable[0], columns[readable[0]])  # raises, naming what is missing
            seen = _shown([f"{p.name} ({c if isinstance(c, str) else ', '.join(c)})" for p, c in columns.items()])
            raise IngestError(
                f"layout {forced}: no CSV in {root} has a {' or '.join(map(repr, spec.id_columns))} column "
                f"(CSVs seen: {seen or 'none'})"
            )
        if len(matching) > 1:
            raise IngestError(
                f"layout {forced}: several CSVs in {root} qualify ({_shown([p.name for p in matching])}); "
                "point SOURCE at the one to use"
            )
        csv_path = matching[0]
        _check_columns(spec, csv_path, columns[csv_path])
        explanation = _csv_explanation(spec, csv_path, columns[csv_path], folders)
        return plan(forced, f"layout {forced} as requested: {explanation}", csv_path)

    if len(intents) > 1:
        found = _shown([f"{p.name} ({s.layout})" for p, s in intents.items()])
        raise IngestError(
            f"ambiguous layout in {root}: several metadata CSVs ({found}); pass --layout or point SOURCE at one CSV"
        )
    seen = [p.name + (f" ({columns[p]})" if isinstance(columns[p], str) else "") for p in csvs]
    ignored = [name for p, name in zip(csvs, seen) if p not in intents]
    note = f"; ignored {_shown(ignored)}: no {', '.join(_ID_COLUMNS)} column" if ignored else ""
    if intents:
        csv_path, spec = next(iter(intents.items()))
        _check_columns(spec, csv_path, columns[csv_path])
        return plan(spec.layout, _csv_explanation(spec, csv_path, columns[csv_path], folders) + note, csv_path)
    if folders:
        return plan("folders", _folders_explanation(folders, other) + note)
    raise IngestError(
        f"no layout recognised in {source}: expected a metadata CSV (ISIC isic_id, an ISIC challenge ground "
        f"truth, HAM10000 image_id, or file,label) or class folders (benign/, malignant/ or diagnosis names); "
        f"saw CSVs: {_shown(seen) or 'none'}; folders: {_shown([d + '/' for d in other]) or 'none'}"
    )


def _folders_explanation(folders: Sequence[str], other: Sequence[str]) -> str:
    if not folders:
        text = "no class folders found: every image will be quarantined"
    else:
        text = f"class folders {_shown([f + '/' for f in folders])} give the labels (no metadata CSV)"
    if other:
        text += f"; files in {_shown([o + '/' for o in other])} will be quarantined (not a known class)"
    return text


def detect_layout(source: Path, cfg: IngestConfig | None = None) -> tuple[str, str]:
    """The layout of ``source`` and a sentence saying what was seen. Raises ``IngestError`` when the
    source is missing, ambiguous (several metadata CSVs) or matches no layout."""
    cfg = cfg or IngestConfig()
    plan = _plan_layout(Path(source), None, cfg.label_map())
    return plan.layout, plan.explanation


# --------------------------------------------------------------------------------------------------
# Entries: what the layout says about each file, before any file is read


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


def scan_images(root: Path, extensions: Iterable[str]) -> list[str]:
    """Absolute paths of every file under ``root`` with an image extension, sorted."""
    exts = {e.lower() for e in extensions}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.splitext(name)[1].lower() in exts and os.path.isfile(path):
                found.append(os.path.normpath(path))
    return sorted(found)


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
        meta = dict(label=_cell(row, "label"), diagnosis=_cell(row, "diagnosis"), lesion_id=_cell(row, "lesion_id"))
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
        meta = _id_row_meta(plan.layout, row, one_hot)
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


def read_entries(plan: LayoutPlan, images: Sequence[str], label_map: Mapping[str, str]) -> list[Entry]:
    """Every input of the source, one entry per path: what the layout names, plus every scanned
    image it does not name (quarantined as not listed)."""
    if plan.layout == "folders":
        return _entries_from_folders(plan, images, label_map)
    entries = _entries_from_csv(plan, images) if plan.layout == "csv" else _entries_from_ids(plan, images)
    entries = _merge_repeated(entries)
    listed = {e.path for e in entries}
    assert plan.csv_path is not None
    unlisted = f"not listed in {plan.csv_path.name}"
    return entries + [Entry(p, origin="scan", problem=unlisted) for p in images if p not in listed]


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


# --------------------------------------------------------------------------------------------------
# Labels


def resolve_label(
    label: str | None, diagnosis: str | None, label_map: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """(label, quarantine reason) from an explicit label and/or a diagnosis. Never guesses: an
    unknown label or diagnosis, or the two disagreeing, gives a reason naming them."""
    explicit: str | None = None
    if label is not None:
        explicit = label.strip().lower()
        if explicit not in LABELS:
            return None, f"unknown label: {label!r} (expected benign or malignant)"
    mapped: str | None = None
    if diagnosis is not None:
        mapped = label_map.get(normalise_diagnosis(diagnosis))
        if mapped is None:
            return explicit, (f"unknown diagnosis: {diagnosis!r} is not in the label map "
                              "(add it under ingest.diagnosis_labels)")
    if explicit and mapped and explicit != mapped:
        return None, f"label disagreement: label {explicit!r} but diagnosis {diagnosis!r} means {mapped!r}"
    final = explicit or mapped
    if final is None:
        return None, "no label: neither a label nor a diagnosis is given"
    return final, None


# --------------------------------------------------------------------------------------------------
# Reading files: hash every file once, decode each distinct image at most once


@dataclass(frozen=True)
class FileFacts:
    """What reading a file told us."""

    sample_id: str | None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    exif_rotated: bool | None = None
    problem: str | None = None


# decode_image swaps Image.MAX_IMAGE_PIXELS and the warning filters, which are process-global:
# concurrent calls could leave Pillow's own bomb check switched off. Reading and hashing stay parallel.
_DECODE_LOCK = threading.Lock()


def decode_facts(data: bytes, max_pixels: int) -> FileFacts:
    """Decode fully (catching truncation) and keep only the facts; the pixels are dropped."""
    try:
        with _DECODE_LOCK:
            img = decode_image(data, max_pixels=max_pixels)
    except DecodeError as err:
        return FileFacts(None, problem=str(err))
    except Exception as err:  # noqa: BLE001 - Pillow's parsers raise assorted errors on corrupt headers
        return FileFacts(None, problem=f"truncated or corrupt image data: {type(err).__name__}: {err}")
    return FileFacts(None, img.width, img.height, img.mode, img.exif_rotated)


class _DecodeOnce:
    """Decode each distinct sample_id once, even when several threads hold identical bytes."""

    def __init__(self, known: Mapping[str, FileFacts], max_pixels: int,
                 decoder: Callable[[bytes, int], FileFacts]) -> None:
        self._known, self._max_pixels, self._decoder = known, max_pixels, decoder
        self._lock = threading.Lock()
        self._results: dict[str, Future[FileFacts]] = {}

    def __call__(self, sample_id: str, data: bytes) -> FileFacts:
        if sample_id in self._known:
            return self._known[sample_id]
        with self._lock:
            future = self._results.get(sample_id)
            owner = future is None
            if owner:
                future = self._results[sample_id] = Future()
        assert future is not None
        if owner:
            future.set_result(self._decoder(data, self._max_pixels))
        return future.result()


def _examine(path: str, decode: bool, decoder: _DecodeOnce) -> FileFacts:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return FileFacts(None, problem=f"unreadable file: {err.strerror or err}")
    sample_id = sha256_bytes(data)
    if not decode:
        return FileFacts(sample_id)
    return replace(decoder(sample_id, data), sample_id=sample_id)


def examine_files(
    jobs: Sequence[tuple[str, bool]],
    known: Mapping[str, FileFacts],
    max_pixels: int,
    workers: int | None = None,
) -> dict[str, FileFacts]:
    """path -> facts for (path, decode?) jobs. Images whose sample_id is in ``known`` are not decoded."""
    decoder = _DecodeOnce(known, max_pixels, decode_facts)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda job: _examine(job[0], job[1], decoder), jobs)
        return {path: facts for (path, _), facts in zip(jobs, results)}


def _decode_cache(rows: Iterable[Mapping[str, Any]]) -> dict[str, FileFacts]:
    """Image facts already in the manifest, by sample_id: those images need no decoding again."""
    cache: dict[str, FileFacts] = {}
    for r in rows:
        if r.get("sample_id") and r.get("width") is not None and r.get("mode") is not None:
            cache.setdefault(r["sample_id"], FileFacts(r["sample_id"], r["width"], r["height"], r["mode"],
                                                       bool(r["exif_rotated"])))
    return cache


# --------------------------------------------------------------------------------------------------
# Rows


def _row(
    entry: Entry, plan: LayoutPlan, label: str | None, problem: str | None, facts: FileFacts | None
) -> dict[str, Any]:
    problem = problem or (facts.problem if facts else None)
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
        "processed_path": None,
        "preprocess_key": None,
        "hair_fraction": None,
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


def build_rows(plan: LayoutPlan, entries: Sequence[Entry], label_map: Mapping[str, str],
               known: Mapping[str, FileFacts], max_pixels: int, preferred: set[str]) -> list[dict[str, Any]]:
    """Fresh rows for every entry, before splits: labels, file facts, then ambiguity and duplicates."""
    labels = [resolve_label(e.label, e.diagnosis, label_map) for e in entries]
    jobs = [(e.path, e.problem is None and problem is None) for e, (_, problem) in zip(entries, labels) if e.readable]
    facts = examine_files(jobs, known, max_pixels)
    rows = [
        _row(e, plan, label, e.problem or problem, facts.get(e.path))
        for e, (label, problem) in zip(entries, labels)
    ]
    return resolve_duplicates(resolve_ambiguous(rows, entries), preferred)


# --------------------------------------------------------------------------------------------------
# Splits


def split_counts(n: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` groups by largest remainder; every split with a positive share gets at least one
    group when there are enough groups for all of them."""
    names = list(proportions)
    exact = {k: n * proportions[k] for k in names}
    counts = {k: int(math.floor(exact[k] + 1e-9)) for k in names}
    for k in sorted(names, key=lambda k: (-(exact[k] - counts[k]), names.index(k)))[: n - sum(counts.values())]:
        counts[k] += 1
    positive = [k for k in names if proportions[k] > 0]
    if n >= len(positive):
        for k in positive:
            if counts[k] == 0:
                donor = max(names, key=lambda d: (counts[d], -names.index(d)))
                counts[donor] -= 1
                counts[k] += 1
    return counts


def assign_splits(groups: Mapping[str, str], cfg: SplitConfig) -> dict[str, str]:
    """group id -> split for groups (id -> label): stratified by label, seeded, deterministic."""
    proportions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    out: dict[str, str] = {}
    for label in sorted(set(groups.values())):
        ids = sorted(g for g, lab in groups.items() if lab == label)
        random.Random(f"{cfg.seed}:{label}").shuffle(ids)  # str seeds are stable across processes
        start = 0
        for name, count in split_counts(len(ids), proportions).items():
            out.update({g: name for g in ids[start : start + count]})
            start += count
    return out


def _group_of(row: Mapping[str, Any]) -> str:
    return f"lesion:{row['lesion_id']}" if row.get("lesion_id") else f"file:{row['source_path']}"


def fill_splits(rows: list[dict[str, Any]], root: str, cfg: SplitConfig, forced: str | None) -> list[dict[str, Any]]:
    """Give every accepted row of ``root`` without a split one: ``forced`` if given, else the split
    its lesion already has (anywhere in the manifest), else a fresh stratified assignment."""
    mine = [i for i, r in enumerate(rows) if r["source_root"] == root and r["status"] == ACCEPTED]
    out = list(rows)
    if forced is not None:
        for i in mine:
            out[i] = {**out[i], "split": forced}
        return out
    votes: dict[str, Counter[str]] = {}
    for r in rows:
        if r["status"] == ACCEPTED and r["split"] and r.get("lesion_id"):
            votes.setdefault(_group_of(r), Counter())[r["split"]] += 1
    fixed = {g: min(c, key=lambda s: (-c[s], s)) for g, c in votes.items()}
    todo = [i for i in mine if not rows[i]["split"]]
    labels: dict[str, Counter[str]] = {}
    for i in todo:
        group = _group_of(rows[i])
        if group not in fixed:
            labels.setdefault(group, Counter())[rows[i]["label"]] += 1
    fresh = assign_splits({g: min(c, key=lambda lab: (-c[lab], lab)) for g, c in labels.items()}, cfg)
    for i in todo:
        group = _group_of(rows[i])
        out[i] = {**out[i], "split": fixed.get(group) or fresh[group]}
    return out


# --------------------------------------------------------------------------------------------------
# Merging with the manifest already on disk


def _carry_over(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The fresh row for a key the manifest already has, keeping what must not change."""
    row = dict(new)
    if old["sample_id"] and old["sample_id"] == new["sample_id"]:
        for col in PREPROCESS_COLUMNS:  # same bytes: preprocessing is still valid
            row[col] = old[col]
        if old["status"] == QUARANTINED and str(old["reason"] or "").startswith("preprocess"):
            return _quarantine(row, old["reason"])  # preprocess decided this; ingest cannot undo it
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


# --------------------------------------------------------------------------------------------------
# Report and entry point


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


def ingest_source(
    source: Path,
    manifest_path: Path | str,
    cfg: IngestConfig,
    *,
    layout: str | None = None,
    split: str | None = None,
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
    label_map = cfg.label_map()
    plan = _plan_layout(Path(source), None if wanted == "auto" else wanted, label_map)

    manifest_path = manifest_path if storage.is_remote(manifest_path) else storage.local_path(manifest_path)
    before = conform(read_manifest(manifest_path, SEEDS), SEEDS)
    existing = before.to_pylist()
    images = scan_images(plan.root, cfg.extensions)
    entries = read_entries(plan, images, label_map)
    preferred = {r["source_path"] for r in existing if r["status"] == ACCEPTED}
    fresh = build_rows(plan, entries, label_map, _decode_cache(existing), cfg.max_pixels, preferred)

    rows, new = merge_rows(existing, fresh, str(plan.root))
    rows = fill_splits(rows, str(plan.root), cfg.splits, split)
    frame = pd.DataFrame(rows, columns=SEEDS.columns)
    if not (storage.exists(manifest_path) and conform(frame, SEEDS).equals(before)):
        write_manifest(frame, manifest_path, SEEDS)
    return _report(plan, manifest_path, rows, new)
