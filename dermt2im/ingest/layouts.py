"""Dataset layouts: what kind of source a folder is, and which metadata CSV names its images.

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
ids. ``detect_layout`` picks one and says why; problems with the source as a whole raise
``IngestError`` before any file is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dermt2im.core.errors import DermT2imError
from dermt2im.core.specs import LABELS, IngestConfig
from dermt2im.core.workdir import WORKDIR_MARKER, is_workdir
from dermt2im.ingest import isic_formats
from dermt2im.ingest.labels import label_map, normalise_diagnosis
from dermt2im.ingest.licences import licence_files

LAYOUTS: tuple[str, ...] = ("isic", "isic-challenge", "ham10000", "folders", "csv")


class IngestError(DermT2imError, ValueError):
    """A problem with the source as a whole, found before any file is read."""


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
    # the source's readable CSVs and licence / attribution files: descriptions of the inputs, not inputs
    metadata: tuple[Path, ...] = ()


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
        dirnames[:] = sorted(d for d in dirnames if not is_workdir(os.path.join(dirpath, d)))
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
    folder = source if source.is_dir() else source.parent
    if is_workdir(folder):
        raise IngestError(
            f"{folder} is a derm-t2im workdir (it holds {WORKDIR_MARKER}): its images are the factory's own "
            "outputs, never real seeds. Point SOURCE at the folder of real images, and keep --workdir apart "
            "from it or below it (a workdir below the source is skipped)")
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

    metadata = tuple(p for p, c in columns.items() if isinstance(c, list))
    metadata += tuple(licence_files(root))

    def plan(layout: str, explanation: str, csv_path: Path | None = None) -> LayoutPlan:
        return LayoutPlan(layout, explanation, root, csv_path, os.path.normpath(given), metadata)

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
    plan = _plan_layout(Path(source), None, label_map(cfg))
    return plan.layout, plan.explanation
