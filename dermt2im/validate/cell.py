"""One cell of a comparison: fine-tune one model on one regime's mixture at one seed, test it on
every test set (``fit_and_test``, no tracking), and record it as a child run of the comparison
(``run_cell``).

The decision threshold is 0.5; nothing is tuned on a test set.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermt2im.core import progress
from dermt2im.core.specs import ValidateConfig
from dermt2im.core.tracking import DatasetRef, Tracker, metric_key
from dermt2im.validate.inputs import ValidationError, ValidationInputs
from dermt2im.validate.metrics import CONFUSION, METRICS, THRESHOLD, binary_metrics
from dermt2im.validate.plan import (
    KIND_CELL,
    TAG_CELL_KEY,
    TAG_KIND,
    Cell,
    ValidationPlan,
)

log = logging.getLogger(__name__)

# Identical on every child run (params and tags), so runs compare column by column in MLflow.
CELL_TAGS = ("model", "regime", "synthetic_ratio", "seed", "setting", "n_real", "n_synthetic",
             "synthetic_share_reached", "synthetic_source")
TEST_METRICS = (*METRICS, "precision", "n", *CONFUSION)
Predictions = dict[str, tuple[tuple[str, int, float], ...]]  # test set -> (key, label, P(malignant))


@dataclass(frozen=True)
class CellResult:
    run_id: str
    model: str
    regime: str
    seed: int
    metrics: dict[str, float]  # test.<set>.<metric>
    predictions: Predictions
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "model": self.model, "regime": self.regime, "seed": self.seed,
                "metrics": self.metrics, "reused": self.reused,
                "predictions": {k: [list(p) for p in v] for k, v in self.predictions.items()}}

    @classmethod
    def from_summary(cls, s: dict[str, Any]) -> "CellResult":
        preds = {k: tuple((str(a), int(b), float(c)) for a, b, c in v) for k, v in s["predictions"].items()}
        return cls(s["run_id"], s["model"], s["regime"], int(s["seed"]), dict(s["metrics"]), preds, bool(s["reused"]))


@dataclass
class CellOutcome:
    """What fitting and testing one cell produced (before any of it is logged)."""

    fit: dict[str, float]
    metrics: dict[str, float]
    predictions: Predictions
    per_set: dict[str, tuple[np.ndarray, np.ndarray, dict[str, float]]]  # set -> (labels, P(malignant), metrics)
    tables: dict[str, pd.DataFrame]  # set -> per-image predictions
    model: Any
    processor: Any
    agreement: pd.DataFrame | None = None  # a baseline's predictions of the synthetic images (agreement)


def fit_and_test(cell: Cell, inputs: ValidationInputs, spec: ValidateConfig, device: Any, batch_size: int,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> CellOutcome:
    """Fine-tune the cell's model on its mixture (early stopping on the real val split) and predict
    every test set."""
    from dermt2im.validate import classify, images, models

    train_df = cell.mixture.frame()
    model, processor = models.build_classifier(cell.model, spec, cell.seed)
    train_x = images.load_images(list(train_df["path"]), processor)
    train_y = images.labels_to_tensor(train_df["label"])
    val_x = images.load_images(list(inputs.real_val["path"]), processor)
    val_y = images.labels_to_tensor(inputs.real_val["label"])
    t0 = time.time()
    fit = classify.fit(model, processor, train_x, train_y, val_x, val_y, spec, cell.seed, device=device,
                       batch_size=batch_size, on_epoch=on_epoch, recipe=spec.recipe(cell.model))
    fit_summary = {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                   "stopped_early": float(fit.stopped_early), "train_seconds": time.time() - t0}
    out = CellOutcome(fit_summary, {}, {}, {}, {}, model, processor)
    amp = classify._amp_dtype(spec, device)
    for name, ts in sorted(inputs.test_sets.items()):
        x = images.load_images(list(ts.rows["path"]), processor)
        y = images.labels_to_tensor(ts.rows["label"]).numpy()
        prob = classify.predict_proba(model, x, processor, batch_size=max(batch_size, 32), device=device,
                                      amp_dtype=amp)
        m = binary_metrics(y, prob)
        out.metrics.update({metric_key("test", name, k): float(m[k]) for k in TEST_METRICS})
        out.predictions[name] = tuple(zip(ts.rows["key"].astype(str), y.astype(int).tolist(), prob.tolist()))
        out.per_set[name] = (y, prob, m)
        out.tables[name] = pd.DataFrame({"key": ts.rows["key"].astype(str), "path": ts.rows["path"], "label": y,
                                         "prob": prob, "pred": (prob >= THRESHOLD).astype(int)})
    if predicts_synthetic(cell, inputs):
        from dermt2im.validate.agreement import predict_synthetic

        out.agreement = predict_synthetic(model, processor, inputs.synthetic, batch_size=max(batch_size, 32),
                                          device=device, amp_dtype=amp)
    return out


def predicts_synthetic(cell: Cell, inputs: ValidationInputs) -> bool:
    """A classifier trained on real images only predicts every usable synthetic image (class agreement)."""
    return not cell.mixture.regime.needs_synthetic and not inputs.synthetic.empty


def share_reached(cell: Cell) -> bool:
    """Whether the cell trains on as many synthetic images as its regime asks for."""
    return cell.mixture.n_synthetic >= cell.mixture.target_synthetic


def describe_cell(cell: Cell) -> str:
    """The child run's description: what the cell trained on, and a shortfall said plainly."""
    m, regime = cell.mixture, cell.mixture.regime
    text = (f"{cell.model} fine-tuned on the {regime.name} mixture ({regime.setting} setting), seed {cell.seed}: "
            f"{m.n_real} real + {m.n_synthetic} synthetic = {len(m.items)} training images, "
            f"{m.actual_ratio:.0%} synthetic.")
    if not share_reached(cell):
        text += (f" **Short of the configured share of {regime.synthetic_ratio:.0%}**: {m.target_synthetic} "
                 f"synthetic images were asked for ({'; '.join(m.notes) or 'too few usable'}).")
    return text


def _cell_tags(plan: ValidationPlan, cell: Cell, key: str) -> dict[str, str]:
    regime = cell.mixture.regime
    return {TAG_KIND: KIND_CELL, TAG_CELL_KEY: key, "model": cell.model, "regime": regime.name,
            "synthetic_ratio": f"{regime.synthetic_ratio:g}", "seed": str(cell.seed), "setting": regime.setting,
            "n_real": str(cell.mixture.n_real), "n_synthetic": str(cell.mixture.n_synthetic),
            "synthetic_share_reached": "yes" if share_reached(cell) else "no",
            "synthetic_source": regime.source_label}


def _cell_params(tags: dict[str, str], cell: Cell, inputs: ValidationInputs, spec: ValidateConfig, device: Any,
                 batch_size: int) -> dict[str, Any]:
    from dermt2im.validate.models import model_name

    mixture = cell.mixture
    return {
        **{k: tags[k] for k in CELL_TAGS}, "model_name": model_name(cell.model, spec), "n_train": len(mixture.items),
        "n_real_available": mixture.n_real_available, "target_synthetic": mixture.target_synthetic,
        "actual_synthetic_ratio": f"{mixture.actual_ratio:.4f}", "n_val": len(inputs.real_val),
        **_recipe_params(spec.recipe(cell.model)), "batch_size": batch_size,
        "early_stopping_patience": spec.early_stopping_patience, "image_size": spec.image_size,
        "mixed_precision": spec.mixed_precision if device.type == "cuda" else "no", "device": device.type,
        "threshold": THRESHOLD, "test_sets": ",".join(sorted(inputs.test_sets)),
        "mixture_digest": mixture.digest()[:16], "mixture_notes": "; ".join(mixture.notes) or "none",
    }


def _recipe_params(recipe: Any) -> dict[str, Any]:
    aug = recipe.augmentation
    return {"epochs": recipe.epochs, "learning_rate": recipe.learning_rate, "warmup_epochs": recipe.warmup_epochs,
            "schedule": recipe.schedule, "weight_decay": recipe.weight_decay,
            "augmentation": f"flips={aug.flips}, quarter_turns={aug.quarter_turns}, colour_jitter={aug.colour_jitter:g}, "
                            f"crop_scale={aug.crop_scale:g}"}


def _datasets(cell: Cell, inputs: ValidationInputs, seeds_manifest: str) -> list[DatasetRef]:
    regime = cell.mixture.regime
    refs = [DatasetRef(cell.mixture.frame(), seeds_manifest, f"train-{regime.name}-seed{cell.seed}", "training")]
    if len(inputs.real_val):
        refs.append(DatasetRef(inputs.real_val[["path", "label", "lesion_id"]], seeds_manifest, "val", "validation"))
    for name, ts in sorted(inputs.test_sets.items()):
        refs.append(DatasetRef(ts.rows[["path", "label", "lesion_id"]], ts.manifest, f"test-{name}", "test"))
    return refs


def _log_outcome(tracker: Tracker, run: str, cell: Cell, outcome: CellOutcome, log_model: bool) -> None:
    from dermt2im.validate.figures import confusion_figure, roc_figure
    from dermt2im.validate.models import save_model

    with tempfile.TemporaryDirectory() as tmp:
        pred_dir = Path(tmp) / "predictions"
        pred_dir.mkdir()
        for name, (y, prob, m) in outcome.per_set.items():
            outcome.tables[name].to_csv(pred_dir / f"{name}.csv", index=False)
            # At the top level, the same names in every child run: MLflow's compare view shows
            # artifacts that the selected runs have in common, side by side.
            tracker.log_figure(run, confusion_figure(m, title=f"{cell.name} on {name}"), f"confusion_{name}.png")
            tracker.log_figure(run, roc_figure(y, prob, title=f"{cell.name} on {name}"), f"roc_{name}.png")
        tracker.log_folder(run, pred_dir, "predictions")
        if outcome.agreement is not None:
            from dermt2im.validate.agreement import ARTIFACT, FILE

            agree_dir = Path(tmp) / ARTIFACT
            agree_dir.mkdir()
            outcome.agreement.to_csv(agree_dir / FILE, index=False)
            tracker.log_folder(run, agree_dir, ARTIFACT)
        if log_model:
            model_dir = save_model(outcome.model.cpu(), outcome.processor, Path(tmp) / "model")
            tracker.log_folder(run, model_dir, "model")
    tracker.log_metrics(run, {**outcome.fit, **outcome.metrics})


def run_cell(tracker: Tracker, plan: ValidationPlan, cell: Cell, key: str, spec: ValidateConfig, device: Any, *,
             seeds_manifest: str, log_model: bool = True, batch_size: int | None = None) -> CellResult:
    """Train and test one (model, regime, seed) in a child run of ``plan.parent_run_id``."""
    import torch

    from dermt2im.validate.models import ModelUnavailable

    tags = _cell_tags(plan, cell, key)
    run = tracker.start(cell.name, tags=tags, parent=plan.parent_run_id)
    bs = batch_size or spec.batch_size
    try:
        tracker.set_description(run, describe_cell(cell))
        if not share_reached(cell):
            log.warning("%s: %s", cell.name, describe_cell(cell))
        tracker.log_params(run, _cell_params(tags, cell, plan.inputs, spec, device, bs))
        tracker.log_datasets(run, _datasets(cell, plan.inputs, seeds_manifest))
        with progress.task(f"fit {cell.model} {cell.regime} seed {cell.seed}", total=spec.recipe(cell.model).epochs,
                           unit="epochs") as bar:
            def on_epoch(epoch: int, row: dict[str, float]) -> None:
                tracker.log_metrics(run, row, step=epoch)
                bar.update(epoch, note=", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("val_")))

            outcome = fit_and_test(cell, plan.inputs, spec, device, bs, on_epoch=on_epoch)
        _log_outcome(tracker, run, cell, outcome, log_model)
        tracker.finish(run)
    except BaseException as err:
        try:
            tracker.set_tags(run, {"dermt2im.error": f"{type(err).__name__}: {err}"[:5000]})
            tracker.finish(run, "FAILED")
        except Exception:  # noqa: BLE001 - never hide the original error behind a logging one
            log.exception("could not mark run %s as failed", run)
        if isinstance(err, ModelUnavailable):
            raise ValidationError(str(err)) from err
        raise
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return CellResult(run, cell.model, cell.regime, cell.seed, outcome.metrics, outcome.predictions)
