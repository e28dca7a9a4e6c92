"""Labels: which diagnosis is benign and which malignant, and how one input's label is decided.

The table is explicit and overridable (``ingest.diagnosis_labels``); an unknown diagnosis, or a
diagnosis that disagrees with an explicit label, is quarantined, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping

from dermt2im.core.specs import LABELS, IngestConfig, Label

# Diagnosis -> label. Keys are normalised (lower case, '_' and '-' read as spaces); see
# ``normalise_diagnosis``. Users extend or override this with ``ingest.diagnosis_labels``.
DEFAULT_DIAGNOSIS_LABELS: dict[str, Label] = {
    # malignant
    "melanoma": "malignant",
    "mel": "malignant",
    "melanoma metastasis": "malignant",
    "basal cell carcinoma": "malignant",
    "bcc": "malignant",
    "squamous cell carcinoma": "malignant",
    "scc": "malignant",
    "actinic keratosis": "malignant",  # HAM10000 'akiec' (AK / Bowen's disease) is grouped as malignant
    "akiec": "malignant",
    "ak": "malignant",  # ISIC 2019's code for the same class
    # ISIC Archive diagnosis_3 names (newer exports)
    "melanoma, nos": "malignant",
    "melanoma invasive": "malignant",
    "melanoma in situ": "malignant",
    "squamous cell carcinoma, nos": "malignant",
    "squamous cell carcinoma in situ": "malignant",
    "solar or actinic keratosis": "malignant",
    # benign
    "nevus": "benign",
    "nv": "benign",
    "melanocytic nevus": "benign",
    "benign keratosis": "benign",
    "bkl": "benign",
    "seborrheic keratosis": "benign",
    "solar lentigo": "benign",
    "lentigo nos": "benign",
    "lichenoid keratosis": "benign",
    "pigmented benign keratosis": "benign",
    "dermatofibroma": "benign",
    "df": "benign",
    "vascular lesion": "benign",
    "vasc": "benign",
    "angioma": "benign",
    "angiokeratoma": "benign",
    "pyogenic granuloma": "benign",
    "hemorrhage": "benign",
    "hemangioma": "benign",
    "lichen planus like keratosis": "benign",
}


def normalise_diagnosis(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())


def label_map(cfg: IngestConfig) -> dict[str, Label]:
    """The diagnosis table with ``ingest.diagnosis_labels`` merged in (normalised keys)."""
    merged = dict(DEFAULT_DIAGNOSIS_LABELS)
    merged.update({normalise_diagnosis(k): v for k, v in cfg.diagnosis_labels.items()})
    return merged


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
