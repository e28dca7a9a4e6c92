"""Class agreement: do the synthetic images show their class? (the paper's check of 200 synthetic
samples with a detector-classifier trained on real ISIC images, 72 % correct).

Every baseline cell (a classifier trained on real images only) predicts every usable synthetic
image (``predict_synthetic``) and logs the predictions with its child run (``agreement/synthetic.csv``).
``agreement_table`` then gives, per model, the share of synthetic images predicted as the class
they were generated for, by class, by sampler and by transformation, with a 95 % Wilson interval;
``reference_rows`` gives the same classifiers' share on the real test images, which is what a
perfect generator could hope for. Seeds are pooled per image: an image's agreement is the share of
seeds whose classifier predicted its class, and the interval counts images, not predictions (the
seeds' classifiers see the same images).

A class share alone can mislead (a classifier that calls everything malignant agrees on every
malignant image): the ``both classes`` row is the mean of the two class shares, at chance 50 %.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import norm

from dermt2im.core.specs import LABELS
from dermt2im.core.tracking import metric_key

ARTIFACT = "agreement"
FILE = "synthetic.csv"
CONFIDENCE = 0.95
COLUMNS = ["key", "path", "label", "source", "sampler", "transformation", "prob", "pred"]
BOTH = "both classes"


def wilson(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: a mean over seeds)."""
    if n <= 0:
        return math.nan, math.nan
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def predict_synthetic(model, processor, synthetic: pd.DataFrame, *, batch_size: int, device, amp_dtype=None
                      ) -> pd.DataFrame:
    """One row per synthetic image: what it was generated as and what the classifier says (``COLUMNS``)."""
    from dermt2im.validate import classify, images
    from dermt2im.validate.metrics import THRESHOLD

    x = images.load_images(list(synthetic["path"]), processor)
    prob = classify.predict_proba(model, x, processor, batch_size=batch_size, device=device, amp_dtype=amp_dtype)
    out = pd.DataFrame({
        "key": synthetic["sample_key"].astype(str) if "sample_key" in synthetic else synthetic["path"].astype(str),
        "path": synthetic["path"].astype(str), "label": synthetic["label"].astype(str),
        "source": synthetic["synthetic_source"].astype(str) if "synthetic_source" in synthetic else "dermt2im",
        "sampler": synthetic["sampler"].fillna("").astype(str) if "sampler" in synthetic else "",
        "transformation": synthetic["transformation"].fillna("").astype(str) if "transformation" in synthetic else "",
        "prob": prob})
    out["pred"] = np.where(out["prob"] >= THRESHOLD, LABELS[1], LABELS[0])
    return out[COLUMNS]


def _per_image(preds: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, image): the share of seeds predicting its class."""
    p = preds.assign(agree=(preds["pred"] == preds["label"]).astype(float))
    keys = ["model", "key", "label", "source", "sampler", "transformation"]
    return p.groupby(keys, dropna=False, sort=True).agg(agree=("agree", "mean"), seeds=("seed", "nunique")).reset_index()


def _row(model: str, by: str, group: str, label: str, agree: pd.Series, seeds: int) -> dict:
    n = len(agree)
    k = float(agree.sum())
    low, high = wilson(k, n)
    return {"model": model, "by": by, "group": group, "label": label, "n_images": n, "n_seeds": seeds,
            "share": k / n if n else math.nan, "ci_low": low, "ci_high": high}


def _both(model: str, by: str, group: str, rows: list[dict]) -> dict | None:
    """Mean of the two class shares (chance 50 %); its interval from the classes' Wilson half-widths
    combined as independent (a normal approximation)."""
    got = [r for r in rows if r["label"] in LABELS and r["n_images"]]
    if len(got) != len(LABELS):
        return None
    share = float(np.mean([r["share"] for r in got]))
    half = math.sqrt(sum(((r["ci_high"] - r["ci_low"]) / 2) ** 2 for r in got)) / len(got)
    return {"model": model, "by": by, "group": group, "label": BOTH, "n_images": sum(r["n_images"] for r in got),
            "n_seeds": max(r["n_seeds"] for r in got), "share": share,
            "ci_low": max(0.0, share - half), "ci_high": min(1.0, share + half)}


def agreement_table(preds: pd.DataFrame) -> pd.DataFrame:
    """Per model: the share of synthetic images predicted as their intended class, overall (``by =
    all``) and by source, sampler and transformation, per class and for both classes."""
    if preds.empty:
        return pd.DataFrame(columns=["model", "by", "group", "label", "n_images", "n_seeds", "share", "ci_low",
                                     "ci_high"])
    images = _per_image(preds)
    rows: list[dict] = []
    for model, per_model in images.groupby("model", sort=True):
        seeds = int(per_model["seeds"].max())
        splits = [("all", None), ("source", "source"), ("sampler", "sampler"), ("transformation", "transformation")]
        for by, column in splits:
            groups = [("all", per_model)] if column is None else list(per_model.groupby(column, sort=True))
            if column is not None and len(groups) < 2 and by != "source":
                continue  # one sampler (or transformation) only: the same as "all"
            for group, g in groups:
                group = str(group) if str(group) else "(none)"
                class_rows = [_row(model, by, group, label, g.loc[g["label"] == label, "agree"], seeds)
                              for label in LABELS if (g["label"] == label).any()]
                rows += class_rows
                both = _both(model, by, group, class_rows)
                if both:
                    rows.append(both)
    return pd.DataFrame(rows)


def reference_rows(test_predictions: pd.DataFrame) -> pd.DataFrame:
    """The baseline classifiers on the real test images, in the same form (``by = real test``): the
    share of real images each predicts as their class (their recall per class)."""
    if test_predictions.empty:
        return pd.DataFrame()
    from dermt2im.validate.metrics import THRESHOLD

    t = test_predictions
    preds = pd.DataFrame({"model": t["model"], "seed": t["seed"], "key": t["test_set"] + "/" + t["key"].astype(str),
                          "label": [LABELS[int(v)] for v in t["label"]], "source": t["test_set"],
                          "sampler": "", "transformation": "",
                          "pred": np.where(t["prob"] >= THRESHOLD, LABELS[1], LABELS[0])})
    images = _per_image(preds)
    rows = []
    for (model, test_set), g in images.groupby(["model", "source"], sort=True):
        class_rows = [_row(model, "real test", test_set, label, g.loc[g["label"] == label, "agree"],
                           int(g["seeds"].max())) for label in LABELS if (g["label"] == label).any()]
        rows += class_rows
        both = _both(model, "real test", test_set, class_rows)
        if both:
            rows.append(both)
    return pd.DataFrame(rows)


def _pct(r: pd.Series) -> str:
    return f"{r['share']:.0%} [{r['ci_low']:.0%}, {r['ci_high']:.0%}]"


def headline(table: pd.DataFrame) -> list[str]:
    """One sentence per model: agreement of all synthetic images, both classes, per class."""
    out = []
    if table.empty:
        return out
    for model, g in table[table["by"] == "all"].groupby("model", sort=True):
        both = g[g["label"] == BOTH]
        per = "; ".join(f"{r['label']} {_pct(r)} of {r['n_images']}" for _, r in g[g["label"].isin(LABELS)].iterrows())
        lead = f"{_pct(both.iloc[0])} for both classes (chance 50%); " if len(both) else ""
        out.append(f"Class agreement ({model} baseline classifiers on the synthetic images): {lead}{per}.")
    return out


def markdown(table: pd.DataFrame, reference: pd.DataFrame) -> str:
    pct = f"{CONFIDENCE:.0%}"
    lines = ["## Class agreement: do the synthetic images show their class?", "",
             "Each baseline classifier (trained on real images only) predicts every usable synthetic image; the "
             f"share predicted as the class it was generated for, with a {pct} Wilson interval over images (seeds "
             "pooled per image). *Both classes* is the mean of the two class shares: chance is 50%. The real test "
             "rows are the same classifiers on real images, for reference.", ""]
    if table.empty:
        return "\n".join(lines + ["No baseline cell predicted synthetic images (none usable, or no baseline).", ""])
    for line in headline(table):
        lines.append(f"**{line}**")
    lines.append("")
    shown = pd.concat([table, reference], ignore_index=True) if len(reference) else table
    lines += ["| Model | By | Group | Class | Images | Seeds | Agreement | " + pct + " CI |",
              "|---|---|---|---|---|---|---|---|"]
    for _, r in shown.iterrows():
        lines.append(f"| {r['model']} | {r['by']} | {r['group']} | {r['label']} | {r['n_images']} | {r['n_seeds']} | "
                     f"{r['share']:.1%} | [{r['ci_low']:.1%}, {r['ci_high']:.1%}] |")
    lines.append("")
    return "\n".join(lines)


def metrics(table: pd.DataFrame) -> dict[str, float]:
    """The comparison run's metrics: ``class_agreement.<model>.<class>`` for all images and
    ``class_agreement.<model>.<by>.<group>.<class>`` per source, sampler and transformation, each with
    ``_ci_low`` / ``_ci_high``."""
    out = {}
    for _, r in table.iterrows():
        label = "both" if r["label"] == BOTH else r["label"]
        where = () if r["by"] == "all" else (r["by"], r["group"])
        stem = metric_key("class_agreement", r["model"], *where, label)
        out[stem] = float(r["share"])
        out[f"{stem}_ci_low"] = float(r["ci_low"])
        out[f"{stem}_ci_high"] = float(r["ci_high"])
    return {k: v for k, v in out.items() if not math.isnan(v)}


def compact_markdown(table: pd.DataFrame) -> str:
    """For a narrow pane (the Prefect factory summary): agreement overall and per sampler, per class."""
    if table.empty:
        return "No class agreement: no baseline classifier predicted synthetic images."
    shown = table[table["by"].isin(["all", "sampler", "real test"])]
    lines = ["| Model | Images | Class | Agreement (95% CI) |", "|---|---|---|---|"]
    for _, r in shown.iterrows():
        what = {"all": "all synthetic", "sampler": f"sampler {r['group']}", "real test": f"real: {r['group']}"}[r["by"]]
        lines.append(f"| {r['model']} | {what} ({r['n_images']}) | {r['label']} | {_pct(r)} |")
    return "\n".join(lines)
