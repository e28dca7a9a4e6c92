"""Table IV in words: the verdict sentences, the headline, and the table as Markdown (in full for
``reports/table_iv.md``, compact for a narrow pane such as the Prefect UI's factory summary)."""

from __future__ import annotations

import math
import re

import pandas as pd

from dermt2im.validate.bootstrap import CONFIDENCE, N_RESAMPLES, Interval
from dermt2im.validate.metrics import METRICS

PRIMARY = "balanced_accuracy"
LABELS_SHOWN = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced acc.",
    "roc_auc": "ROC AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f1": "F1",
}
PCT = f"{CONFIDENCE:.0%}"


def _interval(row: pd.Series, stem: str, signed: bool = False) -> str:
    return Interval(row[f"{stem}_mean" if f"{stem}_mean" in row else stem], row[f"{stem}_ci_low"],
                    row[f"{stem}_ci_high"]).format(signed=signed)


def _range(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def training_images(row: pd.Series) -> str:
    return f"{_range(row['n_real_min'], row['n_real_max'])} + {_range(row['n_synthetic_min'], row['n_synthetic_max'])}"


def share(row: pd.Series) -> str:
    """The synthetic share the cells reached; flagged when short of the configured one."""
    got, want = row["synthetic_share"], row["configured_share"]
    if row["share_reached"] or pd.isna(want):
        return f"{got:.0%}"
    return f"**{got:.0%}**, configured {want:.0%} (not reached)"


def _short_note(row: pd.Series) -> str:
    if row["share_reached"]:
        return ""
    return (f" Its training sets held {training_images(row)} real + synthetic images, a synthetic share of "
            f"{row['synthetic_share']:.0%}, short of the configured {row['configured_share']:.0%}: too few "
            "usable synthetic images.")


def _verdict(row: pd.Series, base: pd.Series) -> str:
    regime = row["regime"]
    diff = Interval(row[f"{PRIMARY}_diff"], row[f"{PRIMARY}_diff_ci_low"], row[f"{PRIMARY}_diff_ci_high"])
    k, n = int(row["mcnemar_significant_seeds"]), int(row["mcnemar_seeds"])
    head = (f"{row['model']} on {row['test_set']}: {regime} balanced accuracy {row[f'{PRIMARY}_mean']:.3f} vs "
            f"baseline {base[f'{PRIMARY}_mean']:.3f}, difference {diff.format(signed=True)}"
            f"{' (' + PCT + ' CI)' if not math.isnan(diff.low) else ''}; McNemar p < 0.05 in {k} of {n} seed(s)")
    if not diff.value > 0:
        what = f"{regime} does NOT beat the baseline"
        if diff.high < 0:
            what = f"{regime} is WORSE than the baseline (the {PCT} CI of the difference lies below 0)"
    elif diff.low > 0 and n > 0 and k == n:
        what = f"{regime} beats the baseline"
    else:
        why = []
        if math.isnan(diff.low):
            why.append("no interval")
        elif diff.low <= 0:
            why.append(f"the {PCT} CI of the difference includes 0")
        if k < n or n == 0:
            why.append(f"McNemar p >= 0.05 in {n - k} of {n} seed(s)")
        what = f"{regime} is higher but the gain is NOT established ({'; '.join(why)})"
    return f"{head}: {what}.{_short_note(row)}"


def verdicts(table: pd.DataFrame) -> list[str]:
    """Plain sentences, one per (regime != baseline, model, test set)."""
    out = []
    if table.empty:
        return out
    base = {(r["model"], r["test_set"]): r for _, r in table[table["regime"] == "baseline"].iterrows()}
    for _, row in table[table["regime"] != "baseline"].iterrows():
        b = base.get((row["model"], row["test_set"]))
        if b is None:
            out.append(f"{row['model']} on {row['test_set']}: {row['regime']} has no baseline to compare with."
                       + _short_note(row))
        else:
            out.append(_verdict(row, b))
    return out


def headline(table: pd.DataFrame, lines: list[str], regime: str = "hybrid", skipped: dict | None = None) -> str:
    if skipped and regime in skipped:
        return f"The {regime} regime was not run: {skipped[regime]}."
    named = rf"{re.escape(regime)}(@\S+)?"  # hybrid, and hybrid restricted to one source (hybrid@ext)
    mine = [s for s in lines if re.search(rf": {named} ", s)]
    if not mine:
        return f"No {regime} runs in this comparison."
    wins = sum(bool(re.search(rf"{named} beats the baseline", s)) for s in mine)
    how = f"({PRIMARY.replace('_', ' ')}: paired bootstrap over test images and McNemar per seed)"
    text = (f"{regime.capitalize()} does not beat the real-only baseline in any of the {len(mine)} (model, test set) "
            f"comparisons {how}." if wins == 0 else
            f"{regime.capitalize()} beats the real-only baseline in {wins} of {len(mine)} (model, test set) "
            f"comparisons {how}.")
    rows = table[table["regime"].str.fullmatch(named)]
    short = rows[~rows["share_reached"].astype(bool)]
    if len(short):
        text += (f" Its training sets held fewer synthetic images than configured: a synthetic share of "
                 f"{short['synthetic_share'].min():.0%} instead of {short['configured_share'].iloc[0]:.0%}.")
    return text


def _stacked(value: float, low: float, high: float, signed: bool = False) -> str:
    """A value above its interval (two decimals), for narrow table cells."""
    iv = Interval(value, low, high)
    if math.isnan(iv.value):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.2f}}"
    head = f"{iv.value:{'+' if signed else ''}.3f}"
    return head if math.isnan(iv.low) else f"{head}<br>[{f.format(iv.low)}, {f.format(iv.high)}]"


def compact_markdown(table: pd.DataFrame) -> str:
    """Table IV for a narrow pane (the Prefect UI's artifacts): one row per regime other than the
    baseline, beside its baseline; balanced accuracy with its interval under it, the difference, and
    what the regime trained on."""
    base = {(r["model"], r["test_set"]): r for _, r in table[table["regime"] == "baseline"].iterrows()}
    others = table[table["regime"] != "baseline"]
    rows = others if len(others) else table
    out = [f"| Model | Test set | Regime (real + synthetic) | Balanced acc. [{PCT} CI] | Baseline | Difference |",
           "|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        b = base.get((r["model"], r["test_set"]))
        what = f"{r['regime']}<br>{training_images(r)} images<br>{r['synthetic_share']:.0%} synthetic"
        if not r["share_reached"]:
            what = (f"{r['regime']}<br>{training_images(r)} images<br>**{r['synthetic_share']:.0%} synthetic**, "
                    f"not the configured {r['configured_share']:.0%}")
        mine = _stacked(r[f"{PRIMARY}_mean"], r[f"{PRIMARY}_ci_low"], r[f"{PRIMARY}_ci_high"])
        if r["regime"] == "baseline" or b is None:
            baseline, diff = "–", "–"
        else:
            baseline = _stacked(b[f"{PRIMARY}_mean"], b[f"{PRIMARY}_ci_low"], b[f"{PRIMARY}_ci_high"])
            diff = _stacked(r[f"{PRIMARY}_diff"], r[f"{PRIMARY}_diff_ci_low"], r[f"{PRIMARY}_diff_ci_high"], True)
        out.append(f"| {r['model']} | {r['test_set']} | {what} | {mine} | {baseline} | {diff} |")
    return "\n".join(out)


def markdown(table: pd.DataFrame, lines: list[str], head: str, *, parent_run_id: str, experiment: str,
             skipped: dict[str, str]) -> str:
    seeds = sorted({s for v in table["seeds"] for s in str(v).split(";")}, key=int) if len(table) else []
    out = [
        "# Table IV: benign / malignant classification, real-only vs hybrid training",
        "",
        f"Comparison run `{parent_run_id}` in MLflow experiment `{experiment}`; seeds {', '.join(seeds) or 'none'}. "
        f"Each cell: the mean over seeds, with its {PCT} percentile bootstrap interval over the test images "
        f"({N_RESAMPLES} resamples within each class, the same images for every seed; seeds pooled). "
        "Training images: real + synthetic images a cell actually trained on; synthetic share: the share they "
        "reached (flagged where short of the configured one). table_iv.csv also has each metric's range over "
        "the seeds (`_seed_min`, `_seed_max`). Threshold 0.5 on P(malignant), fixed; "
        "sensitivity and specificity are for malignant. Difference: the regime's balanced accuracy minus the "
        "baseline's, with a paired bootstrap interval (the same resampled images for both). McNemar: exact "
        "two-sided test, baseline vs the regime on the same test images, one p-value per seed.",
        "",
        "| Model | Regime | Synthetic source | Test set | Seeds | Training images (real + synthetic) | Synthetic share | "
        + " | ".join(LABELS_SHOWN[m] for m in METRICS) + " | Difference in balanced acc. | McNemar p vs baseline |",
        "|" + "---|" * (7 + len(METRICS) + 2),
    ]
    for _, r in table.iterrows():
        cells = [r["model"], r["regime"], str(r.get("synthetic_source", "")), r["test_set"], str(r["n_seeds"]),
                 training_images(r), share(r)]
        cells += [_interval(r, m) for m in METRICS]
        cells.append("–" if r["regime"] == "baseline" else _interval(r, f"{PRIMARY}_diff", signed=True))
        cells.append(str(r["mcnemar_p_values"]).replace(";", ", ") if r["mcnemar_p_values"] else "–")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## Verdict", "", f"**{head}**", ""] + [f"- {s}" for s in lines]
    if skipped:
        out += ["", "## Skipped regimes", ""] + [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    out += [
        "",
        "## Settings",
        "",
        "- constant: the training set has as many images as the real training split; a share r of them is "
        "synthetic (real images are replaced). This isolates the effect of the data source.",
        "- additive: all real training images plus synthetic ones on top, a share r of the total (the paper's "
        "setting; the training set grows, which confounds the comparison).",
        "",
    ]
    return "\n".join(out)
