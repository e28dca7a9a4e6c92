"""Figures: a cell's confusion matrix and ROC curve, and Fig. 10 (grouped bars over regimes).

matplotlib's object API (no pyplot), so they are safe in worker threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core.fileio import atomic_path

MODEL_ORDER = {"vit": 0, "mobilenet_v2": 1}


def _regime_order(regime: str) -> tuple:
    fixed = {"baseline": 0, "hybrid": 1, "hybrid-additive": 2, "synthetic_only": 3}
    return (fixed.get(regime, 9), regime)


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


def fig10(table: pd.DataFrame, out: Path) -> Path:
    """Grouped bars (Fig. 10): per model, test sets on x, one bar per regime, whiskers from the 95%
    bootstrap interval over test images."""
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
                # Asymmetric whiskers: the bootstrap interval, which stays inside [0, 1].
                err = np.nan_to_num(np.vstack([mean - sub[f"{m}_ci_low"].to_numpy(dtype=float),
                                               sub[f"{m}_ci_high"].to_numpy(dtype=float) - mean]))
                bars = ax.bar(x + (k - (len(regimes) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=regime)
                for b, v in zip(bars, mean):  # inside the bar's foot, clear of the whiskers
                    if not math.isnan(v) and v > 0.06:
                        ax.text(b.get_x() + b.get_width() / 2, 0.015, f"{v:.2f}", ha="center", va="bottom",
                                fontsize=7, color="white")
            ax.set_xticks(x, sets)
            ax.set_ylim(0, 1.1)
            ax.axhline(0.5, ls=":", c="grey", lw=1)
            ax.set_ylabel(m.replace("_", " "))
            ax.set_title(f"{model}", fontsize=10)
    if models:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)), fontsize=8)
    fig.suptitle("Fig. 10: mean over seeds; whiskers: 95% bootstrap interval over the test images", fontsize=9)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
