"""The fidelity report in words: ``reports/fidelity.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from dermt2im.fidelity.bootstrap import CONFIDENCE
from dermt2im.fidelity.figures import KIND_ORDER, set_label
from dermt2im.fidelity.report import HIGHER_IS_BETTER, SkinToneResponse, position
from dermt2im.fidelity.skin_tone import BIN_NAMES

STRATUM_TITLES = {"label": "Per class", "sampler": "Per sampler", "transformation": "Per transformation (prompt template)",
                  "skin_tone": "Per skin-tone category (ITA of each image)"}
MAX_WARNINGS = 40


@dataclass
class Context:
    """What the report says besides the table."""

    reference: dict[str, int]  # class -> training seeds
    floor: int
    test_sets: dict[str, int]
    runs: dict[str, str]  # run id -> what it is
    embeddings: list[str]  # labels, the learned one first
    noise: str
    typicality: dict
    copy_cut: float
    responses: list[SkinToneResponse] = field(default_factory=list)
    gate: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> accepted / rejected / memorised
    gate_by_tone: list[dict] = field(default_factory=list)  # source, skin tone, assessed, rejected
    figures: dict[str, str] = field(default_factory=dict)  # caption -> file name, relative to reports/
    radiomics: str = ""


def headline(embedding_names: Sequence[str], radiomics: bool) -> list[str]:
    first = embedding_names[0]
    out = (["frd"] if radiomics else []) + [f"kid.{first}", f"fid.{first}", f"precision.{first}", f"recall.{first}",
                                            f"density.{first}", f"coverage.{first}"]
    for e in embedding_names[1:]:
        out += [f"kid.{e}", f"precision.{e}", f"recall.{e}"]
    return out + ["typicality.median", "ita.median", "copy.share"]


def cell(row: pd.Series, metric: str) -> str:
    value = row.get(metric, math.nan)
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return "–"
    digits = 3 if abs(value) < 100 else 1
    text = f"{value:.{digits}f}"
    lo, hi = row.get(f"{metric}.low", math.nan), row.get(f"{metric}.high", math.nan)
    if isinstance(lo, float) and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    n = int(row.get(f"{metric}.n", 0) or 0)
    if n and n != int(row["n"]):
        text += f" (n={n})"
    return text


def _ordered(rows: pd.DataFrame) -> pd.DataFrame:
    order = rows.assign(_k=rows["kind"].map(KIND_ORDER).fillna(9))
    return order.sort_values(["_k", "set", "run"], kind="stable").drop(columns="_k")


def md_table(rows: pd.DataFrame, metrics: Sequence[str], by_value: bool = False) -> str:
    head = (["value"] if by_value else []) + ["set", "n (reference)", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = [(v, g) for v, g in rows.groupby("value", sort=False)] if by_value else [(None, rows)]
    for value, g in groups:
        for _, r in _ordered(g).iterrows():
            cells = ([str(value)] if by_value else []) + [set_label(r["kind"], r["set"], r["run"]),
                                                          f"{int(r['n'])} ({int(r['n_reference'])})"]
            cells += [cell(r, m) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def positions(tab: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Where each run lies between the floor (0) and the ceiling (1), over all its images."""
    out = []
    for _, r in tab[(tab["kind"] == "synthetic") & (tab["stratum"] == "all")].iterrows():
        parts = []
        for m in metrics:
            p = position(tab, r, m)
            if math.isfinite(p):
                parts.append(f"{m} {p:.2f}")
        if parts:
            out.append(f"- **{set_label(r['kind'], r['set'], r['run'])}**: " + ", ".join(parts))
    return out


def render(tab: pd.DataFrame, ctx: Context) -> str:
    has_frd = "frd" in tab
    names = [e.split(" ")[0] for e in ctx.embeddings]
    metrics = headline(names, has_frd)
    pct = f"{CONFIDENCE:.0%}"
    out = ["# Fidelity of the synthetic sets", "",
           "Do the synthetic images look like the real ones (fidelity), cover them (diversity), copy them (privacy), "
           "and whom do they show (skin tone)? Every set is compared with the **training seeds** (what the LoRA saw): "
           + ", ".join(f"{k} {v}" for k, v in sorted(ctx.reference.items())) + ".", "",
           f"- **Floor**: {ctx.floor} held-out real images (the seeds' validation and test splits) against the same "
           "seeds: what real images score.",
           f"- **Ceiling**: {ctx.noise}: what noise scores.",
           *(f"- **Test set `{k}`**: {v} unseen real images (another acquisition)." for k, v in sorted(ctx.test_sets.items())),
           *(f"- **Run `{k}`**: {v}." for k, v in ctx.runs.items()),
           "",
           "Embeddings: " + "; ".join(f"`{e}`" for e in ctx.embeddings) + " (the first is learned from this workdir's "
           "training seeds; see `dermt2im.fidelity.embeddings`)." + (f" Radiomics: {ctx.radiomics}." if ctx.radiomics
                                                                       else ""),
           "",
           "Lower FRD, FID and KID, and higher precision, recall, density and coverage, are closer to the real images. "
           f"Each figure: the value on the images, its {pct} bootstrap interval over images in brackets, and the number "
           "of images (reference images in brackets); `(n=...)` where a metric used fewer (radiomics are computed for "
           "a subset). KID is unbiased at small sample sizes; FID and FRD are biased upwards there (read them against "
           "the floor computed at a similar size). Typicality: the share of held-out real images at least as far from "
           "the seeds (0.5 is typical, 0 farther than every real image). Copy share: images closer to a training seed "
           "than 95 % of held-out real images are.", ""]
    out += ["## All images", "", md_table(tab[tab["stratum"] == "all"], metrics)]
    where = positions(tab, [m for m in metrics if m not in ("ita.median", "typicality.median", "copy.share")])
    if where:
        out += ["Position of each run between the floor (0: as real images score) and the ceiling (1: as noise "
                "scores), per metric:", "", *where, ""]
    for stratum, title in STRATUM_TITLES.items():
        rows = tab[tab["stratum"] == stratum]
        if len(rows):
            out += [f"## {title}", "", md_table(rows, metrics, by_value=True)]
    out += skin_tone_section(tab, ctx)
    out += ["## Memorisation", "",
            f"Nearest-training-seed distances (the memorisation audit's global descriptor). 5 % of held-out real images "
            f"are closer than {ctx.copy_cut:.3f} to a training seed; the copy share is the share of a set that close "
            "(about 0.05 for real images; much more is copying).", ""]
    out += [md_table(tab[tab["stratum"] == "all"], ["nearest_seed.median", "copy.share"])]
    if ctx.gate:
        out += ["The gate's own audit (geometric verification against every seed) and decisions, per run:", ""]
        out += [f"- `{k}`: " + ", ".join(f"{n} {c}" for c, n in v.items()) for k, v in ctx.gate.items()] + [""]
    out += typicality_section(tab, ctx)
    out += ["## Figures", ""] + [f"![{c}]({f})" for c, f in ctx.figures.items()] + [""]
    warned = tab[tab["warnings"].astype(str) != ""]
    if len(warned):
        out += ["## Warnings (too few images)", ""]
        for _, r in warned.head(MAX_WARNINGS).iterrows():
            out.append(f"- {set_label(r['kind'], r['set'], r['run'])}, {r['stratum']} = {r['value']} "
                       f"(n={int(r['n'])}): {r['warnings']}")
        if len(warned) > MAX_WARNINGS:
            out.append(f"- ... {len(warned) - MAX_WARNINGS} more rows with warnings in fidelity.csv")
        out.append("")
    return "\n".join(out)


def skin_tone_section(tab: pd.DataFrame, ctx: Context) -> list[str]:
    shares = [f"ita.share.{b.replace(' ', '_')}" for b in BIN_NAMES]
    out = ["## Skin tone", "",
           "Individual typology angle (ITA) of the skin around the lesion (the lesion masked out), and the share of "
           "each category (Chardon 1991 / Del Bino 2006: very light > 55, light > 41, intermediate > 28, tan > 10, "
           "brown > -30, dark) among the images where it is defined.", ""]
    rows = tab[tab["stratum"] == "all"]
    head = ["set", "n", "median ITA", *BIN_NAMES]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in _ordered(rows).iterrows():
        cells = [set_label(r["kind"], r["set"], r["run"]), str(int(r["ita.median.n"])), cell(r, "ita.median")]
        cells += [f"{r[s]:.0%}" if isinstance(r[s], float) and math.isfinite(r[s]) else "–" for s in shares]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if ctx.gate_by_tone:
        out += ["The quality gate's decisions per skin tone of the assessed images (a gate calibrated on the seeds "
                "may reject skin tones the seeds lack more often):", ""]
        cols = ["source", "skin tone", "assessed", "rejected", "share rejected"]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in ctx.gate_by_tone] + [""]
    if ctx.responses:
        out += ["Do prompts that ask for a skin type move the ITA of what is generated?", ""]
        out += [f"- {r.sentence()}" for r in ctx.responses] + [""]
    else:
        out += ["No run asked for skin types in its prompts (or fewer than two types had a measurable ITA).", ""]
    return out


def typicality_section(tab: pd.DataFrame, ctx: Context) -> list[str]:
    t = ctx.typicality or {}
    out = ["## Typicality", ""]
    if t.get("cut") is None:
        return out + [f"Not measured: {t.get('why_not', 'no calibration')}.", ""]
    out += [f"Distance to the {t['k']} nearest training seeds in `{t['embedding']}`; an image beyond the "
            f"{t['quantile']:.0%} quantile of the {t['held_out']} held-out real images (distance {t['cut']:.3g}) is "
            f"`atypical` (the gate's flag). That cut would reject {t['held_out_rejected']} of the {t['held_out']} "
            "held-out real images (each judged by the cut computed from the others).", ""]
    out += [md_table(tab[tab["stratum"] == "all"], ["typicality.median", "atypical.share"])]
    return out


def higher_is_better(metric: str) -> bool:
    return metric.split(".")[0] in HIGHER_IS_BETTER
