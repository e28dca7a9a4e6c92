"""Table IV is rebuilt from MLflow alone, its numbers are MLflow's, and its verdict is honest."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from dermt2im.core.tracking import open_tracker
from dermt2im.validate.compare import mcnemar_metric
from dermt2im.validate.metrics import mean_ci
from dermt2im.validate.table import ReportError, build_report
from tests.validate.validate_fixtures import tiny_config


def tracking_client(workdir, tracking):
    tracker = open_tracker(workdir, tracking)
    return tracker.client, tracker.experiment_id

METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1")


def _log_comparison(workdir, cfg, values, *, failed=(), p_values=None):
    """A comparison as validate() logs it. ``values``: (model, regime, seed) -> {test_set: bacc}."""
    client, exp = tracking_client(workdir, cfg.tracking)
    parent = client.create_run(exp, tags={"dermt2im.kind": "comparison", "dermt2im.skipped": "{}"}).info.run_id
    ids = {}
    for (model, regime, seed), per_set in values.items():
        ratio = "0" if regime == "baseline" else "0.75"
        tags = {"mlflow.parentRunId": parent, "dermt2im.kind": "cell", "model": model, "regime": regime,
                "seed": str(seed), "synthetic_ratio": ratio, "setting": "constant", "n_real": "8", "n_synthetic": "0"}
        run = client.create_run(exp, tags=tags).info.run_id
        for test_set, v in per_set.items():
            for i, m in enumerate(METRICS):  # balanced accuracy is v; the others differ a little
                client.log_metric(run, f"test.{test_set}.{m}", v if m == "balanced_accuracy" else v - 0.01 * (i + 1))
            for c, n in zip(("tn", "fp", "fn", "tp"), (4, 1, 2, 3)):
                client.log_metric(run, f"test.{test_set}.{c}", n)
        client.set_terminated(run, "FAILED" if (model, regime, seed) in failed else "FINISHED")
        ids[(model, regime, seed)] = run
    for (model, regime, test_set, seed), p in (p_values or {}).items():
        client.log_metric(parent, mcnemar_metric(model, regime, test_set, seed), p)
    client.set_terminated(parent, "FINISHED")
    return parent, ids


def test_report_numbers_equal_the_mlflow_numbers(workdir):
    cfg = tiny_config("report-equal")
    values = {}
    for seed, (b, h) in enumerate([(0.70, 0.66), (0.74, 0.69), (0.78, 0.71)]):
        values[("vit", "baseline", seed)] = {"set-a": b, "set-b": b - 0.1}
        values[("vit", "hybrid", seed)] = {"set-a": h, "set-b": h - 0.1}
    values[("vit", "hybrid", 9)] = {"set-a": 0.99, "set-b": 0.99}  # a failed run: never reported
    pvals = {("vit", "hybrid", "set-a", s): p for s, p in enumerate([0.5, 0.03, 1.0])}
    parent, ids = _log_comparison(workdir, cfg, values, failed={("vit", "hybrid", 9)}, p_values=pvals)

    paths = build_report(workdir, cfg.tracking, parent_run_id=parent)
    assert {"table_md", "table_csv", "fig10"} <= set(paths)
    assert paths["fig10"].stat().st_size > 1000
    table = pd.read_csv(paths["table_csv"])
    assert len(table) == 4  # (baseline, hybrid) x (set-a, set-b)
    client = MlflowClient()
    for _, row in table.iterrows():
        runs = [ids[("vit", row["regime"], s)] for s in range(3)]
        assert row["run_ids"].split(";") == runs
        for m in METRICS:
            stored = [client.get_run(r).data.metrics[f"test.{row['test_set']}.{m}"] for r in runs]
            ci = mean_ci(stored)
            assert row[f"{m}_mean"] == pytest.approx(ci.mean, abs=1e-12)
            assert row[f"{m}_ci_low"] == pytest.approx(ci.low, abs=1e-12)
            assert row[f"{m}_ci_high"] == pytest.approx(ci.high, abs=1e-12)
    hy = table[(table["regime"] == "hybrid") & (table["test_set"] == "set-a")].iloc[0]
    assert hy["balanced_accuracy_mean"] == pytest.approx((0.66 + 0.69 + 0.71) / 3)
    assert hy["mcnemar_p_values"] == "0.5;0.03;1" and hy["mcnemar_significant_seeds"] == 1
    md = paths["table_md"].read_text()
    assert f"{(0.66 + 0.69 + 0.71) / 3:.3f} ± " in md

    # honesty: hybrid is worse everywhere, and the report says so in plain words
    assert "Hybrid does not beat the real-only baseline in any of the 2" in md
    assert "vit on set-a: hybrid balanced accuracy 0.687 vs baseline 0.740 (-0.053): hybrid does NOT beat the baseline" in md


def test_a_real_gain_is_reported_as_such_and_a_noisy_one_is_not(workdir):
    cfg = tiny_config("report-gain")
    values = {}
    for seed, (b, h, noisy) in enumerate([(0.60, 0.80, 0.40), (0.62, 0.83, 0.90), (0.61, 0.82, 0.75)]):
        values[("mobilenet_v2", "baseline", seed)] = {"clean": b, "noisy": b}
        values[("mobilenet_v2", "hybrid", seed)] = {"clean": h, "noisy": noisy}
    parent, _ = _log_comparison(workdir, cfg, values)
    verdict = build_report(workdir, cfg.tracking, parent_run_id=parent)["verdict"].read_text()
    assert "mobilenet_v2 on clean: hybrid balanced accuracy 0.817 vs baseline 0.610 (+0.207, 95% CI" in verdict
    assert "hybrid beats the baseline" in verdict
    assert "mobilenet_v2 on noisy: hybrid balanced accuracy 0.683" in verdict
    assert "includes 0): hybrid is higher but the gain is NOT established" in verdict
    assert verdict.startswith("Hybrid beats the real-only baseline in 1 of 2")


def test_newest_comparison_by_default_and_newest_run_per_cell(workdir):
    cfg = tiny_config("report-newest")
    _log_comparison(workdir, cfg, {("vit", "baseline", 0): {"s": 0.5}})
    newer, _ = _log_comparison(workdir, cfg, {("vit", "baseline", 0): {"s": 0.6}, ("vit", "baseline", 1): {"s": 0.8}})
    client, exp = tracking_client(workdir, cfg.tracking)
    # a re-run of one cell under the same parent: the newer run replaces the older one
    rerun = client.create_run(exp, tags={"mlflow.parentRunId": newer, "dermt2im.kind": "cell", "model": "vit",
                                         "regime": "baseline", "seed": "1", "synthetic_ratio": "0",
                                         "setting": "constant", "n_real": "8", "n_synthetic": "0"}).info.run_id
    for m in METRICS:
        client.log_metric(rerun, f"test.s.{m}", 0.99)
    client.set_terminated(rerun, "FINISHED")
    table = pd.read_csv(build_report(workdir, cfg.tracking)["table_csv"])
    assert len(table) == 1 and table["balanced_accuracy_mean"].iloc[0] == pytest.approx((0.6 + 0.99) / 2)
    assert rerun in table["run_ids"].iloc[0]
    md = (workdir.reports / "table_iv.md").read_text()
    assert f"`{newer}`" in md and "No hybrid runs in this comparison." in md


def test_report_errors_are_clear(workdir):
    cfg = tiny_config("report-empty")
    with pytest.raises(ReportError, match="no comparison run .* run `dermt2im validate` first"):
        build_report(workdir, cfg.tracking)
    client, exp = tracking_client(workdir, cfg.tracking)
    other = client.create_run(exp).info.run_id
    with pytest.raises(ReportError, match="is not a comparison"):
        build_report(workdir, cfg.tracking, parent_run_id=other)


def test_an_unchanged_table_is_not_redrawn_and_a_changed_one_is(workdir, monkeypatch):
    from dermt2im.validate import table as table_module

    cfg = tiny_config("report-redraw")
    values = {("vit", r, s): {"set-a": v + s / 100} for r, v in (("baseline", 0.7), ("hybrid", 0.6)) for s in range(2)}
    parent, _ = _log_comparison(workdir, cfg, values)
    first = build_report(workdir, cfg.tracking, parent_run_id=parent)
    drawn: list[object] = []
    real = table_module.fig10
    monkeypatch.setattr(table_module, "fig10", lambda t, out: drawn.append(out) or real(t, out))
    again = build_report(workdir, cfg.tracking, parent_run_id=parent)
    assert drawn == [] and again["fig10"] == first["fig10"] and again["fig10"].stat().st_size > 1000
    first["table_csv"].write_text("stale\n")  # another table on disk: the figure is drawn again
    build_report(workdir, cfg.tracking, parent_run_id=parent)
    assert drawn == [first["fig10"]] and first["table_csv"].read_text() != "stale\n"
