"""validate(): model x regime x seed in MLflow child runs, leakage and no-synthetic guards, the flow."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from dermt2im.core.views import seeds_view
from dermt2im.core.manifest import SEEDS, read_manifest, write_manifest
from dermt2im.core.tracking import sqlite_artifact_root
from dermt2im.validate.cell import CELL_TAGS
from dermt2im.validate.inputs import ValidationError
from tests.validate.validate_fixtures import make_validation_data, tiny_config
from tests.validate.validate_fixtures import run_validation as validate

pytestmark = pytest.mark.slow


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_validate_logs_a_comparison_with_identical_child_runs(workdir):
    make_validation_data(workdir)
    cfg = tiny_config("validation-e2e", epochs=2)
    report = validate(workdir, cfg)
    assert report.runs == 2 and report.reused == 0 and not report.skipped
    assert report.table_path == workdir.reports / "table_iv.md"
    assert "hybrid" in report.summary().lower()

    client = MlflowClient()
    parent = client.get_run(report.parent_run_id)
    assert parent.data.tags["dermt2im.kind"] == "comparison" and parent.info.status == "FINISHED"
    children = _children(client, report.parent_run_id)
    assert sorted(r.data.tags["regime"] for r in children) == ["baseline", "hybrid"]
    assert len({frozenset(r.data.params) for r in children}) == 1  # identical param keys
    for r in children:
        assert r.info.status == "FINISHED"
        for k in CELL_TAGS:
            assert k in r.data.tags and k in r.data.params
        for test_set in ("phantom-isic", "phantom-ham", "seeds-test"):
            for m in ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1", "tp"):
                assert f"test.{test_set}.{m}" in r.data.metrics
        history = client.get_metric_history(r.info.run_id, "val_balanced_accuracy")
        assert [h.step for h in history] == [1, 2]
        assert {h.step for h in client.get_metric_history(r.info.run_id, "train_loss")} == {1, 2}
        contexts = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"])
                    for i in r.inputs.dataset_inputs}
        assert ("val", "validation") in contexts and ("test-phantom-ham", "test") in contexts
        assert any(c == "training" for _, c in contexts)
        # the same top-level names in every child run, so MLflow's compare view lines them up
        root = sqlite_artifact_root(mlflow.get_tracking_uri())  # mlartifacts/ beside the store
        arts = {p.name for p in root.glob(f"*/{r.info.run_id}/artifacts/*")}
        assert {"confusion_phantom-ham.png", "roc_phantom-ham.png", "predictions", "model"} <= arts
        assert r.info.artifact_uri == f"mlflow-artifacts:/validation-e2e/{r.info.run_id}/artifacts"
        assert r.data.tags["synthetic_share_reached"] == "yes"
        assert "training images" in r.data.tags["mlflow.note.content"]

    hybrid = next(r for r in children if r.data.tags["regime"] == "hybrid")
    assert (hybrid.data.tags["n_real"], hybrid.data.tags["n_synthetic"]) == ("6", "18")  # 24 real -> 75% of 24
    baseline = next(r for r in children if r.data.tags["regime"] == "baseline")
    assert baseline.data.metrics["test.phantom-isic.balanced_accuracy"] >= 0.75
    assert set(parent.data.metrics) >= {"balanced_accuracy.vit.phantom-ham.baseline",
                                        "balanced_accuracy.vit.phantom-ham.hybrid",
                                        "balanced_accuracy_diff.vit.phantom-ham.hybrid_minus_baseline"}
    assert parent.data.metrics["balanced_accuracy.vit.phantom-ham.hybrid"] == pytest.approx(
        hybrid.data.metrics["test.phantom-ham.balanced_accuracy"])
    description = parent.data.tags["mlflow.note.content"]
    assert "Real-only (baseline) vs synthetic-augmented training of vit" in description and "**Result.**" in description

    # the report's numbers are MLflow's numbers (one seed: the mean is the run's value)
    table = pd.read_csv(workdir.reports / "table_iv.csv")
    for r in children:
        row = table[(table["regime"] == r.data.tags["regime"]) & (table["test_set"] == "phantom-ham")].iloc[0]
        assert row["balanced_accuracy_mean"] == r.data.metrics["test.phantom-ham.balanced_accuracy"]

    # class agreement: the baseline (real-only) classifier predicted every usable synthetic image, once
    root = sqlite_artifact_root(mlflow.get_tracking_uri())
    agree = pd.read_csv(next(root.glob(f"*/{baseline.info.run_id}/artifacts/agreement/synthetic.csv")))
    assert len(agree) == 24 and set(agree["label"]) == {"benign", "malignant"}  # 12 usable per class
    assert set(agree["sampler"]) == {"euler"} and not list(root.glob(f"*/{hybrid.info.run_id}/artifacts/agreement"))
    companion = pd.read_csv(workdir.reports / "class_agreement.csv")
    overall = companion[(companion["by"] == "all") & (companion["label"] == "both classes")].iloc[0]
    predicted = (agree["pred"] == agree["label"]).groupby(agree["label"]).mean().mean()
    assert overall["share"] == pytest.approx(predicted) and overall["ci_low"] <= overall["share"] <= overall["ci_high"]
    assert overall["share"] >= 0.75  # the fixture's synthetic images are drawn like its seeds
    assert set(companion.loc[companion["by"] == "real test", "group"]) == {"phantom-isic", "phantom-ham", "seeds-test"}
    assert parent.data.metrics["class_agreement.vit.both"] == pytest.approx(overall["share"])
    assert {"class_agreement.vit.malignant_ci_low", "class_agreement.vit.benign_ci_high"} <= set(parent.data.metrics)
    assert "## Class agreement" in (workdir.reports / "table_iv.md").read_text()
    assert "Class agreement (vit baseline classifiers" in (workdir.reports / "verdict.txt").read_text()

    # the same comparison again: the parent is resumed and finished cells are read back, not retrained
    again = validate(workdir, cfg)
    assert again.parent_run_id == report.parent_run_id and again.reused == 2
    assert len(_children(client, report.parent_run_id)) == 2


def test_a_lesion_in_training_and_test_data_is_refused(workdir):
    fx = make_validation_data(workdir, n_synthetic=2)
    seeds = seeds_view(workdir.seeds_manifest)
    leaked = seeds[seeds["split"] == "train"]["lesion_id"].iloc[3]
    path = fx.test_sets["phantom-ham"]
    test = read_manifest(path, SEEDS)
    test.loc[0, "lesion_id"] = leaked
    write_manifest(test, path, SEEDS)
    with pytest.raises(ValidationError, match=f"lesion '{leaked}' is in the seeds' 'train' split and in test set 'phantom-ham'"):
        validate(workdir, tiny_config("validation-leak"))


def test_the_same_image_in_val_and_test_is_refused(workdir):
    fx = make_validation_data(workdir, n_synthetic=2)
    seeds = seeds_view(workdir.seeds_manifest)
    val_row = seeds[seeds["split"] == "val"].iloc[0]
    test = read_manifest(fx.test_sets["phantom-isic"], SEEDS)
    test.loc[0, "sample_id"] = val_row["sample_id"]
    write_manifest(test, fx.test_sets["phantom-isic"], SEEDS)
    with pytest.raises(ValidationError, match="image .* is in the seeds' 'val' split"):
        validate(workdir, tiny_config("validation-leak-image"))


def test_no_accepted_synthetic_images_runs_the_baseline_and_says_why(workdir):
    make_validation_data(workdir, synthetic_status="rejected", n_synthetic=2)
    cfg = tiny_config("validation-nosyn", epochs=1)
    report = validate(workdir, cfg, log_model=False, test_sets={
        "phantom-ham": workdir.test_set_manifest("phantom-ham")})
    assert report.runs == 1 and set(report.skipped) == {"hybrid"}
    assert "no accepted synthetic images" in report.skipped["hybrid"]
    assert "0 accepted" in report.skipped["hybrid"]
    text = report.table_path.read_text()
    assert "hybrid: no accepted synthetic images" in text and "The hybrid regime was not run" in text
    parent = MlflowClient().get_run(report.parent_run_id)
    assert "hybrid" in json.loads(parent.data.tags["dermt2im.skipped"])
    children = _children(MlflowClient(), report.parent_run_id)
    assert {k.split(".")[1] for k in children[0].data.metrics if k.startswith("test.")} == {"phantom-ham"}


def test_only_synthetic_regimes_without_synthetic_images_is_a_clear_error(workdir):
    make_validation_data(workdir, n_synthetic=2)
    Path(workdir.quality_manifest).unlink()  # the gate has not run yet: no verdicts
    cfg = tiny_config("validation-onlysyn", regimes=["hybrid", "synthetic_only"])
    with pytest.raises(ValidationError, match="nothing to validate.*not yet through the quality gate.*include 'baseline'"):
        validate(workdir, cfg)


def test_missing_seeds_is_a_clear_error(workdir):
    with pytest.raises(ValidationError, match="no seeds manifest"):
        validate(workdir, tiny_config("validation-empty"))


def test_validate_flow_runs_cells_as_cached_tasks(prefect_harness, workdir):
    from dermt2im.flows.validate import validate as validate_flow
    from tests.prefect_utils import task_states

    make_validation_data(workdir, n_train=8, n_val=2, n_test=2, n_synthetic=8, n_external=4)
    overrides = ["validate.models=[vit]", "validate.regimes=[baseline, hybrid]", "validate.seeds=[0]",
                 "validate.epochs=1", "validate.segmentation_samples=0", "tracking.experiment=validation-flow",
                 "validate.learning_rate=0.003"]
    state = validate_flow(str(workdir.root), "tiny", overrides, log_model=False, return_state=True)
    out = state.result()
    assert out["runs"] == 2 and out["skipped"] == {}
    assert (workdir.reports / "table_iv.md").is_file() and out["report"]["fig10"].endswith("fig10.png")
    states = task_states(state)
    assert sorted(states["validate"]) == ["Completed", "Completed"]
    assert states["validate-close"] == ["Completed"]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "table-iv" for a in artifact)

    again = validate_flow(str(workdir.root), "tiny", overrides, log_model=False, return_state=True)
    assert again.result()["parent_run_id"] == out["parent_run_id"]
    assert set(task_states(again)["validate"]) == {"Cached"}
    children = _children(MlflowClient(), out["parent_run_id"])
    assert len(children) == 2
    assert np.isfinite([c.data.metrics["test.seeds-test.accuracy"] for c in children]).all()


def test_an_unavailable_pretrained_model_is_a_clear_error(workdir):
    make_validation_data(workdir, n_train=2, n_val=1, n_test=1, n_synthetic=2, n_external=1)
    cfg = tiny_config("validation-offline", tiny=False, vit_model="/nonexistent/vit", regimes=["baseline"])
    with pytest.raises(ValidationError, match="vit model folder /nonexistent/vit not found: set validate.vit_model"):
        validate(workdir, cfg)
