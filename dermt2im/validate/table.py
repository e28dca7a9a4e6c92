"""Table IV and Fig. 10, rebuilt from MLflow alone.

``build_report`` reads one comparison (a parent run tagged ``dermt2im.kind=comparison``), its
finished child runs and their per-image predictions (the ``predictions/<test set>.csv`` artifact
every cell logs) from the tracking store, and nothing else: no manifest, no cached result.

Each row of Table IV is (model, regime, test set) and states what was run: the seeds, the real
and synthetic training images the cells actually held and the synthetic share they reached next
to the configured one. Its numbers are means over seeds with a 95 % percentile bootstrap
interval over the test images (``bootstrap``). A regime other than the baseline also gets the
paired bootstrap interval of its balanced-accuracy difference to the baseline and the exact
McNemar test (baseline vs that regime, same seed, same test images), one per seed. Its companion,
``class_agreement.md`` / ``.csv`` (also appended to ``table_iv.md``), says how many synthetic images
the baseline classifiers predict as their intended class (``agreement``). The verdict
follows from those two: a regime *beats* the baseline when the interval of the difference lies
above zero and McNemar's p < 0.05 in every seed; otherwise the report says plainly that it does
not, or that the gain is not established, and why.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import atomic_path, atomic_write_text
from dermt2im.core.runtime import TrackingConfig
from dermt2im.core.tracking import RunRecord, Tracker, metric_key, open_tracker
from dermt2im.core.workdir import Workdir
from dermt2im.fidelity.tracking import fidelity_lines
from dermt2im.validate import agreement as ag
from dermt2im.validate.bootstrap import paired_difference, seed_mean_interval
from dermt2im.validate.figures import MODEL_ORDER, _regime_order, fig10
from dermt2im.validate.metrics import METRICS, THRESHOLD, binary_metrics, mcnemar_from_predictions
from dermt2im.validate.table_text import headline, markdown, verdicts

PRIMARY = "balanced_accuracy"
ALPHA = 0.05


class ReportError(DermT2imError, ValueError):
    """No comparison to report on, or the one named is not a comparison (the CLI shows it as a
    message, not a traceback)."""


class NoComparison(ReportError):
    """The experiment holds no comparison run yet."""


# --- reading MLflow ---------------------------------------------------------------------------


def newest_comparison(tracker: Tracker) -> str:
    for status in ("FINISHED", None):
        flt = "tags.`dermt2im.kind` = 'comparison'"
        if status:
            flt += f" and attributes.status = '{status}'"
        runs = tracker.runs(flt, order_by=["attributes.end_time DESC", "attributes.start_time DESC"], limit=1)
        if runs:
            return runs[0].run_id
    raise NoComparison("no comparison run in this MLflow experiment yet: run `dermt2im validate` first")


def finished_cells(tracker: Tracker, parent_run_id: str) -> list[RunRecord]:
    """The finished child runs of a comparison; the newest run per (model, regime, seed)."""
    runs = tracker.runs(f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'")
    latest: dict[tuple, RunRecord] = {}
    for r in runs:
        if r.tags.get("dermt2im.kind") != "cell":
            continue
        cell = (r.tags.get("model"), r.tags.get("regime"), int(r.tags.get("seed", -1)))
        if cell not in latest or (r.end_time or 0) >= (latest[cell].end_time or 0):
            latest[cell] = r
    return list(latest.values())


def _count(run: RunRecord, name: str) -> int:
    value = run.params.get(name, run.tags.get(name))
    return int(float(value)) if value not in (None, "") else -1


def predictions_frame(tracker: Tracker, runs: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per (cell run, test set, image): model, regime, seed, counts, key, label, prob."""
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            try:
                folder = tracker.download(r.run_id, "predictions", Path(tmp) / r.run_id)
            except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types
                raise ReportError(f"child run {r.run_id} ({r.name}) has no predictions/ artifact: {err}") from err
            for csv in sorted(folder.glob("*.csv")):
                df = pd.read_csv(csv, dtype={"key": str}, usecols=["key", "label", "prob"])
                t = r.tags
                frames.append(df.assign(
                    test_set=csv.stem, model=t.get("model"), regime=t.get("regime"), seed=int(t.get("seed", -1)),
                    setting=t.get("setting"), configured_share=float(t.get("synthetic_ratio", "nan")),
                    synthetic_source=t.get("synthetic_source") or ("none" if t.get("regime") == "baseline" else "all"),
                    n_real=_count(r, "n_real"), n_synthetic=_count(r, "n_synthetic"),
                    target_synthetic=_count(r, "target_synthetic"), run_id=r.run_id))
    if not frames:
        raise ReportError("the comparison's child runs hold no predictions")
    return pd.concat(frames, ignore_index=True)


def agreement_frame(tracker: Tracker, runs: Sequence[RunRecord]) -> pd.DataFrame:
    """The baseline cells' predictions of the synthetic images (``agreement/synthetic.csv``), one row
    per (cell run, image), with the cell's model and seed; empty when no cell made any."""
    from dermt2im.validate.agreement import ARTIFACT, FILE

    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            if r.tags.get("regime") != "baseline":
                continue
            try:
                folder = tracker.download(r.run_id, ARTIFACT, Path(tmp) / r.run_id)
            except Exception:  # noqa: BLE001 - no synthetic images were usable when the cell ran
                continue
            if (folder / FILE).is_file():
                df = pd.read_csv(folder / FILE, dtype={"key": str, "sampler": str, "transformation": str},
                                 keep_default_na=False)
                frames.append(df.assign(model=r.tags.get("model"), seed=int(r.tags.get("seed", -1))))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """The predictions of one (model, regime, test set): one row per seed, one column per image."""

    seeds: list[int]
    run_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    info: pd.DataFrame  # one row per seed: counts and shares


def _groups(preds: pd.DataFrame) -> dict[tuple[str, str, str], Group]:
    out = {}
    for test_set, per_set in preds.groupby("test_set", sort=True):
        # Every cell of a comparison is tested on the same images; keep those all of them hold.
        runs = per_set["run_id"].nunique()
        shared = per_set.groupby("key")["run_id"].nunique()
        keys = sorted(shared[shared == runs].index)
        labels = per_set.drop_duplicates("key").set_index("key").loc[keys, "label"].to_numpy(dtype=int)
        for (model, regime), g in per_set.groupby(["model", "regime"], sort=False):
            wide = g.pivot_table(index="seed", columns="key", values="prob", aggfunc="first")[keys].sort_index()
            info = g.drop_duplicates("seed").set_index("seed").sort_index()
            out[(model, regime, test_set)] = Group(list(wide.index), list(info["run_id"]), labels,
                                                   wide.to_numpy(dtype=float), info)
    return out


def _share_columns(info: pd.DataFrame) -> dict[str, object]:
    n_real, n_syn, target = info["n_real"], info["n_synthetic"], info["target_synthetic"]
    total = n_real + n_syn
    return {"setting": info["setting"].iloc[0], "synthetic_source": info["synthetic_source"].iloc[0],
            "configured_share": float(info["configured_share"].iloc[0]),
            "n_real_min": int(n_real.min()), "n_real_max": int(n_real.max()),
            "n_synthetic_min": int(n_syn.min()), "n_synthetic_max": int(n_syn.max()),
            "synthetic_share": float((n_syn / total.where(total > 0)).mean()),
            "share_reached": bool(((target < 0) | (n_syn >= target)).all())}


def _mcnemar(base: Group, other: Group) -> list[tuple[int, float]]:
    """(seed, p) for every seed both groups ran; paired on the same test images."""
    out = []
    for i, seed in enumerate(other.seeds):
        if seed in base.seeds:
            pb = (base.probs[base.seeds.index(seed)] >= THRESHOLD).astype(int)
            po = (other.probs[i] >= THRESHOLD).astype(int)
            out.append((seed, mcnemar_from_predictions(other.labels, pb, po).p_value))
    return out


def table_iv(preds: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, regime, test set): counts, shares, metrics with intervals, the paired
    difference to the baseline and McNemar's p per seed."""
    groups = _groups(preds)
    rows = []
    for (model, regime, test_set), g in groups.items():
        row: dict[str, object] = {"model": model, "regime": regime, "test_set": test_set, "n_seeds": len(g.seeds),
                                  "seeds": ";".join(map(str, g.seeds)), "n_test": len(g.labels),
                                  **_share_columns(g.info)}
        for m in METRICS:
            ci = seed_mean_interval(g.labels, g.probs, m)
            per_seed = [binary_metrics(g.labels, p)[m] for p in g.probs]  # how far the seeds disagree
            row.update({f"{m}_mean": ci.value, f"{m}_ci_low": ci.low, f"{m}_ci_high": ci.high,
                        f"{m}_seed_min": float(np.nanmin(per_seed)) if not np.isnan(per_seed).all() else math.nan,
                        f"{m}_seed_max": float(np.nanmax(per_seed)) if not np.isnan(per_seed).all() else math.nan})
        base = groups.get((model, "baseline", test_set))
        diff = paired_difference(g.labels, base.probs, g.probs, PRIMARY) if base and regime != "baseline" else None
        row.update({f"{PRIMARY}_diff": diff.value if diff else math.nan,
                    f"{PRIMARY}_diff_ci_low": diff.low if diff else math.nan,
                    f"{PRIMARY}_diff_ci_high": diff.high if diff else math.nan})
        tests = _mcnemar(base, g) if base and regime != "baseline" else []
        row["mcnemar_p_values"] = ";".join(f"{p:.3g}" for _, p in tests)
        row["mcnemar_significant_seeds"] = sum(p < ALPHA for _, p in tests)
        row["mcnemar_seeds"] = len(tests)
        row["run_ids"] = ";".join(g.run_ids)
        rows.append(row)
    df = pd.DataFrame(rows)
    order = sorted(range(len(df)), key=lambda i: (MODEL_ORDER.get(df["model"].iloc[i], 9), df["model"].iloc[i],
                                                  _regime_order(df["regime"].iloc[i]), df["test_set"].iloc[i]))
    return df.iloc[order].reset_index(drop=True)


# --- writing ----------------------------------------------------------------------------------


def _headline_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The parent run's metrics: balanced accuracy per (model, test set, regime) and each regime's
    difference to the baseline with its interval."""
    out = {}
    for _, r in table.iterrows():
        out[metric_key(PRIMARY, r["model"], r["test_set"], r["regime"])] = r[f"{PRIMARY}_mean"]
        if r["regime"] != "baseline":
            stem = (f"{PRIMARY}_diff", r["model"], r["test_set"], f"{r['regime']}_minus_baseline")
            out[metric_key(*stem)] = r[f"{PRIMARY}_diff"]
            out[metric_key(*stem[:-1], f"{r['regime']}_minus_baseline_ci_low")] = r[f"{PRIMARY}_diff_ci_low"]
            out[metric_key(*stem[:-1], f"{r['regime']}_minus_baseline_ci_high")] = r[f"{PRIMARY}_diff_ci_high"]
    return {k: float(v) for k, v in out.items() if not pd.isna(v)}


def build_report(workdir: Workdir, tracking: TrackingConfig, *, parent_run_id: str | None = None) -> dict[str, Path]:
    """Rebuild Table IV (Markdown + CSV), the verdict and Fig. 10 from MLflow alone; the newest
    comparison when ``parent_run_id`` is None. The files, the headline metrics and the verdict are
    also logged on the parent run."""
    tracker = open_tracker(workdir, tracking)
    pid = parent_run_id or newest_comparison(tracker)
    try:
        parent = tracker.run(pid)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types
        raise ReportError(f"no MLflow run {pid!r}: {err}") from err
    if parent.tags.get("dermt2im.kind") != "comparison":
        raise ReportError(f"run {pid} is not a comparison (tag dermt2im.kind=comparison)")
    cells = finished_cells(tracker, pid)
    if not cells:
        raise ReportError(f"comparison {pid} has no finished child runs")
    skipped = json.loads(parent.tags.get("dermt2im.skipped", "{}") or "{}")
    predictions = predictions_frame(tracker, cells)
    table = table_iv(predictions)
    lines = verdicts(table)
    head = headline(table, lines, "hybrid", skipped)
    lines += fidelity_lines(tracker, table)  # next to each verdict, the fidelity of the set it trained on
    experiment = tracker.experiment_name(parent.experiment_id)
    agreement = ag.agreement_table(agreement_frame(tracker, cells))
    reference = ag.reference_rows(predictions[predictions["regime"] == "baseline"])
    agreement_md = ag.markdown(agreement, reference)
    lines += ag.headline(agreement)
    md = markdown(table, lines, head, parent_run_id=pid, experiment=experiment, skipped=skipped)
    md = md.rstrip("\n") + "\n\n" + agreement_md
    reports = workdir.reports
    csv, figure = reports / "table_iv.csv", reports / "fig10.png"
    unchanged = csv.is_file() and figure.is_file() and csv.read_text() == table.to_csv(index=False)
    paths = {
        "table_md": atomic_write_text(reports / "table_iv.md", md),
        "table_csv": csv,
        "fig10": figure if unchanged else fig10(table, figure),  # a cached re-run does not redraw it
        "verdict": atomic_write_text(reports / "verdict.txt", "\n".join([head, *lines]) + "\n"),
        "agreement_md": atomic_write_text(reports / "class_agreement.md", agreement_md),
        "agreement_csv": reports / "class_agreement.csv",
    }
    with atomic_path(paths["agreement_csv"]) as tmp:
        pd.concat([agreement, reference], ignore_index=True).to_csv(tmp, index=False)
    if not unchanged:
        with atomic_path(csv) as tmp:
            table.to_csv(tmp, index=False)
    for p in paths.values():
        tracker.log_file(pid, p, "report")
    tracker.log_metrics(pid, {**_headline_metrics(table), **ag.metrics(agreement)})
    intro = parent.tags.get("dermt2im.description", "")
    tracker.set_description(pid, "\n\n".join(s for s in (intro, f"**Result.** {head}", *lines) if s))
    return paths
