"""Table IV and Fig. 10, rebuilt from MLflow alone, plus the per-run figures.

``build_report`` reads one comparison (a parent run tagged ``dermt2im.kind=comparison``) and its
finished child runs from the tracking store, and nothing else: no manifest, no cached result. Each
cell of Table IV is (model, regime, test set): the mean over seeds of each test metric with a 95 %
Student t-interval, and the exact McNemar p-values (baseline vs that regime, one per seed) logged
on the parent run. The verdict sentences are computed from the same numbers: a regime "beats" the
baseline only when the 95 % interval of the paired (same seed) difference in balanced accuracy lies
above zero; otherwise the report says plainly that it does not, or that the gain is not established.

Figures use matplotlib's object API (no pyplot), so they are safe in worker threads.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core.config import FactoryConfig
from dermt2im.core.fileio import atomic_path, atomic_write_text
from dermt2im.validate.metrics import METRICS, mean_ci
from dermt2im.core.tracking import metric_key, tracking_client
from dermt2im.core.workdir import Workdir

PRIMARY = "balanced_accuracy"
LABELS_SHOWN = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced acc.",
    "roc_auc": "ROC AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f1": "F1",
}
MODEL_ORDER = {"vit": 0, "mobilenet_v2": 1}


class ReportError(ValueError):
    """No comparison to report on, or the one named is not a comparison (the CLI shows it as a
    message, not a traceback)."""


# --- per-run figures --------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def confusion_figure(m: dict, title: str = ""):
    """2 x 2 confusion matrix (rows: true benign / malignant; columns: predicted)."""
    cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]], dtype=float)
    fig = _figure(3.6, 3.2)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(cm.max(), 1))
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks([0, 1], ["benign", "malignant"])
    ax.set_yticks([0, 1], ["benign", "malignant"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    return fig


def roc_figure(y, prob, title: str = ""):
    from dermt2im.validate.metrics import roc_auc, roc_curve

    fpr, tpr = roc_curve(y, prob)
    auc = roc_auc(y, prob)
    fig = _figure(3.6, 3.4)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}" if not math.isnan(auc) else "AUC n/a")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=8)
    return fig


# --- reading MLflow ---------------------------------------------------------------------------


def newest_comparison(client, exp_id: str) -> str:
    for status in ("FINISHED", None):
        flt = "tags.`dermt2im.kind` = 'comparison'"
        if status:
            flt += f" and attributes.status = '{status}'"
        runs = client.search_runs([exp_id], filter_string=flt,
                                  order_by=["attributes.end_time DESC", "attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0].info.run_id
    raise ReportError("no comparison run in this MLflow experiment yet: run `dermt2im validate` first")


def _all_runs(client, exp_id: str, filter_string: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        out.extend(page)
        token = page.token
        if not token:
            return out


def child_frame(client, exp_id: str, parent_run_id: str) -> pd.DataFrame:
    """One row per (child run, test set): tags plus every test metric; newest run per cell wins."""
    runs = _all_runs(client, exp_id, f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'")
    latest: dict[tuple, object] = {}
    for r in runs:
        t = r.data.tags
        if t.get("dermt2im.kind") != "cell":
            continue
        cell = (t.get("model"), t.get("regime"), int(t.get("seed", -1)))
        if cell not in latest or (r.info.end_time or 0) >= (latest[cell].info.end_time or 0):
            latest[cell] = r
    rows = []
    for (model, regime, seed), r in latest.items():
        t = r.data.tags
        per_set: dict[str, dict[str, float]] = defaultdict(dict)
        for k, v in r.data.metrics.items():
            parts = k.split(".")
            if len(parts) == 3 and parts[0] == "test":
                per_set[parts[1]][parts[2]] = v
        for test_set, vals in per_set.items():
            rows.append({"model": model, "regime": regime, "seed": seed, "setting": t.get("setting"),
                         "synthetic_ratio": float(t.get("synthetic_ratio", "nan")),
                         "n_real": int(t.get("n_real", 0)), "n_synthetic": int(t.get("n_synthetic", 0)),
                         "test_set": test_set, "run_id": r.info.run_id, **vals})
    return pd.DataFrame(rows)


def _regime_order(regime: str) -> tuple:
    fixed = {"baseline": 0, "hybrid": 1, "hybrid-additive": 2, "synthetic_only": 3}
    return (fixed.get(regime, 9), regime)


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


def fig10(table: pd.DataFrame, out: Path) -> Path:
    """Grouped bars (Fig. 10): per model, test sets on x, one bar per regime, 95% CI whiskers."""
    models = sorted(table["model"].unique(), key=lambda m: (MODEL_ORDER.get(m, 9), m)) if len(table) else []
    metrics = ["accuracy", "balanced_accuracy"]
    fig = _figure(5.5 * max(len(models), 1), 3.6 * len(metrics))
    axes = fig.subplots(len(metrics), max(len(models), 1), squeeze=False)
    for j, model in enumerate(models):
        t = table[table["model"] == model]
        sets = sorted(t["test_set"].unique())
        regimes = sorted(t["regime"].unique(), key=_regime_order)
        width = 0.8 / max(len(regimes), 2)
        x = np.arange(len(sets))
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            for k, regime in enumerate(regimes):
                sub = t[t["regime"] == regime].set_index("test_set").reindex(sets)
                mean = sub[f"{m}_mean"].to_numpy(dtype=float)
                err = np.nan_to_num(sub[f"{m}_half_width"].to_numpy(dtype=float))
                bars = ax.bar(x + (k - (len(regimes) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=regime)
                for b, v in zip(bars, mean):
                    if not math.isnan(v):
                        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(x, sets)
            ax.set_ylim(0, 1.1)
            ax.axhline(0.5, ls=":", c="grey", lw=1)
            ax.set_ylabel(m.replace("_", " "))
            ax.set_title(f"{model}", fontsize=10)
            if i == 0 and j == 0:
                ax.legend(fontsize=8, loc="lower left")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def build_report(workdir: Workdir, cfg: FactoryConfig, *, parent_run_id: str | None = None) -> dict[str, Path]:
    """Rebuild Table IV (Markdown + CSV), the verdict and Fig. 10 from MLflow alone; the newest
    comparison when ``parent_run_id`` is None. The files are also logged on the parent run."""
    client, exp_id = tracking_client(workdir, cfg.tracking)
    pid = parent_run_id or newest_comparison(client, exp_id)
    try:
        parent = client.get_run(pid)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types
        raise ReportError(f"no MLflow run {pid!r}: {err}") from err
    if parent.data.tags.get("dermt2im.kind") != "comparison":
        raise ReportError(f"run {pid} is not a comparison (tag dermt2im.kind=comparison)")
    children = child_frame(client, parent.info.experiment_id, pid)
    if children.empty:
        raise ReportError(f"comparison {pid} has no finished child runs")
    skipped = json.loads(parent.data.tags.get("dermt2im.skipped", "{}") or "{}")
    table = table_iv(children, parent.data.metrics)
    lines = verdicts(children, table)
    head = headline(children, lines, "hybrid", skipped)
    experiment = client.get_experiment(parent.info.experiment_id).name
    md = markdown(table, lines, head, parent_run_id=pid, experiment=experiment, skipped=skipped)
    reports = workdir.reports
    paths = {
        "table_md": atomic_write_text(reports / "table_iv.md", md),
        "table_csv": reports / "table_iv.csv",
        "fig10": fig10(table, reports / "fig10.png"),
        "verdict": atomic_write_text(reports / "verdict.txt", "\n".join([head, *lines]) + "\n"),
    }
    with atomic_path(paths["table_csv"]) as tmp:
        table.to_csv(tmp, index=False)
    for p in paths.values():
        client.log_artifact(pid, str(p), "report")
    return paths
