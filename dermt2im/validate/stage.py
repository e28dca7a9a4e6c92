"""Validation of the synthetic data: {ViT, MobileNetV2} x regimes x seeds, tracked in MLflow.

The flow of one comparison::

    plan = prepare(workdir, cfg)           # inputs, leakage check, mixtures, the MLflow parent run
    results = [run_cell(workdir, cfg, plan, cell) for cell in plan.cells]   # one child run each
    report = finish(workdir, cfg, plan, results)   # McNemar, Table IV, segmentation check

``validate`` does all three; the Prefect flow (flows/validate.py) runs each cell as a cached task.

- Training data: the seeds' ``train`` split (real) and usable synthetic images, mixed per regime
  (``dermt2im.validate.regimes``). Early stopping uses the seeds' ``val`` split (real images only).
- Test sets: every named real test set and the seeds' own ``test`` split ("seeds-test"). None of
  them is used for training or model selection, and no ``lesion_id`` (nor the same image) may be
  both in a test set and in the train / val data: that is a ``ValidationError`` naming the lesion.
- The decision threshold is 0.5; nothing is tuned on a test set.
- A comparison is identified by a content key (validate config, manifest digests, code). Running
  the same comparison again resumes its parent run: cells already finished are read back from
  MLflow instead of being trained again (``resume=False`` starts a new parent run).
- No usable synthetic images: regimes that need them are skipped (reason logged on the parent run
  and shown in the report) and the baseline still runs; if nothing is left to run, a
  ``ValidationError`` says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.validate import regimes as rg
from dermt2im.core import storage
from dermt2im.core.config import LABELS, FactoryConfig
from dermt2im.core.manifest import SEEDS, SYNTHETIC, ManifestError, digest, manifest_exists, read_manifest
from dermt2im.validate.metrics import CONFUSION, METRICS, THRESHOLD, binary_metrics, mcnemar_from_predictions
from dermt2im.core.tracking import metric_key, tracking_client
from dermt2im.core.workdir import Workdir

log = logging.getLogger(__name__)

SEEDS_TEST = "seeds-test"
KIND_COMPARISON = "comparison"
KIND_CELL = "cell"
TAG_KIND = "dermt2im.kind"
TAG_KEY = "dermt2im.comparison_key"
TAG_CELL_KEY = "dermt2im.cell_key"
TAG_SKIPPED = "dermt2im.skipped"
# Identical on every child run (params and tags), so runs compare column by column in MLflow.
CELL_TAGS = ("model", "regime", "synthetic_ratio", "seed", "setting", "n_real", "n_synthetic")
TEST_METRICS = (*METRICS, "precision", "n", *CONFUSION)


class ValidationError(ValueError):
    """The validation cannot run as asked; the message says why and what to do."""


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TestSet:
    name: str
    manifest: str
    rows: pd.DataFrame  # path, label, lesion_id, sample_id, key
    digest: str


@dataclass(frozen=True, eq=False)
class ValidationInputs:
    real_train: pd.DataFrame
    real_val: pd.DataFrame
    synthetic: pd.DataFrame  # usable rows only (path, label, source)
    synthetic_note: str
    test_sets: dict[str, TestSet]
    seeds_digest: str
    synthetic_digest: str


def _with_keys(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["key"] = df["sample_id"].where(df["sample_id"].notna(), df["path"]).astype(str)
    return df


def _test_rows(path: str | Path) -> pd.DataFrame:
    try:
        df = read_manifest(path, SEEDS)
    except ManifestError as err:
        raise ValidationError(f"test set manifest {path}: {err}") from err
    df = df[(df["status"] == "accepted") & df["label"].isin(LABELS)]
    rows = pd.DataFrame(
        {
            "path": df["processed_path"].where(df["processed_path"].notna(), df["source_path"]).astype(str).values,
            "label": df["label"].values,
            "lesion_id": df["lesion_id"].values,
            "sample_id": df["sample_id"].values,
        }
    )
    return _with_keys(rows.drop_duplicates("path").reset_index(drop=True))


def _safe_name(name: str) -> str:
    return metric_key(name)


def load_inputs(workdir: Workdir, cfg: FactoryConfig,
                test_sets: dict[str, str | Path] | None = None) -> ValidationInputs:
    """``test_sets``: name -> test-set manifest (a local path or URL); None: every manifest in the
    workdir's test_sets folder plus the seeds' own test split."""
    if not manifest_exists(workdir.seeds_manifest):
        raise ValidationError(f"no seeds manifest at {workdir.seeds_manifest}: run `dermt2im ingest` first")
    seeds = read_manifest(workdir.seeds_manifest, SEEDS)
    real_train = _with_keys(rg.real_rows(seeds, "train"))
    real_val = _with_keys(rg.real_rows(seeds, "val"))
    if real_train.empty:
        raise ValidationError("the seeds manifest has no accepted, labelled images in the 'train' split")
    synthetic_all = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    synthetic = rg.usable_synthetic(synthetic_all)
    if not synthetic.empty:  # relative paths are relative to the workdir
        synthetic["path"] = [p if storage.is_remote(p) or Path(p).is_absolute() else str(workdir.root / p)
                           for p in synthetic["path"]]  # image-store URLs as they are

    sets: dict[str, TestSet] = {}
    explicit = test_sets is not None
    if test_sets is None:
        test_sets = {str(p).rsplit("/", 1)[-1].removesuffix(".parquet"): p
                     for p in storage.files_in(workdir.test_sets_folder, ".parquet")}
    for name, path in test_sets.items():
        path = path if storage.is_remote(path) else Path(path)
        safe = _safe_name(name)
        if safe in sets:
            raise ValidationError(f"two test sets map to the same name {safe!r}")
        if not manifest_exists(path):
            raise ValidationError(f"test set {name!r}: manifest {path} not found")
        rows = _test_rows(path)
        if rows.empty:
            if explicit:
                raise ValidationError(f"test set {name!r} ({path}) has no accepted, labelled images")
            log.warning("test set %s (%s) has no accepted, labelled images: skipped", name, path)
            continue
        sets[safe] = TestSet(safe, str(path), rows, digest(path, SEEDS))
    if not explicit:
        own = _with_keys(rg.real_rows(seeds, "test"))
        if not own.empty and SEEDS_TEST not in sets:
            own_digest = hashlib.sha256(pd.util.hash_pandas_object(own.astype(str), index=False).values.tobytes()).hexdigest()
            sets[SEEDS_TEST] = TestSet(SEEDS_TEST, str(workdir.seeds_manifest), own.drop(columns="source"), own_digest)
    if not sets:
        raise ValidationError(
            "no test set: ingest one (`dermt2im validate --test-set NAME=SOURCE`) or keep a 'test' split in the seeds"
        )
    syn_digest = digest(workdir.synthetic_manifest, SYNTHETIC) if manifest_exists(workdir.synthetic_manifest) else "none"
    inputs = ValidationInputs(
        real_train=real_train,
        real_val=real_val,
        synthetic=synthetic,
        synthetic_note=rg.synthetic_summary(synthetic_all),
        test_sets=sets,
        seeds_digest=digest(workdir.seeds_manifest, SEEDS),
        synthetic_digest=syn_digest,
    )
    check_no_leakage(inputs)
    _check_files(inputs)
    return inputs


def check_no_leakage(inputs: ValidationInputs) -> None:
    """No lesion (``lesion_id``) and no image (``sample_id``) may be both trained / selected on and
    tested on. Raises ``ValidationError`` naming the first offending lesion."""
    fit_rows = pd.concat([inputs.real_train.assign(split="train"), inputs.real_val.assign(split="val")])
    for column, what in (("lesion_id", "lesion"), ("sample_id", "image")):
        seen = fit_rows.dropna(subset=[column])
        where = dict(zip(seen[column].astype(str), seen["split"]))
        for ts in inputs.test_sets.values():
            ids = ts.rows[column].dropna().astype(str)
            shared = sorted(set(ids) & set(where))
            if shared:
                first = shared[0]
                raise ValidationError(
                    f"{what} {first!r} is in the seeds' {where[first]!r} split and in test set {ts.name!r} "
                    f"({len(shared)} shared {what}s in all): a test set must never contain training data. "
                    "Remove these from the test set or re-split the seeds by lesion."
                )


def _check_files(inputs: ValidationInputs) -> None:
    paths = list(inputs.real_train["path"]) + list(inputs.real_val["path"]) + list(inputs.synthetic["path"])
    for ts in inputs.test_sets.values():
        paths += list(ts.rows["path"])
    missing = [p for p in paths if not storage.is_file(p)]
    if missing:
        raise ValidationError(
            f"{len(missing)} image file(s) named in the manifests are missing, e.g. {missing[:3]}; "
            "re-run preprocess (seeds / test sets) or generate (synthetic)"
        )


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    model: str  # vit | mobilenet_v2
    mixture: rg.Mixture

    @property
    def regime(self) -> str:
        return self.mixture.regime.name

    @property
    def seed(self) -> int:
        return self.mixture.seed

    @property
    def name(self) -> str:
        return f"{self.model}-{self.regime}-seed{self.seed}"


@dataclass(frozen=True, eq=False)
class ValidationPlan:
    parent_run_id: str
    experiment: str
    experiment_id: str
    comparison_key: str
    inputs: ValidationInputs
    cells: tuple[Cell, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    resumed: bool = False


def code_digest() -> str:
    """Hash of the modules that decide what a cell computes: changing them invalidates old results."""
    import dermt2im.validate.classify
    import dermt2im.validate.metrics
    import dermt2im.validate.regimes

    h = hashlib.sha256()
    for mod in (dermt2im.validate.classify, dermt2im.validate.metrics, dermt2im.validate.regimes):
        h.update(Path(mod.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def _frame_digest(df: pd.DataFrame, cols: list[str]) -> str:
    d = df[cols].astype(str).sort_values(cols).reset_index(drop=True)
    return hashlib.sha256(pd.util.hash_pandas_object(d, index=False).values.tobytes()).hexdigest()


def plan_mixtures(inputs: ValidationInputs, cfg: FactoryConfig) -> tuple[list[rg.Mixture], dict[str, str]]:
    """Every (regime, seed) mixture to train on, and the regimes skipped with the reason."""
    try:
        specs = rg.expand_regimes(cfg.validation)
    except rg.RegimeError as err:
        raise ValidationError(str(err)) from err
    if not specs:
        raise ValidationError("validate.regimes is empty and no sweep is configured")
    mixtures: list[rg.Mixture] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        if spec.needs_synthetic and inputs.synthetic.empty:
            skipped[spec.name] = f"no accepted synthetic images ({inputs.synthetic_note})"
            continue
        try:
            for seed in cfg.validation.seeds:
                mixtures.append(rg.build_mixture(inputs.real_train, inputs.synthetic, spec, seed))
        except rg.RegimeError as err:
            mixtures = [m for m in mixtures if m.regime.name != spec.name]
            skipped[spec.name] = str(err)
    for name, why in skipped.items():
        log.warning("regime %s skipped: %s", name, why)
    if not mixtures:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise ValidationError(
            f"nothing to validate: every requested regime was skipped ({reasons}). Run generate and the "
            "quality gate to get accepted synthetic images, or include 'baseline' in validate.regimes."
        )
    return mixtures, skipped


def _content_key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def comparison_key(cfg: FactoryConfig, inputs: ValidationInputs) -> str:
    return _content_key(
        "comparison",
        cfg.validation.model_dump(mode="json", exclude={"test_sets", "segmentation_samples", "sam_model"}),
        _frame_digest(inputs.real_train, ["path", "label", "key"]),
        _frame_digest(inputs.real_val, ["path", "label", "key"]) if len(inputs.real_val) else "none",
        _frame_digest(inputs.synthetic, ["path", "label", "sha256"]) if len(inputs.synthetic) else "none",
        {name: ts.digest for name, ts in sorted(inputs.test_sets.items())},
        code_digest(),
    )


def cell_key(cfg: FactoryConfig, inputs: ValidationInputs, cell: Cell) -> str:
    """Content key of one cell: training rows, validation rows, test sets, config, model, regime, seed."""
    from dermt2im.validate.classify import model_name

    synthetic_paths = {path for path, _label, source in cell.mixture.items if source == rg.SYNTHETIC}
    used = inputs.synthetic[inputs.synthetic["path"].isin(synthetic_paths)] if synthetic_paths else None
    return _content_key(
        "cell",
        cell.mixture.digest(),
        _frame_digest(used, ["path", "sha256"]) if used is not None and len(used) else "no synthetic",
        _frame_digest(inputs.real_val, ["path", "label"]) if len(inputs.real_val) else "none",
        {name: ts.digest for name, ts in sorted(inputs.test_sets.items())},
        cfg.digest("validate"),
        cell.model,
        model_name(cell.model, cfg.validation),
        cell.regime,
        cell.seed,
        code_digest(),
    )


def _find_comparison(client, exp_id: str, key: str):
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{TAG_KIND}` = '{KIND_COMPARISON}' and tags.`{TAG_KEY}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def prepare(
    workdir: Workdir, cfg: FactoryConfig, test_sets: dict[str, str | Path] | None = None, *, resume: bool = True
) -> ValidationPlan:
    """Load and check the inputs, build the mixtures and open (or resume) the parent run."""
    vcfg = cfg.validation
    if not vcfg.models:
        raise ValidationError("validate.models is empty")
    if not vcfg.seeds:
        raise ValidationError("validate.seeds is empty")
    inputs = load_inputs(workdir, cfg, test_sets)
    mixtures, skipped = plan_mixtures(inputs, cfg)
    cells = tuple(Cell(model, m) for model in vcfg.models for m in mixtures)
    client, exp_id = tracking_client(workdir, cfg.tracking)
    key = comparison_key(cfg, inputs)
    existing = _find_comparison(client, exp_id, key) if resume else None
    if existing is not None:
        parent_id = existing.info.run_id
        client.update_run(parent_id, status="RUNNING")
        log.info("resuming comparison %s", parent_id)
    else:
        parent = client.create_run(
            exp_id,
            tags={TAG_KIND: KIND_COMPARISON, TAG_KEY: key},
            run_name=f"comparison-{time.strftime('%Y%m%d-%H%M%S')}",
        )
        parent_id = parent.info.run_id
        regimes_run = sorted({(m.regime.name, m.regime.setting, m.regime.synthetic_ratio) for m in mixtures})
        _params(
            client,
            parent_id,
            {
                "models": ",".join(vcfg.models),
                "regimes": ",".join(r[0] for r in regimes_run),
                "seeds": ",".join(map(str, vcfg.seeds)),
                "test_sets": ",".join(sorted(inputs.test_sets)),
                "synthetic_ratio": vcfg.synthetic_ratio,
                "tiny": vcfg.tiny,
                "epochs": vcfg.epochs,
                "threshold": THRESHOLD,
                "n_real_train": len(inputs.real_train),
                "n_real_val": len(inputs.real_val),
                "n_synthetic_usable": len(inputs.synthetic),
                "validate_config_digest": cfg.digest("validate"),
            },
        )
        client.log_dict(parent_id, vcfg.model_dump(mode="json"), "config/validate.json")
        client.log_dict(
            parent_id,
            {"regimes": [{"name": n, "setting": s, "synthetic_ratio": r} for n, s, r in regimes_run],
             "skipped": skipped, "synthetic": inputs.synthetic_note},
            "config/regimes.json",
        )
    client.set_tag(parent_id, TAG_SKIPPED, json.dumps(skipped, sort_keys=True))
    return ValidationPlan(parent_id, cfg.tracking.experiment, exp_id, key, inputs, cells, skipped, existing is not None)


# --- one cell ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellResult:
    run_id: str
    model: str
    regime: str
    seed: int
    metrics: dict[str, float]  # test.<set>.<metric>
    predictions: dict[str, tuple[tuple[str, int, float], ...]]  # set -> (key, label, P(malignant))
    reused: bool = False


def _dataset_input(df: pd.DataFrame, source: str, name: str, context: str):
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = mlflow.data.from_pandas(df.reset_index(drop=True), source=source, targets="label", name=name)
        return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


def _reuse(client, plan: ValidationPlan, cell: Cell, key: str) -> CellResult | None:
    runs = client.search_runs(
        [plan.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{plan.parent_run_id}' and tags.`{TAG_CELL_KEY}` = '{key}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    predictions = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run.info.run_id, "predictions", tmp))
        except Exception:  # noqa: BLE001 - an incomplete old run is simply trained again
            return None
        for name in plan.inputs.test_sets:
            f = local / f"{name}.csv"
            if not f.is_file():
                return None
            df = pd.read_csv(f, dtype={"key": str})
            predictions[name] = tuple(zip(df["key"], df["label"].astype(int), df["prob"].astype(float)))
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test.")}
    log.info("cell %s: reusing finished run %s", cell.name, run.info.run_id)
    return CellResult(run.info.run_id, cell.model, cell.regime, cell.seed, metrics, predictions, reused=True)


def run_cell(
    workdir: Workdir,
    cfg: FactoryConfig,
    plan: ValidationPlan,
    cell: Cell,
    *,
    log_model: bool = True,
    batch_size: int | None = None,
    reuse: bool = True,
) -> CellResult:
    """Train one (model, regime, seed) in a child run of ``plan.parent_run_id`` and test it on every
    test set. With ``reuse``, a finished child run of the same cell under the same parent is read
    back instead of training again."""
    import torch

    from dermt2im.validate import classify
    from dermt2im.validate.table import confusion_figure, roc_figure

    vcfg = cfg.validation
    inputs = plan.inputs
    client, _ = tracking_client(workdir, cfg.tracking)
    key = cell_key(cfg, inputs, cell)
    if reuse:
        found = _reuse(client, plan, cell, key)
        if found is not None:
            return found

    mixture = cell.mixture
    spec = mixture.regime
    tags = {
        "mlflow.parentRunId": plan.parent_run_id,
        TAG_KIND: KIND_CELL,
        TAG_CELL_KEY: key,
        "model": cell.model,
        "regime": spec.name,
        "synthetic_ratio": f"{spec.synthetic_ratio:g}",
        "seed": str(cell.seed),
        "setting": spec.setting,
        "n_real": str(mixture.n_real),
        "n_synthetic": str(mixture.n_synthetic),
    }
    run = client.create_run(plan.experiment_id, tags=tags, run_name=cell.name)
    run_id = run.info.run_id
    try:
        device = classify.resolve_device(vcfg)
        bs = batch_size or vcfg.batch_size
        _params(
            client,
            run_id,
            {
                **{k: tags[k] for k in CELL_TAGS},
                "model_name": classify.model_name(cell.model, vcfg),
                "n_train": len(mixture.items),
                "n_real_available": mixture.n_real_available,
                "target_synthetic": mixture.target_synthetic,
                "actual_synthetic_ratio": f"{mixture.actual_ratio:.4f}",
                "n_val": len(inputs.real_val),
                "epochs": vcfg.epochs,
                "batch_size": bs,
                "learning_rate": vcfg.learning_rate,
                "early_stopping_patience": vcfg.early_stopping_patience,
                "image_size": vcfg.image_size,
                "mixed_precision": vcfg.mixed_precision if device.type == "cuda" else "no",
                "device": device.type,
                "threshold": THRESHOLD,
                "test_sets": ",".join(sorted(inputs.test_sets)),
                "mixture_digest": mixture.digest()[:16],
                "mixture_notes": "; ".join(mixture.notes) or "none",
            },
        )
        train_df = mixture.frame()
        datasets = [
            _dataset_input(train_df, str(workdir.seeds_manifest), f"train-{spec.name}-seed{cell.seed}", "training"),
        ]
        if len(inputs.real_val):
            datasets.append(_dataset_input(inputs.real_val[["path", "label", "lesion_id"]], str(workdir.seeds_manifest), "val", "validation"))
        for name, ts in sorted(inputs.test_sets.items()):
            datasets.append(_dataset_input(ts.rows[["path", "label", "lesion_id"]], ts.manifest, f"test-{name}", "test"))
        client.log_inputs(run_id, datasets=datasets)

        model, processor = classify.build_classifier(cell.model, vcfg, cell.seed)
        train_x = classify.load_images(list(train_df["path"]), processor)
        train_y = classify.labels_to_tensor(train_df["label"])
        val_x = classify.load_images(list(inputs.real_val["path"]), processor)
        val_y = classify.labels_to_tensor(inputs.real_val["label"])

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in row.items()
                                               if not math.isnan(float(v))])

        t0 = time.time()
        fit = classify.fit(model, processor, train_x, train_y, val_x, val_y, vcfg, cell.seed,
                           device=device, batch_size=bs, on_epoch=on_epoch)
        summary = {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                   "stopped_early": float(fit.stopped_early), "train_seconds": time.time() - t0}

        metrics: dict[str, float] = {}
        predictions: dict[str, tuple[tuple[str, int, float], ...]] = {}
        amp = classify._amp_dtype(vcfg, device)
        with tempfile.TemporaryDirectory() as tmp:
            pred_dir = Path(tmp) / "predictions"
            pred_dir.mkdir()
            for name, ts in sorted(inputs.test_sets.items()):
                x = classify.load_images(list(ts.rows["path"]), processor)
                y = classify.labels_to_tensor(ts.rows["label"]).numpy()
                prob = classify.predict_proba(model, x, processor, batch_size=max(bs, 32), device=device, amp_dtype=amp)
                m = binary_metrics(y, prob)
                for k in TEST_METRICS:
                    metrics[metric_key("test", name, k)] = float(m[k])
                predictions[name] = tuple(zip(ts.rows["key"].astype(str), y.astype(int).tolist(), prob.tolist()))
                pd.DataFrame({"key": ts.rows["key"].astype(str), "path": ts.rows["path"], "label": y,
                              "prob": prob, "pred": (prob >= THRESHOLD).astype(int)}).to_csv(
                    pred_dir / f"{name}.csv", index=False)
                client.log_figure(run_id, confusion_figure(m, title=f"{cell.name} on {name}"),
                                  f"figures/confusion_{name}.png")
                client.log_figure(run_id, roc_figure(y, prob, title=f"{cell.name} on {name}"),
                                  f"figures/roc_{name}.png")
            client.log_artifacts(run_id, str(pred_dir), "predictions")
            if log_model:
                model_dir = classify.save_model(model.cpu(), processor, Path(tmp) / "model")
                client.log_artifacts(run_id, str(model_dir), "model")
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        all_metrics = {**summary, **metrics}
        items = [Metric(k, float(v), now, 0) for k, v in all_metrics.items() if not math.isnan(float(v))]
        for i in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[i : i + 500])
        client.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        try:
            client.set_tag(run_id, "dermt2im.error", f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - never hide the original error behind a logging one
            log.exception("could not mark run %s as failed", run_id)
        if isinstance(err, classify.ModelUnavailable):
            raise ValidationError(str(err)) from err
        raise
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return CellResult(run_id, cell.model, cell.regime, cell.seed, metrics, predictions)


# --- closing a comparison ---------------------------------------------------------------------


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


@dataclass(frozen=True)
class ValidationReport:
    parent_run_id: str
    experiment: str
    runs: int
    table_path: Path | None
    skipped: dict[str, str] = field(default_factory=dict)
    verdict: str = ""
    reused: int = 0
    segmentation: str = ""

    def summary(self) -> str:
        lines = [f"comparison run {self.parent_run_id} in MLflow experiment {self.experiment!r}: "
                 f"{self.runs} child runs ({self.reused} reused from an earlier identical run)"]
        for name, why in sorted(self.skipped.items()):
            lines.append(f"skipped regime {name}: {why}")
        if self.table_path is not None:
            lines.append(f"Table IV: {self.table_path}")
        if self.verdict:
            lines.append(self.verdict)
        if self.segmentation:
            lines.append(self.segmentation)
        return "\n".join(lines)


def finish(
    workdir: Workdir,
    cfg: FactoryConfig,
    plan: ValidationPlan,
    results: list[CellResult],
    *,
    build_table: bool = True,
    segmentation: bool = True,
) -> ValidationReport:
    """Log the McNemar tests on the parent run, close it and (optionally) build Table IV."""
    from mlflow.entities import Metric

    client, _ = tracking_client(workdir, cfg.tracking)
    pid = plan.parent_run_id
    table = mcnemar_tests(results)
    now = int(time.time() * 1000)
    items = []
    for r in table.itertuples(index=False):
        items.append(Metric(mcnemar_metric(r.model, r.regime, r.test_set, r.seed), float(r.p_value), now, 0))
        items.append(Metric(mcnemar_metric(r.model, r.regime, r.test_set, r.seed, "b"), float(r.baseline_only_correct), now, 0))
        items.append(Metric(mcnemar_metric(r.model, r.regime, r.test_set, r.seed, "c"), float(r.regime_only_correct), now, 0))
    for i in range(0, len(items), 500):
        client.log_batch(pid, metrics=items[i : i + 500])
    if not table.empty:
        client.log_text(pid, table.to_csv(index=False), "mcnemar.csv")
    client.log_batch(pid, metrics=[Metric("cells", float(len(results)), now, 0)])
    client.set_terminated(pid, "FINISHED")

    table_path, verdict = None, ""
    if build_table:
        from dermt2im.validate.table import build_report

        paths = build_report(workdir, cfg, parent_run_id=pid)
        table_path = paths.get("table_md")
        verdict_file = paths.get("verdict")
        verdict = verdict_file.read_text().strip() if verdict_file and verdict_file.is_file() else ""
    seg = ""
    if segmentation and cfg.validation.segmentation_samples > 0:
        try:
            from dermt2im.validate.segmentation import segmentation_check

            seg_report = segmentation_check(workdir, cfg)
            seg = seg_report.summary()
            for p in seg_report.paths.values():
                client.log_artifact(pid, str(p), "segmentation")
        except Exception as err:  # noqa: BLE001 - the segmentation check never sinks a validation
            log.warning("segmentation check failed: %s", err)
            seg = f"segmentation check failed: {err}"
    return ValidationReport(pid, plan.experiment, len(results), table_path, dict(plan.skipped), verdict,
                            sum(r.reused for r in results), seg)


def validate(
    workdir: Workdir,
    cfg: FactoryConfig,
    *,
    test_sets: dict[str, str | Path] | None = None,
    log_model: bool = True,
    resume: bool = True,
    segmentation: bool = True,
) -> ValidationReport:
    """Fine-tune every (model, regime, seed), test on every test set, log it all to MLflow, and
    write Table IV / Fig. 10 (and the segmentation check) under W/reports."""
    plan = prepare(workdir, cfg, test_sets, resume=resume)
    results = []
    for i, cell in enumerate(plan.cells, 1):
        log.info("cell %d/%d: %s", i, len(plan.cells), cell.name)
        results.append(run_cell(workdir, cfg, plan, cell, log_model=log_model))
    return finish(workdir, cfg, plan, results, segmentation=segmentation)
