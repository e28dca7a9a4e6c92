"""Table IV is rebuilt from MLflow alone (the child runs' tags and their per-image predictions),
states what was actually run, and its intervals and verdict are honest."""

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermt2im.core.tracking import open_tracker
from dermt2im.validate.metrics import METRICS, binary_metrics
from dermt2im.validate.table import ReportError, build_report
from tests.validate.validate_fixtures import tiny_config

N_BENIGN, N_MALIGNANT = 30, 20
LABELS = np.array([0] * N_BENIGN + [1] * N_MALIGNANT)


def _probs(wrong: set[int], rng: np.random.Generator) -> np.ndarray:
    """P(malignant) that classifies every image right except those in ``wrong``."""
    confident = rng.uniform(0.55, 0.95, len(LABELS))
    right = np.where(LABELS == 1, confident, 1 - confident)
    return np.round(np.array([1 - p if i in wrong else p for i, p in enumerate(right)]), 3)


def _cell(wrong, seed: int, n_real: int = 40, n_synthetic: int = 0, target: int = 0) -> dict:
    return {"wrong": set(wrong), "rng": seed, "n_real": n_real, "n_synthetic": n_synthetic, "target": target}


def _log_comparison(workdir, cfg, cells: dict, *, failed=(), without_predictions=()):
    """A comparison as validate() logs it. ``cells``: (model, regime, seed) -> {test set: _cell(...)}."""
    tracker = open_tracker(workdir, cfg.tracking)
    parent = tracker.start("comparison", tags={"dermt2im.kind": "comparison", "dermt2im.skipped": "{}"})
    ids = {}
    for (model, regime, seed), per_set in cells.items():
        first = next(iter(per_set.values()))
        tags = {"dermt2im.kind": "cell", "model": model, "regime": regime, "seed": str(seed),
                "synthetic_ratio": "0" if regime == "baseline" else "0.75", "setting": "constant",
                "n_real": str(first["n_real"]), "n_synthetic": str(first["n_synthetic"])}
        run = tracker.start(f"{model}-{regime}-seed{seed}", tags=tags, parent=parent)
        tracker.log_params(run, {"target_synthetic": first["target"]})
        with tempfile.TemporaryDirectory() as tmp:
            for test_set, c in per_set.items():
                prob = _probs(c["wrong"], np.random.default_rng(c["rng"]))
                pd.DataFrame({"key": [f"img{i:03d}" for i in range(len(LABELS))], "path": "x.png", "label": LABELS,
                              "prob": prob, "pred": (prob >= 0.5).astype(int)}).to_csv(Path(tmp) / f"{test_set}.csv",
                                                                                       index=False)
                m = binary_metrics(LABELS, prob)
                tracker.log_metrics(run, {f"test.{test_set}.{k}": v for k, v in m.items()})
            if (model, regime, seed) not in without_predictions:
                tracker.log_folder(run, tmp, "predictions")
        tracker.finish(run, "FAILED" if (model, regime, seed) in failed else "FINISHED")
        ids[(model, regime, seed)] = run
    tracker.finish(parent)
    return parent, ids, tracker


def test_every_number_is_recomputed_from_the_predictions_in_mlflow(workdir):
    cfg = tiny_config("report-equal")
    cells = {}
    for seed in range(3):
        cells[("vit", "baseline", seed)] = {"set-a": _cell(range(seed, 12 + seed), seed),
                                            "set-b": _cell(range(20 + seed, 40), seed + 10)}
        cells[("vit", "hybrid", seed)] = {"set-a": _cell(range(0, 14 + seed), seed + 20, 10, 30, 30),
                                          "set-b": _cell(range(18, 40), seed + 30, 10, 30, 30)}
    cells[("vit", "hybrid", 9)] = {"set-a": _cell([], 99, 10, 30, 30), "set-b": _cell([], 99, 10, 30, 30)}
    parent, ids, tracker = _log_comparison(workdir, cfg, cells, failed={("vit", "hybrid", 9)})

    paths = build_report(workdir, cfg.tracking, parent_run_id=parent)
    assert paths["fig10"].stat().st_size > 1000
    table = pd.read_csv(paths["table_csv"])
    assert len(table) == 4  # (baseline, hybrid) x (set-a, set-b); the failed run is never reported
    for _, row in table.iterrows():
        runs = [ids[("vit", row["regime"], s)] for s in range(3)]
        assert row["run_ids"].split(";") == runs and row["n_test"] == len(LABELS)
        for m in METRICS:
            stored = [tracker.run(r).metrics[f"test.{row['test_set']}.{m}"] for r in runs]
            assert row[f"{m}_mean"] == pytest.approx(np.mean(stored), abs=1e-9)
            assert (row[f"{m}_seed_min"], row[f"{m}_seed_max"]) == pytest.approx((min(stored), max(stored)))
            assert 0 <= row[f"{m}_ci_low"] <= row[f"{m}_mean"] <= row[f"{m}_ci_high"] <= 1
    hybrid = table[(table["regime"] == "hybrid") & (table["test_set"] == "set-a")].iloc[0]
    assert (hybrid["n_real_min"], hybrid["n_synthetic_min"], hybrid["synthetic_share"]) == (10, 30, 0.75)
    assert hybrid["share_reached"] and hybrid["mcnemar_seeds"] == 3
    assert hybrid["balanced_accuracy_diff_ci_low"] <= hybrid["balanced_accuracy_diff"] <= hybrid["balanced_accuracy_diff_ci_high"]

    md = paths["table_md"].read_text()
    assert "95% percentile bootstrap interval over the test images" in md and "seeds pooled" in md
    assert "| vit | hybrid | all | set-a | 3 | 10 + 30 | 75% |" in md
    assert md.count("Table IV") == 1

    parent_run = tracker.run(parent)
    assert parent_run.metrics["balanced_accuracy.vit.set-a.baseline"] == pytest.approx(
        table[(table["regime"] == "baseline") & (table["test_set"] == "set-a")]["balanced_accuracy_mean"].iloc[0])
    assert "balanced_accuracy_diff.vit.set-b.hybrid_minus_baseline" in parent_run.metrics
    assert not any(k.startswith("mcnemar") for k in parent_run.metrics)
    assert "**Result.** Hybrid does not beat" in parent_run.tags["mlflow.note.content"]


def test_a_cell_short_of_its_synthetic_share_says_so_in_the_table_and_the_verdict(workdir):
    """75% configured, but only 16 usable synthetic images: the cells held 28 real + 16 synthetic (36%)."""
    cfg = tiny_config("report-short")
    cells = {("vit", "baseline", 0): {"ham": _cell(range(10), 0)},
             ("vit", "hybrid", 0): {"ham": _cell(range(11), 1, n_real=28, n_synthetic=16, target=33)}}
    parent, _, _ = _log_comparison(workdir, cfg, cells)
    paths = build_report(workdir, cfg.tracking, parent_run_id=parent)
    md = paths["table_md"].read_text()
    assert "| vit | hybrid | all | ham | 1 | 28 + 16 | **36%**, configured 75% (not reached) |" in md
    assert "75%" not in md.split("| vit | baseline |")[1].split("\n")[0]
    verdict = paths["verdict"].read_text()
    assert "28 + 16 real + synthetic images, a synthetic share of 36%, short of the configured 75%" in verdict
    assert "a synthetic share of 36% instead of 75%" in verdict.splitlines()[0]
    assert not pd.read_csv(paths["table_csv"]).set_index("regime").loc["hybrid", "share_reached"]


def test_a_real_gain_is_reported_as_such_and_small_or_negative_ones_are_not(workdir):
    cfg = tiny_config("report-gain")
    base_wrong = set(range(0, 10)) | set(range(30, 40))  # 20 of 50 wrong
    cells = {}
    for seed in range(2):
        cells[("mobilenet_v2", "baseline", seed)] = {s: _cell(base_wrong, seed) for s in ("clean", "noisy", "worse")}
        cells[("mobilenet_v2", "hybrid", seed)] = {
            "clean": _cell({0, 30}, seed + 5, 10, 30, 30),  # fixes 18 of the baseline's mistakes, makes none
            "noisy": _cell((base_wrong - {0, 30}) | {15}, seed + 6, 10, 30, 30),  # fixes two, breaks one
            "worse": _cell(base_wrong | set(range(10, 22)) | set(range(40, 46)), seed + 7, 10, 30, 30),
        }
    parent, _, _ = _log_comparison(workdir, cfg, cells)
    verdict = build_report(workdir, cfg.tracking, parent_run_id=parent)["verdict"].read_text()
    lines = {line.split(":")[0]: line for line in verdict.splitlines()[1:]}
    assert lines["mobilenet_v2 on clean"].endswith("McNemar p < 0.05 in 2 of 2 seed(s): hybrid beats the baseline.")
    assert "(95% CI)" in lines["mobilenet_v2 on clean"]
    assert "hybrid is higher but the gain is NOT established" in lines["mobilenet_v2 on noisy"]
    assert "McNemar p >= 0.05 in 2 of 2 seed(s)" in lines["mobilenet_v2 on noisy"]
    assert "hybrid is WORSE than the baseline (the 95% CI of the difference lies below 0)" in lines["mobilenet_v2 on worse"]
    assert verdict.startswith("Hybrid beats the real-only baseline in 1 of 3")


def test_newest_comparison_by_default_and_newest_run_per_cell(workdir):
    cfg = tiny_config("report-newest")
    _log_comparison(workdir, cfg, {("vit", "baseline", 0): {"s": _cell(range(25), 0)}})
    newer, _, tracker = _log_comparison(workdir, cfg, {("vit", "baseline", 0): {"s": _cell(range(10), 0)},
                                                       ("vit", "baseline", 1): {"s": _cell(range(20), 1)}})
    # a re-run of one cell under the same parent: the newer run replaces the older one
    rerun = tracker.start("rerun", parent=newer, tags={"dermt2im.kind": "cell", "model": "vit", "regime": "baseline",
                                                       "seed": "1", "synthetic_ratio": "0", "setting": "constant",
                                                       "n_real": "40", "n_synthetic": "0"})
    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame({"key": [f"img{i:03d}" for i in range(len(LABELS))], "label": LABELS,
                      "prob": LABELS.astype(float)}).to_csv(Path(tmp) / "s.csv", index=False)
        tracker.log_folder(rerun, tmp, "predictions")
    tracker.finish(rerun)
    table = pd.read_csv(build_report(workdir, cfg.tracking)["table_csv"])
    assert len(table) == 1 and table["accuracy_mean"].iloc[0] == pytest.approx((40 / 50 + 1.0) / 2)
    assert rerun in table["run_ids"].iloc[0]
    md = (workdir.reports / "table_iv.md").read_text()
    assert f"`{newer}`" in md and "No hybrid runs in this comparison." in md


def test_report_errors_are_clear(workdir):
    cfg = tiny_config("report-empty")
    with pytest.raises(ReportError, match="no comparison run .* run `dermt2im validate` first"):
        build_report(workdir, cfg.tracking)
    tracker = open_tracker(workdir, cfg.tracking)
    other = tracker.start("not a comparison")
    with pytest.raises(ReportError, match="is not a comparison"):
        build_report(workdir, cfg.tracking, parent_run_id=other)
    parent, ids, _ = _log_comparison(workdir, cfg, {("vit", "baseline", 0): {"s": _cell([], 0)}},
                                     without_predictions={("vit", "baseline", 0)})
    with pytest.raises(ReportError, match=f"child run {ids[('vit', 'baseline', 0)]} .* has no predictions"):
        build_report(workdir, cfg.tracking, parent_run_id=parent)


def test_a_moved_workdir_keeps_its_artifacts(tmp_path, monkeypatch):
    """Artifact locations are relative to the store (mlflow-artifacts:/...), never absolute paths:
    Table IV rebuilds from a workdir moved elsewhere, and MLflow's Default experiment does not
    point into whatever directory the first command ran from."""
    import shutil

    from mlflow import MlflowClient

    from dermt2im.core.workdir import Workdir

    old = Workdir.at(tmp_path / "old")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the workdir's own store, W/mlflow.db
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("report-moved")
    cells = {("vit", "baseline", 0): {"s": _cell(range(10), 0)}, ("vit", "hybrid", 0): {"s": _cell(range(5), 1)}}
    parent, _, _ = _log_comparison(old, cfg, cells)
    assert (old.root / "mlartifacts").is_dir()
    shutil.move(old.root, tmp_path / "new")
    moved = Workdir.at(tmp_path / "new")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", moved.mlflow_uri)  # as a new process on the moved workdir sets it
    table = pd.read_csv(build_report(moved, cfg.tracking, parent_run_id=parent)["table_csv"])
    assert len(table) == 2 and table["balanced_accuracy_mean"].notna().all()
    locations = {e.name: e.artifact_location for e in MlflowClient(moved.mlflow_uri).search_experiments()}
    assert locations == {"Default": "mlflow-artifacts:/0", "report-moved": "mlflow-artifacts:/report-moved"}


def test_an_unchanged_table_is_not_redrawn_and_a_changed_one_is(workdir, monkeypatch):
    from dermt2im.validate import table as table_module

    cfg = tiny_config("report-redraw")
    cells = {("vit", r, s): {"set-a": _cell(range(wrong + s), s)} for r, wrong in (("baseline", 5), ("hybrid", 9))
             for s in range(2)}
    parent, _, _ = _log_comparison(workdir, cfg, cells)
    first = build_report(workdir, cfg.tracking, parent_run_id=parent)
    drawn: list[object] = []
    real = table_module.fig10
    monkeypatch.setattr(table_module, "fig10", lambda t, out: drawn.append(out) or real(t, out))
    again = build_report(workdir, cfg.tracking, parent_run_id=parent)
    assert drawn == [] and again["fig10"] == first["fig10"] and again["fig10"].stat().st_size > 1000
    first["table_csv"].write_text("stale\n")  # another table on disk: the figure is drawn again
    build_report(workdir, cfg.tracking, parent_run_id=parent)
    assert drawn == [first["fig10"]] and first["table_csv"].read_text() != "stale\n"
