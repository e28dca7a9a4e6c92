"""What the quality gate writes for people: ``W/reports/quality.md`` and ``quality.json``.

Counts by reason (overall, per class, per sampler or source); for every check its cut, where the cut
came from (config, calibrated on the seeds, fallback) and how many real seeds it would reject; for
every flag how many synthetic images and real seeds it is set on; the shortcut audit (per class flag
rates, and the flags called out by name). Grids and the audit's pictures are in ``figures``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dermt2im.core.fileio import atomic_write_text
from dermt2im.core.specs import FLAGS, QualityConfig
from dermt2im.core.workdir import Workdir
from dermt2im.quality.checks import reason_code, thresholds
from dermt2im.quality.shortcuts import AUDITED_FLAGS, has_flag


@dataclass(frozen=True)
class QualityReport:
    accepted: int
    rejected: int
    reasons: dict[str, int]
    memorised: int
    report_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # name -> report file (markdown, json, PNGs)
    seeds_compared: int = 0
    shortcuts: tuple[str, ...] = ()  # flags called out by the shortcut audit, as sentences
    quarantined: int = 0  # imported files with bad input (never assessed)

    def summary(self) -> str:
        total = self.accepted + self.rejected
        lines = [f"quality: {self.accepted} accepted, {self.rejected} rejected of {total}"
                 + (f" ({self.quarantined} imported files quarantined as bad input)" if self.quarantined else "")]
        for reason, n in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
        if self.seeds_compared:
            lines.append(f"  memorisation audit: {self.memorised} near-copies of seed images "
                         f"({self.seeds_compared} seeds)")
        else:
            lines.append("  memorisation audit: skipped, no seed images to compare in this workdir "
                         "(no accepted, preprocessed seeds)")
        lines += [f"  shortcut: {s}" for s in self.shortcuts]
        lines.append(f"  reports: {self.report_dir}")
        return "\n".join(lines)


def _counts(df: pd.DataFrame, by: str | None = None) -> list[dict]:
    df = df[df["status"].isin(["accepted", "rejected"])] if not df.empty else df
    if df.empty:
        return []
    d = df.assign(code=[reason_code(r) or "accepted" for r in df["reason"]])
    rows = []
    for k, g in (d.groupby([by], sort=True, dropna=False) if by else [((None,), d)]):
        row = {} if not by else {by: k[0] if isinstance(k, tuple) else k}
        row.update(total=len(g), accepted=int((g["status"] == "accepted").sum()),
                   rejected=int((g["status"] == "rejected").sum()))
        for code, n in g.loc[g["status"] == "rejected", "code"].value_counts().sort_index().items():
            row[code] = int(n)
        rows.append(row)
    return rows


def quality_tables(df: pd.DataFrame) -> dict[str, list[dict]]:
    return {"overall": _counts(df), "by_label": _counts(df, "label"), "by_source": _counts(df, "source"),
            "by_sampler": _counts(df, "sampler")}


def flag_counts(df: pd.DataFrame, seed_checks: dict[str, dict[str, int]], n_seeds: int,
                q: QualityConfig) -> list[dict[str, Any]]:
    """Per flag: its threshold, whether it rejects, and how many synthetic images / real seeds carry it."""
    assessed = df[df["status"].isin(["accepted", "rejected"])] if not df.empty else df
    limits = thresholds(q)
    return [{"flag": f, "threshold": limits[f], "rejects": f in q.reject_flags,
             "synthetic_flagged": int(assessed["flags"].map(lambda v, fl=f: has_flag(v, fl)).sum()) if len(assessed) else 0,
             "seeds_flagged": seed_checks.get(f, {}).get("flagged", 0), "seeds": n_seeds} for f in FLAGS]


def typicality_lines(cut: dict | None, df: pd.DataFrame, q: QualityConfig) -> list[str]:
    """The ``atypical`` flag: its calibrated cut and how many held-out real images it would reject."""
    if not cut:
        return []
    lines = ["## Typicality (`atypical`)", ""]
    if cut.get("cut") is None:
        return lines + [f"Not measured: {cut.get('why_not')}.", ""]
    assessed = df[df["status"].isin(["accepted", "rejected"])] if not df.empty else df
    flagged = int(assessed["flags"].map(lambda v: has_flag(v, "atypical")).sum()) if len(assessed) else 0
    rejects = "rejects (`quality.reject_flags`)" if "atypical" in q.reject_flags else "is a flag only"
    return lines + [
        f"Distance to the {cut['k']} nearest training seeds in the learned seed embedding `{cut['embedding']}`; "
        f"an image beyond the {cut['quantile']:.0%} quantile of the {cut['held_out']} held-out real images "
        f"(distance {cut['cut']:.3g}) is `atypical` and {rejects}. It would reject {cut['held_out_rejected']} of "
        f"the {cut['held_out']} held-out real images (each judged by the cut of the others). Synthetic images "
        f"flagged: {flagged} of {len(assessed)}. Typicality is relative to the seeds: a skin tone or a lesion the seeds "
        "lack is atypical too, which is why the flag rejects only when `quality.reject_flags` names it.", ""]


def _md_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "_none_\n"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c, 0)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.3g}"
    return str(v)


def _rate_rows(rows: list[dict]) -> list[dict]:
    return [{"images": r["images"], "class": r["label"], "n": r["n"],
             **{f: (f"{r[f]:.0%} ({r[f + '_n']})" if r["n"] else "") for f in AUDITED_FLAGS}} for r in rows]


def write_quality_reports(workdir: Workdir, df: pd.DataFrame, q: QualityConfig,
                          gate: dict[str, Any] | None = None) -> dict[str, Path]:
    """quality.json and quality.md. ``gate``: ``cuts`` (calibration rows), ``seed_checks``
    (``calibrate.seed_rejections``), ``seeds`` (count), ``rates`` and ``shortcuts`` (sentences)."""
    gate = gate or {}
    tables = quality_tables(df)
    seed_checks, n_seeds = gate.get("seed_checks", {}), int(gate.get("seeds", 0))
    flags = flag_counts(df, seed_checks, n_seeds, q)
    payload = {"thresholds": q.model_dump(mode="json"), **tables, "cuts": gate.get("cuts", []),
               "seed_checks": seed_checks, "seeds": n_seeds, "flags": flags, "flag_rates": gate.get("rates", []),
               "shortcuts": gate.get("shortcuts", [])}
    if not df.empty:
        payload["rejected"] = [{"sample_key": k, "reason": r}
                               for k, r, s in zip(df["sample_key"], df["reason"], df["status"]) if s == "rejected"]
    jpath = atomic_write_text(workdir.reports / "quality.json", json.dumps(payload, indent=2, default=str))
    md = ["# Quality gate", "", "Automatic replacement for the paper's manual discarding of noisy images.", ""]
    md += ["## Overall", "", _md_table(tables["overall"]), "## By class", "", _md_table(tables["by_label"])]
    md += ["## By source", "", _md_table(tables["by_source"]), "## By sampler", "", _md_table(tables["by_sampler"])]
    md += ["## Checks on the real seeds", "",
           f"How many of the {n_seeds} accepted real seeds each check would reject on its own (a check that "
           "rejects many real seeds is mis-set)." if n_seeds else
           "No accepted, preprocessed seeds in this workdir: the cuts below are the config's or the fixed "
           "fallbacks, and no real-seed counts exist.", ""]
    cut_of = {c["check"]: c for c in gate.get("cuts", [])}
    cut_of.setdefault("saturated", {"cut": q.max_saturated_fraction, "origin": "set in the config"})
    rows = [{"check": check, "cut": cut_of[check]["cut"] if check in cut_of else "", "origin":
             cut_of[check]["origin"] if check in cut_of else "config", "seeds rejected": v.get("rejected", 0)}
            for check, v in seed_checks.items() if check not in FLAGS]
    md += [_md_table(rows, ["check", "cut", "origin", "seeds rejected"]) if rows else "_no seeds measured_\n"]
    md += ["## Flags", "", "Faces and text reject by default; rulers, ink, dermatoscope frames and hair also occur "
           "in real dermoscopy and only reject when `quality.reject_flags` names them.", "",
           _md_table(flags, ["flag", "threshold", "rejects", "synthetic_flagged", "seeds_flagged"])]
    md += typicality_lines(gate.get("typicality"), df, q)
    md += ["## Shortcut audit", "", "Share of accepted images carrying each flag, per class (and of the real "
           "seeds). A flag much more frequent in one class is a shortcut a classifier can learn.", "",
           _md_table(_rate_rows(gate.get("rates", [])))]
    md += [f"- **{s}**" for s in gate.get("shortcuts", [])] or ["No flag differs strongly between the classes."]
    if gate.get("shortcuts") and not q.balance_flags:
        md += ["", "Set `quality.balance_flags: true` to reject flagged images until the rates match."]
    md += ["", "## Thresholds", ""] + [f"- `{k}`: {v}" for k, v in q.model_dump(mode="json").items()]
    mpath = atomic_write_text(workdir.reports / "quality.md", "\n".join(md) + "\n")
    return {"quality_json": jpath, "quality_md": mpath}
