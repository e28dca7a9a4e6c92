"""Pictures of the quality gate and the audit: class x sampler (or source) grids, the paper's
Fig. 5 / 7, and the memorisation audit's report (closest synthetic / seed pairs, a histogram)."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text
from dermt2im.core.specs import LABELS, QualityConfig
from dermt2im.core.workdir import Workdir
from dermt2im.quality.audit import SeedIndex

OWN = "dermt2im"


def grid_rows(df: pd.DataFrame) -> list[str]:
    """One grid row per sampler of the factory's own renders and per imported source."""
    return [s if src == OWN else src for s, src in zip(df["sampler"].fillna("?").astype(str), df["source"])]


def write_grids(workdir: Workdir, df: pd.DataFrame, measured: list[dict], per_cell: int = 8) -> dict[str, Path]:
    from dermt2im.quality.grids import REJECTED, image_grid, save_png

    files: dict[str, Path] = {}
    grid_dir = workdir.reports / "grids"
    df = df.assign(_row=grid_rows(df)) if len(df) else df.assign(_row=[])
    rows = list(dict.fromkeys(df["_row"]))
    overview_cells, overview_labels, overview_frames = [], [], []
    for label in [lb for lb in LABELS if lb in set(df["label"])]:
        cells, frames = [], []
        for row_key in rows:
            sel = df[(df["label"] == label) & (df["_row"] == row_key)]
            # accepted images first; fill up with rejected ones (red frame) so a sheet is never empty
            sel = sel.assign(_r=(sel["status"] != "accepted").astype(int)).sort_values(["_r", "index"])
            row, frame = [], []
            for i in sel.index:
                if len(row) < per_cell and "rgb_small" in measured[i]:
                    row.append(measured[i]["rgb_small"])
                    frame.append(None if df.at[i, "status"] == "accepted" else REJECTED)
            cells.append(row)
            frames.append(frame)
        n_acc = int(((df["label"] == label) & (df["status"] == "accepted")).sum())
        title = f"{label}: {n_acc} accepted of {int((df['label'] == label).sum())} (red frame: rejected)"
        grid = image_grid(cells, row_labels=rows, cell=96, title=title, frames=frames)
        files[f"grid_{label}"] = save_png(grid_dir / f"{label}.png", grid)
        overview_cells += cells
        overview_labels += [f"{label[:3]} {s}" for s in rows]
        overview_frames += frames
    if overview_cells:
        grid = image_grid(overview_cells, row_labels=overview_labels, cell=96, title="class x sampler / source",
                          frames=overview_frames)
        files["grid_overview"] = save_png(grid_dir / "overview.png", grid)
    return files


def _audit_summary(df: pd.DataFrame, index: SeedIndex, rows: list[dict], q: QualityConfig,
                   closest: int) -> dict[str, Any]:
    dists = [r["distance"] for r in rows]
    ranked = sorted(rows, key=lambda r: (not r["memorised"], -r["inliers"], r["distance"]))[:closest]
    return {
        "method": "retrieval by a global descriptor (colour-thumbnail DCT over 8 flips / quarter turns x 6 crops "
                  "of every seed), then SIFT matches verified by a RANSAC homography of plausible copy geometry",
        "min_inliers": q.memorisation_min_inliers, "global_threshold": q.memorisation_threshold,
        "exclude_memorised": q.exclude_memorised, "seeds": index.size, "synthetic": len(df), "compared": len(rows),
        "skipped": index.size == 0,
        "flagged": sum(r["memorised"] for r in rows),
        "methods": {m: sum(r["method"] == m for r in rows) for m in ("geometric", "global")},
        "distance": ({"min": float(np.min(dists)), "median": float(np.median(dists)), "max": float(np.max(dists))}
                     if dists else None),
        "closest": [{"sample_key": df.at[r["i"], "sample_key"], "seed": index.ids[r["seed"]],
                     "distance": r["distance"], "inliers": r["inliers"], "method": r["method"],
                     "memorised": r["memorised"]} for r in ranked],
    }


def _histogram_plot(rows: list[dict], q: QualityConfig) -> dict[str, Any]:
    return {"values": [int(r["inliers"]) for r in rows], "threshold": q.memorisation_min_inliers,
            "title": "geometrically verified matches with the best seed candidate", "xlabel": "RANSAC inliers"}


def audit_histogram(rows: list[dict], q: QualityConfig, draw: Callable[..., Future] | None = None) -> Future | None:
    """The audit's inlier histogram (PNG bytes) being drawn: ``draw(fn, *args, **kwargs)`` runs the
    plotting elsewhere (the gate's measuring processes, ``MeasurePool.call``) while this process
    goes on; None when nothing was compared."""
    from dermt2im.quality.grids import histogram_png
    from dermt2im.quality.pool import call_here

    return (draw or call_here)(histogram_png, **_histogram_plot(rows, q)) if rows else None


def write_audit(workdir: Workdir, df: pd.DataFrame, measured: list[dict], index: SeedIndex, rows: list[dict],
                q: QualityConfig, closest: int = 8, histogram: Future | None = None) -> dict[str, Path]:
    """``rows``: per compared image, ``i`` (row position), ``seed``, ``distance``, ``inliers``,
    ``method`` and ``memorised``. ``histogram``: the inlier histogram already being drawn
    (``audit_histogram``), else drawn here."""
    from dermt2im.quality.grids import histogram_png, pairs_sheet, save_png

    audit_dir = workdir.reports / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    summary = _audit_summary(df, index, rows, q, closest)
    files = {"audit_json": atomic_write_text(audit_dir / "audit.json", json.dumps(summary, indent=2))}
    pictures = ["inlier_histogram.png", "closest_pairs.png"]
    if summary["skipped"]:  # nothing was compared: no pictures (left from an earlier audit: gone)
        for name in pictures:
            (audit_dir / name).unlink(missing_ok=True)
    else:
        plot = _histogram_plot(rows, q)
        histogram = histogram or audit_histogram(rows, q)
        ranked = sorted(rows, key=lambda r: (not r["memorised"], -r["inliers"], r["distance"]))[:closest]
        pairs = [(measured[r["i"]]["rgb_small"], index.thumbs[r["seed"]],
                  f"{df.at[r['i'], 'sample_key']}  {r['inliers']} inliers d={r['distance']:.2f}"
                  f"{'  FLAGGED' if r['memorised'] else ''}") for r in ranked]
        files["audit_pairs"] = save_png(audit_dir / pictures[1],
                                        pairs_sheet(pairs, cell=96, title="closest synthetic / seed pairs"))
        try:
            png = histogram.result()
        except Exception:  # noqa: BLE001 - the process drawing it died: drawn here instead
            png = histogram_png(**plot)
        files["audit_histogram"] = atomic_write_bytes(audit_dir / pictures[0], png)
    if summary["skipped"]:
        head = (f"**Skipped**: this workdir has no accepted, preprocessed seed images, so the {len(df)} synthetic "
                "images were not compared with any (ingest and preprocess the seeds, then run quality again).")
    else:
        head = (f"{len(rows)} synthetic images compared with {index.size} seed images; **{summary['flagged']} "
                f"flagged** as near-copies" + (", excluded from training sets." if q.exclude_memorised
                                                else ", kept (exclude_memorised is off)."))
    md = ["# Memorisation audit", "", head, "", summary["method"] + f"; a copy has at least "
          f"{q.memorisation_min_inliers} inliers. Images too small or plain for keypoints: global distance < "
          f"{q.memorisation_threshold:g} ({summary['methods'].get('global', 0)} images).", "",
          "| synthetic | seed | inliers | distance | method | flagged |", "|---|---|---|---|---|---|"]
    md += [f"| {c['sample_key']} | {c['seed'][:16]} | {c['inliers']} | {c['distance']:.3f} | {c['method']} | "
           f"{'yes' if c['memorised'] else ''} |" for c in summary["closest"]]
    if not summary["skipped"]:
        md += ["", "![inliers](inlier_histogram.png)", "", "![closest pairs](closest_pairs.png)"]
    files["audit_md"] = atomic_write_text(audit_dir / "audit.md", "\n".join(md) + "\n")
    return files
