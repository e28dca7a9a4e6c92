"""Each input's licence and attribution, as its source states them, and the terms they add up to.

Where a licence is read, first found wins:

1. the row of the metadata CSV: a ``license`` / ``licence`` / ``copyright_license`` (ISIC Archive
   exports) / ``license_note`` column, with ``attribution`` (ISIC) beside it;
2. a licence file (``LICENSE``, ``LICENCE``, ``COPYING``, with or without .txt / .md) in the image's
   folder or the nearest folder above it within the source, with the attribution of an
   ``ATTRIBUTION`` file there; such files describe the inputs and are no inputs themselves;
3. otherwise ``unknown``.

The text as found is kept (``license_note``, with where it came from) and normalised to an SPDX
identifier where it names a Creative Commons licence (``CC0-1.0``, ``CC-BY-4.0``, ``CC-BY-NC-4.0``,
...: the ISIC Archive's three are CC-0, CC-BY and CC-BY-NC, image by image); a text that names none is
``other``. ``terms`` says what a set made from such inputs may be used for: any non-commercial
input makes it non-commercial, any share-alike or no-derivatives input is named, attribution is
owed where any input asks for it, and an unknown or unrecognised licence leaves the terms open.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

UNKNOWN = "unknown"
OTHER = "other"
LICENCE_COLUMNS: tuple[str, ...] = ("license", "licence", "copyright_license", "license_note", "licence_note")
ATTRIBUTION_COLUMNS: tuple[str, ...] = ("attribution", "license_attribution", "licence_attribution")
_STEMS_LICENCE = ("license", "licence", "copying")
_STEMS_ATTRIBUTION = ("attribution", "attributions")
_SUFFIXES = ("", ".txt", ".md")
_MAX_TEXT = 300

# (pattern on the normalised text, licence family) - the most specific first
_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"cc-by-nc-sa|attribution-noncommercial-sharealike", "CC-BY-NC-SA"),
    (r"cc-by-nc-nd|attribution-noncommercial-noderivatives|attribution-noncommercial-noderivs", "CC-BY-NC-ND"),
    (r"cc-by-nc|attribution-noncommercial", "CC-BY-NC"),
    (r"cc-by-sa|attribution-sharealike", "CC-BY-SA"),
    (r"cc-by-nd|attribution-noderivatives|attribution-noderivs", "CC-BY-ND"),
    (r"cc-by|creative-commons-attribution|^attribution-\d", "CC-BY"),
    (r"\bcc-?0\b|cc-zero|creative-commons-zero|public-domain-dedication|waived-all-copyright", "CC0"),
)
# Hugging Face's licence identifiers (the dataset card's `license`)
HF_IDS = {"CC0-1.0": "cc0-1.0", "CC-BY-4.0": "cc-by-4.0", "CC-BY-SA-4.0": "cc-by-sa-4.0", "CC-BY-NC-4.0": "cc-by-nc-4.0",
          "CC-BY-ND-4.0": "cc-by-nd-4.0", "CC-BY-NC-SA-4.0": "cc-by-nc-sa-4.0", "CC-BY-NC-ND-4.0": "cc-by-nc-nd-4.0"}


@dataclass(frozen=True)
class Licence:
    id: str  # CC0-1.0, CC-BY-4.0, ..., "other" (stated but not recognised) or "unknown" (not stated)
    note: str = ""  # where it was read and the text as found
    attribution: str = ""

    def row(self) -> dict[str, str | None]:
        return {"license": self.id, "license_note": self.note or None, "attribution": self.attribution or None}


UNSTATED = Licence(UNKNOWN)


def _normalise(text: str) -> str:
    return re.sub(r"[\s_]+", "-", text.strip().lower())


def licence_id(text: str | None) -> str:
    """The SPDX identifier a licence text names (``other`` when it names none, ``unknown`` when empty)."""
    if not text or not str(text).strip():
        return UNKNOWN
    norm = _normalise(str(text))
    for pattern, family in _FAMILIES:
        m = re.search(pattern, norm)
        if m:
            if family == "CC0":
                return "CC0-1.0"
            version = re.search(r"(\d)\.(\d)", norm[m.end():m.end() + 24])
            return f"{family}-{version.group(1)}.{version.group(2)}" if version else f"{family}-4.0"
    return OTHER


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 1] + "…"


def from_row(row: Mapping[str, object], origin: str) -> Licence | None:
    """The licence a metadata CSV row states (lower-cased column names), or None."""
    for column in LICENCE_COLUMNS:
        value = str(row.get(column) or "").strip()
        if value:
            attribution = next((str(row[c]).strip() for c in ATTRIBUTION_COLUMNS if str(row.get(c) or "").strip()), "")
            return Licence(licence_id(value), f"{origin}, column {column}: {_short(value)}", _short(attribution))
    return None


def _named(folder: Path, stems: Sequence[str]) -> Path | None:
    try:
        names = {n.lower(): n for n in os.listdir(folder)}
    except OSError:
        return None
    for stem in stems:
        for suffix in _SUFFIXES:
            if stem + suffix in names and (folder / names[stem + suffix]).is_file():
                return folder / names[stem + suffix]
    return None


def licence_files(root: Path) -> list[Path]:
    """Every licence or attribution file under ``root`` (descriptions of the inputs, not inputs)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            stem, suffix = os.path.splitext(name.lower())
            if stem in (*_STEMS_LICENCE, *_STEMS_ATTRIBUTION) and suffix in _SUFFIXES:
                out.append(Path(dirpath) / name)
    return sorted(out)


def _read(path: Path, limit: int = 20_000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return ""


def folder_licence(folder: Path, root: Path) -> Licence | None:
    """The licence stated by a licence file in ``folder`` or the nearest folder above it up to ``root``."""
    folder, root = Path(folder), Path(root)
    while True:
        found = _named(folder, _STEMS_LICENCE)
        if found is not None:
            text = _read(found)
            attribution_file = _named(folder, _STEMS_ATTRIBUTION)
            attribution = _short(_read(attribution_file)) if attribution_file else ""
            first = next((line.strip() for line in text.splitlines() if line.strip()), "")
            where = os.path.relpath(found, root)
            return Licence(licence_id(text), f"{where}: {_short(first)}", attribution)
        if folder == root or root not in folder.parents:
            return None
        folder = folder.parent


def resolve(paths: Iterable[str], stated: Sequence[Licence | None], root: Path) -> list[Licence]:
    """Each input's licence: what its metadata row stated, else its folders' licence file, else unknown."""
    cache: dict[str, Licence | None] = {}
    out = []
    for path, licence in zip(paths, stated):
        if licence is None:
            folder = os.path.dirname(path)
            if folder not in cache:
                cache[folder] = folder_licence(Path(folder), Path(root))
            licence = cache[folder]
        out.append(licence or UNSTATED)
    return out


# --- what a set made from them may be used for -----------------------------------------------------


@dataclass(frozen=True)
class Terms:
    counts: dict[str, int]  # licence id -> inputs
    non_commercial: bool
    share_alike: bool
    no_derivatives: bool
    attribution: bool
    open_questions: int  # inputs whose licence is unknown or unrecognised

    @property
    def hf_licence(self) -> str:
        """The Hugging Face licence id of the most restrictive input licence (``unknown`` / ``other``
        when any input's is)."""
        if self.open_questions:
            return UNKNOWN if self.counts.get(UNKNOWN) else OTHER
        if not self.counts:
            return UNKNOWN
        parts = ["cc-by"] if self.attribution else []
        if not parts:
            return "cc0-1.0"
        parts += ["nc"] if self.non_commercial else []
        parts += ["sa"] if self.share_alike else (["nd"] if self.no_derivatives else [])
        return "-".join(parts) + "-4.0"

    def sentences(self) -> list[str]:
        total = sum(self.counts.values())
        listed = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        out = [f"Seed licences as recorded at ingest: {listed or 'none'} ({total} images)."]
        if self.non_commercial:
            out.append("At least one seed image is licensed for non-commercial use only (CC BY-NC): the set is "
                       "for NON-COMMERCIAL use.")
        if self.share_alike:
            out.append("At least one seed image is share-alike (CC BY-SA): read conservatively, the set is shared "
                       "under the same terms.")
        if self.no_derivatives:
            out.append("At least one seed image forbids derivatives (CC BY-ND): whether images generated by a "
                       "model fitted on it are derivatives is not settled; check before publishing.")
        if self.attribution:
            out.append("Attribution is owed to the creators of the CC BY seed images (listed below).")
        if self.open_questions:
            out.append(f"{self.open_questions} seed image(s) have no licence the source states or that could be "
                       "recognised: the terms cannot be established from the seeds alone; check them before "
                       "redistributing.")
        if not (self.non_commercial or self.share_alike or self.no_derivatives or self.attribution
                or self.open_questions) and total:
            out.append("Every seed image is CC0 (public domain dedication): the seeds add no restriction.")
        return out


def terms(licence_ids: Iterable[str | None]) -> Terms:
    counts: dict[str, int] = {}
    for lid in licence_ids:
        key = lid if isinstance(lid, str) and lid else UNKNOWN
        counts[key] = counts.get(key, 0) + 1
    ids = set(counts)
    return Terms(counts=counts, non_commercial=any("-NC" in i for i in ids), share_alike=any("-SA" in i for i in ids),
                 no_derivatives=any("-ND" in i for i in ids), attribution=any(i.startswith("CC-BY") for i in ids),
                 open_questions=counts.get(UNKNOWN, 0) + counts.get(OTHER, 0))
