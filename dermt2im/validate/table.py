"""Table IV and Fig. 10, rebuilt from MLflow alone, plus the per-run figures.

``build_report`` reads one comparison (a parent run tagged ``dermt2im.kind=comparison``) and its
finished child runs from the tracking store, and nothing else: no manifest, no cached result. Each
cell of Table IV is (model, regime, test set): the mean over seeds of each test metric with a 95 %
Student t-interval, and the exact McNemar p-values (baseline vs that regime, one per seed) logged
on the parent run. The verdict sentences are computed from the same numbers: a regime "beats" the
baseline only when the 95 % interval of the paired (same seed) difference in balanced accuracy lies
above zero; otherwise the report says plainly that it does not, or that the gain is not established.

Figures are in ``figures``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pandas as pd

from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import atomic_path, atomic_write_text
from dermt2im.core.runtime import TrackingConfig
from dermt2im.core.tracking import RunRecord, Tracker, metric_key, open_tracker
from dermt2im.core.workdir import Workdir
from dermt2im.validate.figures import MODEL_ORDER, _regime_order, fig10
from dermt2im.validate.metrics import METRICS, mean_ci

PRIMARY = "balanced_accuracy"
LABELS_SHOWN = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced acc.",
    "roc_auc": "ROC AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f1": "F1",
}


class ReportError(DermT2imError, ValueError):
    """No comparison to report on, or the one named is not a comparison (the CLI shows it as a
    message, not a traceback)."""


# --- reading MLflow ---------------------------------------------------------------------------


def newest_comparison(tracker: Tracker) -> str:
    for status in ("FINISHED", None):
        flt = "tags.`dermt2im.kind` = 'comparison'"
        if status:
            flt += f" and attributes.status = '{status}'"
        runs = tracker.runs(flt, order_by=["attributes.end_time DESC", "attributes.start_time DESC"], limit=1)
        if runs:
            return runs[0].run_id
    raise ReportError("no comparison run in this MLflow experiment yet: run `dermt2im validate` first")


def child_frame(tracker: Tracker, parent_run_id: str) -> pd.DataFrame:
    """One row per (child run, test set): tags plus every test metric; newest run per cell wins."""
    runs = tracker.runs(f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'")
    latest: dict[tuple, RunRecord] = {}
    for r in runs:
        t = r.tags
        if t.get("dermt2im.kind") != "cell":
            continue
        cell = (t.get("model"), t.get("regime"), int(t.get("seed", -1)))
        if cell not in latest or (r.end_time or 0) >= (latest[cell].end_time or 0):
            latest[cell] = r
    rows = []
    for (model, regime, seed), r in latest.items():
        t = r.tags
        per_set: dict[str, dict[str, float]] = defaultdict(dict)
        for k, v in r.metrics.items():
            parts = k.split(".")
            if len(parts) == 3 and parts[0] == "test":
                per_set[parts[1]][parts[2]] = v
        for test_set, vals in per_set.items():
            rows.append({"model": model, "regime": regime, "seed": seed, "setting": t.get("setting"),
                         "synthetic_ratio": float(t.get("synthetic_ratio", "nan")),
                         "n_real": int(t.get("n_real", 0)), "n_synthetic": int(t.get("n_synthetic", 0)),
                         "test_set": test_set, "run_id": r.run_id, **vals})
    return pd.DataFrame(rows)


def _mcnemar(parent_metrics: dict[str, float], model: str, regime: str, test_set: str, seeds: list[int]) -> list[float]:
    out = []
    for s in seeds:
        v = parent_metrics.get(metric_key("mcnemar", model, regime, test_set, f"seed{s}", "p_value"))
        out.append(float("nan") if v is None else float(v))
    return out


def table_iv(children: pd.DataFrame, parent_metrics: dict[str, float]) -> pd.DataFrame:
    """Mean and 95 % t-interval over seeds of every metric, per (model, regime, test set)."""
    rows = []
    if children.empty:
        return pd.DataFrame()
    for (model, regime, test_set), g in children.groupby(["model", "regime", "test_set"], sort=False):
        g = g.sort_values("seed")
        seeds = [int(s) for s in g["seed"]]
        row = {"model": model, "regime": regime, "setting": g["setting"].iloc[0],
               "synthetic_ratio": float(g["synthetic_ratio"].iloc[0]), "test_set": test_set,
               "n_seeds": len(g), "seeds": ";".join(map(str, seeds)),
               "n_real": float(g["n_real"].mean()), "n_synthetic": float(g["n_synthetic"].mean())}
        for m in METRICS:
            ci = mean_ci(g[m].tolist() if m in g else [])
            row.update({f"{m}_mean": ci.mean, f"{m}_ci_low": ci.low, f"{m}_ci_high": ci.high,
                        f"{m}_half_width": ci.half_width})
        for c in ("tn", "fp", "fn", "tp"):
            row[f"{c}_mean"] = float(g[c].mean()) if c in g else float("nan")
        if regime != "baseline":
            ps = _mcnemar(parent_metrics, model, regime, test_set, seeds)
            row["mcnemar_p_values"] = ";".join("nan" if math.isnan(p) else f"{p:.6g}" for p in ps)
            row["mcnemar_significant_seeds"] = int(sum(p < 0.05 for p in ps if not math.isnan(p)))
        else:
            row["mcnemar_p_values"] = ""
            row["mcnemar_significant_seeds"] = 0
        row["run_ids"] = ";".join(g["run_id"])
        rows.append(row)
    df = pd.DataFrame(rows)
    key = df.apply(lambda r: (MODEL_ORDER.get(r["model"], 9), r["model"], _regime_order(r["regime"]), r["test_set"]), axis=1)
    return df.iloc[sorted(range(len(df)), key=lambda i: key.iloc[i])].reset_index(drop=True)


def verdicts(children: pd.DataFrame, table: pd.DataFrame, metric: str = PRIMARY) -> list[str]:
    """Plain sentences, one per (regime != baseline, model, test set), from the paired per-seed numbers."""
    out = []
    if children.empty:
        return out
    others = sorted({r for r in children["regime"] if r != "baseline"}, key=_regime_order)
    for regime in others:
        for (model, test_set), g in children.groupby(["model", "test_set"], sort=True):
            base = g[g["regime"] == "baseline"].set_index("seed")[metric]
            other = g[g["regime"] == regime].set_index("seed")[metric]
            if other.empty:
                continue
            if base.empty:
                out.append(f"{model} on {test_set}: {regime} has no baseline to compare with.")
                continue
            seeds = sorted(set(base.index) & set(other.index))
            diff = [float(other[s] - base[s]) for s in seeds]
            ci = mean_ci(diff)
            b_mean, o_mean = float(base.loc[seeds].mean()), float(other.loc[seeds].mean())
            nice = metric.replace("_", " ")
            head = f"{model} on {test_set}: {regime} {nice} {o_mean:.3f} vs baseline {b_mean:.3f} ({ci.mean:+.3f}"
            row = table[(table["model"] == model) & (table["regime"] == regime) & (table["test_set"] == test_set)]
            sig = int(row["mcnemar_significant_seeds"].iloc[0]) if len(row) else 0
            mc = f"McNemar p < 0.05 in {sig} of {len(seeds)} seed(s)"
            if not ci.mean > 0:
                out.append(f"{head}): {regime} does NOT beat the baseline; {mc}.")
            elif ci.n >= 2 and ci.low > 0:
                out.append(f"{head}, 95% CI of the paired difference [{ci.low:+.3f}, {ci.high:+.3f}]): "
                           f"{regime} beats the baseline; {mc}.")
            else:
                why = ("only one seed, so no interval" if ci.n < 2 else
                       f"95% CI of the paired difference [{ci.low:+.3f}, {ci.high:+.3f}] includes 0")
                out.append(f"{head}, {why}): {regime} is higher but the gain is NOT established; {mc}.")
    return out


def headline(children: pd.DataFrame, lines: list[str], regime: str = "hybrid", skipped: dict | None = None) -> str:
    if skipped and regime in skipped:
        return f"The {regime} regime was not run: {skipped[regime]}."
    mine = [s for s in lines if f": {regime} " in s]
    if not mine:
        return f"No {regime} runs in this comparison."
    wins = sum("beats the baseline" in s for s in mine)
    if wins == 0:
        return (f"{regime.capitalize()} does not beat the real-only baseline in any of the {len(mine)} "
                f"(model, test set) comparisons ({PRIMARY.replace('_', ' ')}, paired over seeds).")
    return (f"{regime.capitalize()} beats the real-only baseline in {wins} of {len(mine)} (model, test set) "
            f"comparisons ({PRIMARY.replace('_', ' ')}, 95% CI of the paired difference above 0).")


# --- writing ----------------------------------------------------------------------------------


def _fmt(row: pd.Series, m: str) -> str:
    mean, half = row[f"{m}_mean"], row[f"{m}_half_width"]
    if pd.isna(mean):
        return "n/a"
    if pd.isna(half):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {half:.3f}"


def markdown(table: pd.DataFrame, lines: list[str], head: str, *, parent_run_id: str, experiment: str,
             skipped: dict[str, str]) -> str:
    seeds = sorted({s for v in table["seeds"] for s in str(v).split(";")}, key=int) if len(table) else []
    out = [
        "# Table IV: benign / malignant classification, real-only vs hybrid training",
        "",
        f"Comparison run `{parent_run_id}` in MLflow experiment `{experiment}`; seeds {', '.join(seeds) or 'none'}. "
        "Cells: mean ± half-width of the 95% Student t-interval over seeds (no ± with a single seed). "
        "Threshold 0.5 on P(malignant), fixed; sensitivity and specificity are for malignant. "
        "McNemar: exact two-sided test, baseline vs the regime on the same test images, one p-value per seed.",
        "",
        "| Model | Regime | Setting | Synthetic share | Test set | Seeds | "
        + " | ".join(LABELS_SHOWN[m] for m in METRICS) + " | McNemar p vs baseline |",
        "|" + "---|" * (6 + len(METRICS) + 1),
    ]
    for _, r in table.iterrows():
        cells = [r["model"], r["regime"], str(r["setting"]), f"{r['synthetic_ratio']:.0%}", r["test_set"],
                 str(r["n_seeds"])] + [_fmt(r, m) for m in METRICS]
        cells.append(r["mcnemar_p_values"].replace(";", ", ") if r["mcnemar_p_values"] else "–")
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


def build_report(workdir: Workdir, tracking: TrackingConfig, *, parent_run_id: str | None = None) -> dict[str, Path]:
    """Rebuild Table IV (Markdown + CSV), the verdict and Fig. 10 from MLflow alone; the newest
    comparison when ``parent_run_id`` is None. The files are also logged on the parent run."""
    tracker = open_tracker(workdir, tracking)
    pid = parent_run_id or newest_comparison(tracker)
    try:
        parent = tracker.run(pid)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types
        raise ReportError(f"no MLflow run {pid!r}: {err}") from err
    if parent.tags.get("dermt2im.kind") != "comparison":
        raise ReportError(f"run {pid} is not a comparison (tag dermt2im.kind=comparison)")
    children = child_frame(tracker, pid)
    if children.empty:
        raise ReportError(f"comparison {pid} has no finished child runs")
    skipped = json.loads(parent.tags.get("dermt2im.skipped", "{}") or "{}")
    table = table_iv(children, parent.metrics)
    lines = verdicts(children, table)
    head = headline(children, lines, "hybrid", skipped)
    experiment = tracker.experiment_name(parent.experiment_id)
    md = markdown(table, lines, head, parent_run_id=pid, experiment=experiment, skipped=skipped)
    reports = workdir.reports
    csv, figure = reports / "table_iv.csv", reports / "fig10.png"
    unchanged = csv.is_file() and figure.is_file() and csv.read_text() == table.to_csv(index=False)
    paths = {
        "table_md": atomic_write_text(reports / "table_iv.md", md),
        "table_csv": csv,
        "fig10": figure if unchanged else fig10(table, figure),  # a cached re-run does not redraw it
        "verdict": atomic_write_text(reports / "verdict.txt", "\n".join([head, *lines]) + "\n"),
    }
    if not unchanged:
        with atomic_path(csv) as tmp:
            table.to_csv(tmp, index=False)
    for p in paths.values():
        tracker.log_file(pid, p, "report")
    return paths
