"""Closing a comparison: paired McNemar tests (baseline vs each regime, per model, test set and
seed, on the same test images) logged on the parent run, which is then closed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dermt2im.core.tracking import Tracker, metric_key
from dermt2im.validate.cell import CellResult
from dermt2im.validate.metrics import THRESHOLD, mcnemar_from_predictions
from dermt2im.validate.plan import ValidationPlan


def mcnemar_tests(results: list[CellResult], baseline: str = "baseline") -> pd.DataFrame:
    """Paired exact McNemar, baseline vs every other regime, per (model, test set, seed), on the same
    test images (matched by key)."""
    rows = []
    by = {(r.model, r.regime, r.seed): r for r in results}
    for (model, regime, seed), res in sorted(by.items()):
        base = by.get((model, baseline, seed))
        if regime == baseline or base is None:
            continue
        for name, preds in sorted(res.predictions.items()):
            if name not in base.predictions:
                continue
            b = {k: (y, p) for k, y, p in base.predictions[name]}
            pairs = [(y, int(bp >= THRESHOLD), int(p >= THRESHOLD)) for k, y, p in preds
                     for (_, bp) in [b.get(k, (None, None))] if bp is not None]
            if not pairs:
                continue
            y, pa, pb = (np.array(v) for v in zip(*pairs))
            t = mcnemar_from_predictions(y, pa, pb)
            rows.append({"model": model, "regime": regime, "test_set": name, "seed": seed,
                         "baseline_only_correct": t.b, "regime_only_correct": t.c, "p_value": t.p_value,
                         "n": len(y)})
    return pd.DataFrame(rows, columns=["model", "regime", "test_set", "seed", "baseline_only_correct",
                                       "regime_only_correct", "p_value", "n"])


def mcnemar_metric(model: str, regime: str, test_set: str, seed: int, what: str = "p_value") -> str:
    return metric_key("mcnemar", model, regime, test_set, f"seed{seed}", what)


def close_comparison(tracker: Tracker, plan: ValidationPlan, results: list[CellResult]) -> pd.DataFrame:
    """Log the McNemar tests (p-value and discordant counts) on the parent run and close it."""
    pid = plan.parent_run_id
    table = mcnemar_tests(results)
    points = []
    for r in table.itertuples(index=False):
        points += [(mcnemar_metric(r.model, r.regime, r.test_set, r.seed), float(r.p_value), 0),
                   (mcnemar_metric(r.model, r.regime, r.test_set, r.seed, "b"), float(r.baseline_only_correct), 0),
                   (mcnemar_metric(r.model, r.regime, r.test_set, r.seed, "c"), float(r.regime_only_correct), 0)]
    tracker.log_points(pid, points + [("cells", float(len(results)), 0)])
    if not table.empty:
        tracker.log_text(pid, table.to_csv(index=False), "mcnemar.csv")
    tracker.finish(pid)
    return table
