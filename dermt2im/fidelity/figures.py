"""The fidelity report's figures (matplotlib's object API, no pyplot: safe in worker threads).

* ``strata_bars``: one panel per headline metric, grouped bars per stratum value (class, or sampler)
  for every set, with the bootstrap interval as an error bar;
* ``ita_histogram``: the ITA of every set side by side, with the category bounds;
* ``nearest_seed_histogram``: nearest-seed distances of held-out real images and of each set, with
  the copy cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core.fileio import atomic_path
from dermt2im.fidelity.report import ImageSet
from dermt2im.fidelity.skin_tone import ITA_BINS

KIND_ORDER = {"floor": 0, "test": 1, "synthetic": 2, "ceiling": 3}


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def set_label(kind: str, name: str, run: str) -> str:
    if kind == "synthetic":
        return run if run and run != name else name
    return {"floor": "held-out real (floor)", "ceiling": "noise (ceiling)"}.get(kind, f"test: {name}")


def _sets(tab: pd.DataFrame) -> list[tuple[str, str, str]]:
    keys = tab[["kind", "set", "run"]].drop_duplicates().itertuples(index=False, name=None)
    return sorted(keys, key=lambda k: (KIND_ORDER.get(k[0], 9), k[1], k[2]))


def strata_bars(tab: pd.DataFrame, stratum: str, metrics: Sequence[str], path: Path, title: str) -> Path | None:
    """Bars with intervals: x = the stratum's values, one bar per set, one panel per metric."""
    rows = tab[tab["stratum"] == stratum]
    metrics = [m for m in metrics if m in rows and rows[m].notna().any()]
    if rows.empty or not metrics:
        return None
    values = list(dict.fromkeys(rows["value"]))
    sets = [s for s in _sets(rows)]
    fig = _figure(max(5.0, 1.2 + 0.9 * len(values) * max(1, len(sets)) / 2) , 2.6 * len(metrics) + 0.4)
    width = 0.8 / max(1, len(sets))
    for p, metric in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, p + 1)
        for i, (kind, name, run) in enumerate(sets):
            mine = rows[(rows["kind"] == kind) & (rows["set"] == name) & (rows["run"] == run)].set_index("value")
            y = np.array([mine[metric].get(v, math.nan) for v in values], float)
            lo = np.array([mine[f"{metric}.low"].get(v, math.nan) for v in values], float)
            hi = np.array([mine[f"{metric}.high"].get(v, math.nan) for v in values], float)
            err = np.vstack([np.where(np.isfinite(lo), y - lo, 0), np.where(np.isfinite(hi), hi - y, 0)])
            x = np.arange(len(values)) + (i - (len(sets) - 1) / 2) * width
            ax.bar(x, np.nan_to_num(y), width, yerr=np.clip(err, 0, None), capsize=3, label=set_label(kind, name, run),
                   alpha=0.9 if kind == "synthetic" else 0.6)
        ax.set_xticks(np.arange(len(values)), [str(v) for v in values], rotation=20 if len(values) > 3 else 0,
                      fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        if metric.startswith(("kid.", "fid.")):  # noise scores orders of magnitude above real images
            ax.set_yscale("symlog", linthresh=1.0)
        if p == 0:
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7, ncols=min(3, len(sets)))
    return _save(fig, path)


def ita_histogram(sets: Sequence[ImageSet], reference: ImageSet, path: Path) -> Path | None:
    groups = [("training seeds", reference.rows["ita"].to_numpy(float))]
    groups += [(set_label(s.kind, s.name, s.run), s.rows["ita"].to_numpy(float)) for s in sets]
    groups = [(n, v[np.isfinite(v)]) for n, v in groups if np.isfinite(v).any()]
    if not groups:
        return None
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    lo = min(-60.0, min(float(v.min()) for _, v in groups))
    hi = max(100.0, max(float(v.max()) for _, v in groups))
    bins = np.linspace(lo, hi, 41)
    for name, v in groups:
        ax.hist(v, bins=bins, histtype="step", density=True, lw=1.5, label=f"{name} (n={len(v)})")
    for category, bound in ITA_BINS[:-1]:
        ax.axvline(bound, color="grey", lw=0.6, ls=":")
        ax.text(bound + 1, ax.get_ylim()[1] * 0.95, category, fontsize=6, rotation=90, va="top", color="grey")
    ax.set_xlabel("ITA of the skin around the lesion (degrees; higher = lighter)")
    ax.set_ylabel("density")
    ax.set_title("Skin tone (ITA) per set, with the Chardon / Del Bino categories", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def nearest_seed_histogram(sets: Sequence[ImageSet], copy_cut: float, path: Path) -> Path | None:
    groups = [(set_label(s.kind, s.name, s.run), s.rows["nearest_seed"].to_numpy(float)) for s in sets
              if s.kind in ("floor", "synthetic", "ceiling")]
    groups = [(n, v[np.isfinite(v)]) for n, v in groups if np.isfinite(v).any()]
    if not groups:
        return None
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    hi = max(float(v.max()) for _, v in groups)
    bins = np.linspace(0.0, hi * 1.02 + 1e-9, 41)
    for name, v in groups:
        ax.hist(v, bins=bins, histtype="step", density=True, lw=1.5, label=f"{name} (n={len(v)})")
    if math.isfinite(copy_cut):
        ax.axvline(copy_cut, color="red", lw=1, ls="--", label="5 % of held-out real images are closer")
    ax.set_xlabel("distance to the nearest training seed (the memorisation audit's global descriptor)")
    ax.set_ylabel("density")
    ax.set_title("Memorisation: nearest-seed distances", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)
