"""How ISIC releases state a lesion's class, beyond one plain diagnosis column.

* **Challenge ground truth, one-hot** (layout ``isic-challenge``). There is one row per image and one
  column per class, and the class column holds 1:
  * 2018 task 3: ``image, MEL, NV, BCC, AKIEC, BKL, DF, VASC``;
  * 2019 task 1: the same with ``AK`` for ``AKIEC``, plus ``SCC`` and ``UNK``;
  * 2017 part 3: ``image_id, melanoma, seborrheic_keratosis``, where both 0 means nevus.
  The class code becomes the diagnosis (``mel``, ``nv``, ...), which the label map turns into
  benign / malignant (``unk`` is not in it, so such rows are quarantined, never guessed).
* **Archive exports** (layout ``isic``). Older exports have ``benign_malignant`` and ``diagnosis``;
  newer ones have ``diagnosis_1`` (Benign / Malignant / Indeterminate) and the finer ``diagnosis_3``.
  The 2020 challenge CSV names images by ``image_name``.

These are pure functions of one CSV row (lower-cased column names), returning what the row says and,
when it says something unusable, a quarantine reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["ONE_HOT_2017", "ONE_HOT_CODES", "archive_diagnosis", "archive_label", "one_hot_columns",
           "one_hot_diagnosis"]

# 2018 / 2019 class columns (lower-cased); each is also the diagnosis it records.
ONE_HOT_CODES: tuple[str, ...] = ("mel", "nv", "bcc", "akiec", "ak", "bkl", "df", "vasc", "scc", "unk")
# 2017 part 3: column -> diagnosis; a row with neither is a nevus.
ONE_HOT_2017: dict[str, str] = {"melanoma": "melanoma", "seborrheic_keratosis": "seborrheic keratosis"}
NEITHER_2017 = "nevus"


def one_hot_columns(columns: Sequence[str]) -> list[str]:
    """The class columns of a one-hot ground-truth CSV, in file order."""
    known = set(ONE_HOT_CODES) | set(ONE_HOT_2017)
    return [c for c in columns if c in known]


def _flag(value: object) -> bool | None:
    """1 / 1.0 -> True, 0 / 0.0 -> False; anything else (blank, 0.5, 'yes') -> None."""
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return {0.0: False, 1.0: True}.get(number)


def one_hot_diagnosis(row: Mapping[str, object], columns: Sequence[str]) -> tuple[str | None, str | None]:
    """(diagnosis, problem) of a one-hot ground-truth row; ``columns`` from ``one_hot_columns``."""
    flags = {c: _flag(row.get(c, "")) for c in columns}
    bad = [c for c, f in flags.items() if f is None]
    if bad:
        shown = ", ".join(f"{c}={str(row.get(c, '')).strip() or 'blank'}" for c in bad[:3])
        return None, f"one-hot ground truth: not 0 or 1 ({shown})"
    on = [c for c, f in flags.items() if f]
    if set(columns) <= set(ONE_HOT_2017):  # 2017: nevus is the class with no column
        if not on:
            return NEITHER_2017, None
        if len(on) == 1:
            return ONE_HOT_2017[on[0]], None
    elif len(on) == 1:
        return on[0], None
    named = ", ".join(on) if on else "none"
    return None, f"one-hot ground truth: {len(on)} classes set ({named}), expected exactly one"


def archive_label(row: Mapping[str, object]) -> str | None:
    """The label as written in ``benign_malignant`` or, in newer exports, ``diagnosis_1``.

    ``diagnosis_1`` Benign / Malignant give the label. Indeterminate gives none, so that the finer
    diagnosis decides, through the label map.
    """
    for column in ("benign_malignant", "diagnosis_1"):
        value = str(row.get(column) or "").strip()
        if not value:
            continue
        if column == "diagnosis_1" and value.lower() == "indeterminate":
            return None
        return value
    return None


def archive_diagnosis(row: Mapping[str, object]) -> str | None:
    """The finest diagnosis a row states: ``diagnosis`` (older exports, 2020), else ``diagnosis_3``.

    "unknown" counts as no diagnosis: most of the 2020 challenge's benign images say so, and their
    ``benign_malignant`` label stands alone.
    """
    for column in ("diagnosis", "diagnosis_3"):
        value = str(row.get(column) or "").strip()
        if value and value.lower() != "unknown":
            return value
    return None
