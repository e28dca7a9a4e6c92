"""What the quality gate writes for people: counts by reason (overall, per class, per sampler),
class x sampler image grids (the paper's Fig. 5 / 7) and the memorisation audit's figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text
from dermt2im.core.specs import LABELS, QualityConfig
from dermt2im.core.workdir import Workdir
from dermt2im.quality.audit import SeedSet
from dermt2im.quality.checks import reason_code


@dataclass(frozen=True)
class QualityReport:
    accepted: int
    rejected: int
    reasons: dict[str, int]
    memorised: int
    report_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # name -> report file (markdown, json, PNGs)
    seeds_compared: int = 0

    def summary(self) -> str:
        total = self.accepted + self.rejected
        lines = [f"quality: {self.accepted} accepted, {self.rejected} rejected of {total}"]
        for reason, n in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
        audit = f"{self.memorised} near-copies of seed images" if self.seeds_compared else "no seed images to compare"
        lines.append(f"  memorisation audit: {audit} ({self.seeds_compared} seeds)")
        lines.append(f"  reports: {self.report_dir}")
        return "\n".join(lines)


def _counts(df: pd.DataFrame, by: str | None = None) -> list[dict]:
    if df.empty:
        return []
    d = df.assign(code=[reason_code(r) or "accepted" for r in df["reason"]])
    keys = [by] if by else []
    rows = []
    for k, g in (d.groupby(keys, sort=True) if keys else [((None,), d)]):
        row = {} if not by else {by: k[0] if isinstance(k, tuple) else k}
        row.update(total=len(g), accepted=int((g["status"] == "accepted").sum()),
                   rejected=int((g["status"] == "rejected").sum()))
        for code, n in g.loc[g["status"] == "rejected", "code"].value_counts().sort_index().items():
            row[code] = int(n)
        rows.append(row)
    return rows


def quality_tables(df: pd.DataFrame) -> dict[str, list[dict]]:
    return {"overall": _counts(df), "by_label": _counts(df, "label"), "by_sampler": _counts(df, "sampler")}


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_no images_\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, 0)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_quality_reports(workdir: Workdir, df: pd.DataFrame, q: QualityConfig) -> dict[str, Path]:
    tables = quality_tables(df)
    payload = {"thresholds": q.model_dump(mode="json"), **tables}
    if not df.empty:
        payload["rejected"] = [
            {"sample_key": k, "reason": r}
            for k, r in zip(df["sample_key"], df["reason"]) if isinstance(r, str)
        ]
    jpath = atomic_write_text(workdir.reports / "quality.json", json.dumps(payload, indent=2, default=str))
    md = ["# Quality gate", "", "Automatic replacement for the paper's manual discarding of noisy images.", ""]
    md += ["## Overall", "", _md_table(tables["overall"]), "## By class", "", _md_table(tables["by_label"])]
    md += ["## By sampler", "", _md_table(tables["by_sampler"])]
    md += ["## Thresholds", ""] + [f"- `{k}`: {v}" for k, v in q.model_dump(mode="json").items()]
    mpath = atomic_write_text(workdir.reports / "quality.md", "\n".join(md) + "\n")
    return {"quality_json": jpath, "quality_md": mpath}


def _write_grids(workdir: Workdir, df: pd.DataFrame, measured: list[dict], per_cell: int = 8) -> dict[str, Path]:
    from dermt2im.quality.grids import REJECTED, image_grid, save_png

    files: dict[str, Path] = {}
    grid_dir = workdir.reports / "grids"
    samplers = list(dict.fromkeys(df["sampler"]))
    overview_cells, overview_labels, overview_frames = [], [], []
    for label in [lb for lb in LABELS if lb in set(df["label"])]:
        cells, frames = [], []
        for sampler in samplers:
            sel = df[(df["label"] == label) & (df["sampler"] == sampler)]
            # accepted images first; fill up with rejected ones (red frame) so a sheet is never empty
            sel = sel.assign(_r=(sel["status"] != "accepted").astype(int)).sort_values(["_r", "index"])
            row, frame = [], []
            for i in sel.index[:per_cell]:
                if "rgb_small" in measured[i]:
                    row.append(measured[i]["rgb_small"])
                    frame.append(None if df.at[i, "status"] == "accepted" else REJECTED)
            cells.append(row)
            frames.append(frame)
        n_acc = int(((df["label"] == label) & (df["status"] == "accepted")).sum())
        title = f"{label}: {n_acc} accepted of {int((df['label'] == label).sum())} (red frame: rejected)"
        grid = image_grid(cells, row_labels=samplers, cell=96, title=title, frames=frames)
        files[f"grid_{label}"] = save_png(grid_dir / f"{label}.png", grid)
        overview_cells += cells
        overview_labels += [f"{label[:3]} {s}" for s in samplers]
        overview_frames += frames
    if overview_cells:
        grid = image_grid(overview_cells, row_labels=overview_labels, cell=96, title="class x sampler",
                          frames=overview_frames)
        files["grid_overview"] = save_png(grid_dir / "overview.png", grid)
    return files


def _write_audit(
    workdir: Workdir, df: pd.DataFrame, measured: list[dict], seeds: SeedSet, rows: list[dict], q: QualityConfig,
    closest: int = 8,
) -> dict[str, Path]:
    from dermt2im.quality.grids import histogram_png, pairs_sheet, save_png

    audit_dir = workdir.reports / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    dists = [r["distance"] for r in rows]
    flagged = [r for r in rows if r["memorised"]]
    ranked = sorted(rows, key=lambda r: r["distance"])[:closest]
    summary = {
        "method": "nearest seed under a normalised 32x32 colour-thumbnail DCT descriptor, min over 8 flips/rotations",
        "threshold": q.memorisation_threshold,
        "exclude_memorised": q.exclude_memorised,
        "seeds": len(seeds.ids),
        "synthetic": len(df),
        "compared": len(rows),
        "flagged": len(flagged),
        "distance": (
            {"min": float(np.min(dists)), "median": float(np.median(dists)), "max": float(np.max(dists))} if dists else None
        ),
        "closest": [
            {"sample_key": df.at[r["i"], "sample_key"], "seed": seeds.ids[r["seed"]], "distance": r["distance"],
             "memorised": r["memorised"]}
            for r in ranked
        ],
    }
    files["audit_json"] = atomic_write_text(audit_dir / "audit.json", json.dumps(summary, indent=2))
    files["audit_histogram"] = atomic_write_bytes(
        audit_dir / "distance_histogram.png",
        histogram_png(dists, threshold=q.memorisation_threshold, title="distance to the nearest seed image",
                      xlabel="descriptor distance (0 = identical)"),
    )
    pairs = [
        (measured[r["i"]]["rgb_small"], seeds.thumbs[r["seed"]],
         f"{df.at[r['i'], 'sample_key']}  d={r['distance']:.3f}{'  FLAGGED' if r['memorised'] else ''}")
        for r in ranked
    ]
    files["audit_pairs"] = save_png(audit_dir / "closest_pairs.png",
                                    pairs_sheet(pairs, cell=96, title="closest synthetic / seed pairs"))
    md = [
        "# Memorisation audit",
        "",
        f"{len(rows)} synthetic images compared with {len(seeds.ids)} seed images; "
        f"**{len(flagged)} flagged** as near-copies (distance < {q.memorisation_threshold:g})"
        + (", excluded from training sets." if q.exclude_memorised else ", kept (exclude_memorised is off)."),
        "",
        summary["method"] + ".",
        "",
        "| synthetic | nearest seed | distance | flagged |",
        "|---|---|---|---|",
    ]
    md += [f"| {c['sample_key']} | {c['seed'][:16]} | {c['distance']:.4f} | {'yes' if c['memorised'] else ''} |"
           for c in summary["closest"]]
    md += ["", "![histogram](distance_histogram.png)", "", "![closest pairs](closest_pairs.png)"]
    files["audit_md"] = atomic_write_text(audit_dir / "audit.md", "\n".join(md) + "\n")
    return files
