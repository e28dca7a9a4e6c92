"""What hair removal did, per class: ``W/reports/preprocess-<dataset>.md`` and ``.json``, one pair
per dataset (the seeds, each test set), each written whole from its manifest: reports are for
people, and none is read back.

No preprocessing step may change one class more than the other: a class-dependent change is a
shortcut a classifier learns. Two figures per dataset and class:

* what it changed: the share of each image's pixels moved by more than 10 grey levels
  (``hair_changed_fraction``, recorded per image), median and 90th percentile, and how many images
  had hair found at all. On hair-free images this should be near zero in both classes;
* what it restores: hairs drawn (``dermt2im.phantoms.draw_hairs``, 12 per image) on up to
  ``CHECK_IMAGES`` of the class's own processed images, removed again; the PSNR gain
  PSNR(restored, image) - PSNR(with drawn hair, image), median and minimum. The same drawing per
  image every time (seeded by its sample id), so the figure only moves when the method or the
  images do.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermt2im.core import storage
from dermt2im.core.fileio import atomic_write_text
from dermt2im.core.views import seeds_view
from dermt2im.core.specs import LABELS, PreprocessConfig

CHECK_IMAGES = 6
HAIR_FOUND = 0.01  # share of an image's pixels masked as hair from which it "had hair" (quality.max_hair_fraction)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def drawn_hair_gain(rgb: np.ndarray, seed: int, cfg: PreprocessConfig) -> float:
    """PSNR gain (dB) of removing 12 hairs drawn on ``rgb``."""
    from dermt2im.phantoms import draw_hairs
    from dermt2im.preprocess.hair import remove_hair

    hairy = draw_hairs(rgb, np.random.default_rng(seed), n=12)
    return psnr(remove_hair(hairy, cfg)[0], rgb) - psnr(hairy, rgb)


def _load(path: str | Path) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
        return np.asarray(im.convert("RGB"))


def _stats(values: pd.Series) -> dict[str, float | None]:
    v = values.dropna().astype(float)
    if v.empty:
        return {"median": None, "p90": None, "max": None}
    return {"median": float(v.median()), "p90": float(v.quantile(0.9)), "max": float(v.max())}


def class_figures(df: pd.DataFrame, cfg: PreprocessConfig) -> dict[str, dict[str, Any]]:
    """Per class of an accepted, processed dataset: the change and restore figures (module docstring)."""
    out: dict[str, dict[str, Any]] = {}
    done = df[(df["status"] == "accepted") & df["processed_path"].notna()]
    for label in LABELS:
        rows = done[done["label"] == label].sort_values("sample_id")
        gains = []
        if cfg.hair_removal:
            for sid, path in list(zip(rows["sample_id"], rows["processed_path"]))[:CHECK_IMAGES]:
                if storage.is_file(path):
                    seed = int.from_bytes(hashlib.sha256(str(sid).encode()).digest()[:4], "little")
                    gains.append(drawn_hair_gain(_load(path), seed, cfg))
        out[label] = {"images": len(rows), "with_hair": int((rows["hair_fraction"].astype(float) > HAIR_FOUND).sum()),
                      "changed": _stats(rows["hair_changed_fraction"]),
                      "drawn_hair_gain_db": {"median": float(np.median(gains)) if gains else None,
                                             "min": float(np.min(gains)) if gains else None, "images": len(gains)}}
    return out


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.2%}"


def _db(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def report_path(reports: Path, dataset: str, suffix: str = ".md") -> Path:
    """``W/reports/preprocess-<dataset><suffix>``."""
    return Path(reports) / f"preprocess-{dataset}{suffix}"


def write_preprocess_report(reports: Path, manifests: Mapping[str, Path | str], cfg: PreprocessConfig) -> dict[str, Any]:
    """``preprocess-<dataset>.json`` and ``.md`` for every dataset; returns the figures."""
    figures = {name: class_figures(seeds_view(m), cfg) for name, m in manifests.items()}
    for name, per_class in figures.items():
        _write_dataset(reports, name, per_class, cfg)
    return figures


def _write_dataset(reports: Path, name: str, per_class: dict[str, Any], cfg: PreprocessConfig) -> None:
    atomic_write_text(report_path(reports, name, ".json"), json.dumps(
        {"config": cfg.model_dump(mode="json"), "dataset": name, "classes": per_class}, indent=2))
    md = [f"# Preprocessing of {name}: hair removal per class", "",
          "No preprocessing step may change one class more than the other. *Changed*: share of an image's pixels "
          "that hair removal moved by more than 10 grey levels (on hair-free images it should be near 0 in both "
          f"classes). *Drawn-hair gain*: 12 hairs drawn on up to {CHECK_IMAGES} of the class's processed images and "
          "removed again, PSNR(restored) - PSNR(with hair), in dB.", "",
          "| dataset | class | images | with hair found | changed: median | p90 | max | drawn-hair gain: median | min |",
          "|---|---|---|---|---|---|---|---|---|"]
    for label, f in per_class.items():
        md.append(f"| {name} | {label} | {f['images']} | {f['with_hair']} | {_pct(f['changed']['median'])} | "
                  f"{_pct(f['changed']['p90'])} | {_pct(f['changed']['max'])} | "
                  f"{_db(f['drawn_hair_gain_db']['median'])} | {_db(f['drawn_hair_gain_db']['min'])} |")
    atomic_write_text(report_path(reports, name), "\n".join(md) + "\n")
