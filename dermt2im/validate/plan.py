"""A comparison, planned: its cells (model x regime x seed, each with its training mixture) and its
content key (``plan_comparison``, from the manifests alone: no tracking store is opened), then its
MLflow parent run (``open_parent_run``: resumed when an identical comparison ran before, so that
its cells go on under the same parent)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from dermt2im.core import identity
from dermt2im.core.specs import ValidateConfig
from dermt2im.core.tracking import Tracker, metric_key
from dermt2im.core.workdir import Workdir
from dermt2im.validate import regimes as rg
from dermt2im.validate.inputs import ValidationError, ValidationInputs, load_inputs
from dermt2im.validate.metrics import THRESHOLD

log = logging.getLogger(__name__)
FLAG_NAMES = ("ruler", "ink", "frame", "hair", "text")  # the shortcut audit's (dermt2im.quality.shortcuts)

KIND_COMPARISON = "comparison"
KIND_CELL = "cell"
TAG_KIND = "dermt2im.kind"
TAG_KEY = "dermt2im.comparison_key"
TAG_CELL_KEY = "dermt2im.cell_key"
TAG_SKIPPED = "dermt2im.skipped"
TAG_DESCRIPTION = "dermt2im.description"


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
class Comparison:
    """What a comparison trains and tests, decided from the manifests alone."""

    comparison_key: str
    inputs: ValidationInputs
    cells: tuple[Cell, ...]
    mixtures: tuple[rg.Mixture, ...]
    skipped: dict[str, str] = field(default_factory=dict)


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
    """The validation's code identity (``dermt2im/validate/`` and every project module it imports),
    read from the files: importing them would load torch."""
    return identity.code_digest(__name__)


def plan_mixtures(inputs: ValidationInputs, spec: ValidateConfig) -> tuple[list[rg.Mixture], dict[str, str]]:
    """Every (regime, seed) mixture to train on, and the regimes skipped with the reason."""
    try:
        specs = rg.expand_regimes(spec)
    except rg.RegimeError as err:
        raise ValidationError(str(err)) from err
    if not specs:
        raise ValidationError("validate.regimes is empty and no sweep is configured")
    unknown = sorted({r.synthetic_source for r in specs if r.synthetic_source} - set(inputs.synthetic_sources))
    if unknown:
        raise ValidationError(
            f"synthetic source(s) {', '.join(map(repr, unknown))} (validate.synthetic_sources or a regime's @NAME) "
            f"are not in the synthetic manifest, which holds: {', '.join(inputs.synthetic_sources) or 'nothing'}; "
            "import a set with `dermt2im import-synthetic SOURCE --name NAME`")
    mixtures: list[rg.Mixture] = []
    skipped: dict[str, str] = {}
    for regime in specs:
        if regime.needs_synthetic and inputs.synthetic.empty:
            skipped[regime.name] = f"no accepted synthetic images ({inputs.synthetic_note})"
            continue
        try:
            for seed in spec.seeds:
                mixtures.append(rg.build_mixture(inputs.real_train, inputs.synthetic, regime, seed))
        except rg.RegimeError as err:
            mixtures = [m for m in mixtures if m.regime.name != regime.name]
            skipped[regime.name] = str(err)
    for name, why in skipped.items():
        log.warning("regime %s skipped: %s", name, why)
    if not mixtures:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise ValidationError(
            f"nothing to validate: every requested regime was skipped ({reasons}). Run generate and the "
            "quality gate to get accepted synthetic images, or include 'baseline' in validate.regimes."
        )
    return mixtures, skipped


def comparison_key(spec: ValidateConfig, inputs: ValidationInputs) -> str:
    return identity.content_key(
        "comparison",
        spec.model_dump(mode="json", exclude={"test_sets", "segmentation_samples", "sam_model"}),
        identity.frame_digest(inputs.real_train, ["path", "label", "key"]),
        identity.frame_digest(inputs.real_val, ["path", "label", "key"]) if len(inputs.real_val) else "none",
        identity.frame_digest(inputs.synthetic, ["path", "label", "sha256", "synthetic_source"])
        if len(inputs.synthetic) else "none",
        {name: ts.digest for name, ts in sorted(inputs.test_sets.items())},
        code_digest(),
    )


def cell_key(spec: ValidateConfig, inputs: ValidationInputs, cell: Cell, comparison: str = "", store: str = "") -> str:
    """Content key of one cell: training rows, validation rows, test sets, spec, model, regime, seed,
    code, and the comparison it belongs to and the tracking store its runs go to (a cell is recorded
    as a child run of its comparison's parent run there)."""
    from dermt2im.validate.models import model_name

    synthetic_paths = {path for path, _label, source in cell.mixture.items if source == rg.SYNTHETIC}
    used = inputs.synthetic[inputs.synthetic["path"].isin(synthetic_paths)] if synthetic_paths else None
    if not cell.mixture.regime.needs_synthetic and len(inputs.synthetic):
        used = inputs.synthetic  # a real-only cell predicts every synthetic image (class agreement)
    return identity.content_key(
        "cell",
        cell.mixture.digest(),
        identity.frame_digest(used, ["path", "sha256"]) if used is not None and len(used) else "no synthetic",
        identity.frame_digest(inputs.real_val, ["path", "label"]) if len(inputs.real_val) else "none",
        {name: ts.digest for name, ts in sorted(inputs.test_sets.items())},
        identity.spec_digest(spec),
        cell.model,
        model_name(cell.model, spec),
        cell.regime,
        cell.seed,
        code_digest(),
        comparison,
        store,
    )


def comparison_description(spec: ValidateConfig, inputs: ValidationInputs, regimes_run: list[tuple[str, str, float]],
                           skipped: dict[str, str]) -> str:
    """What a comparison compares, in words (the parent run's description in MLflow)."""
    regimes = ", ".join(f"{name} ({ratio:.0%} synthetic, {setting})" for name, setting, ratio in regimes_run)
    text = (f"Real-only (baseline) vs synthetic-augmented training of {' and '.join(spec.models)} for benign / "
            f"malignant classification. Regimes: {regimes}; seeds {', '.join(map(str, spec.seeds))}; "
            f"{len(inputs.real_train)} real training images, {len(inputs.real_val)} for validation, "
            f"{len(inputs.synthetic)} usable synthetic images; tested on {', '.join(sorted(inputs.test_sets))}. "
            "One child run per (model, regime, seed); Table IV under report/.")
    if skipped:
        text += " Skipped: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + "."
    return text


def _open_parent(tracker: Tracker, spec: ValidateConfig, inputs: ValidationInputs, mixtures: list[rg.Mixture],
                 skipped: dict[str, str], key: str, resume: bool) -> tuple[str, bool]:
    """The comparison's parent run: the newest with this key (reopened) when ``resume``, else a new one."""
    found = tracker.runs(f"tags.`{TAG_KIND}` = '{KIND_COMPARISON}' and tags.`{TAG_KEY}` = '{key}'",
                         order_by=["attributes.start_time DESC"], limit=1) if resume else []
    if found:
        tracker.reopen(found[0].run_id)
        log.info("resuming comparison %s", found[0].run_id)
        return found[0].run_id, True
    parent = tracker.start(f"comparison-{time.strftime('%Y%m%d-%H%M%S')}",
                           tags={TAG_KIND: KIND_COMPARISON, TAG_KEY: key})
    regimes_run = sorted({(m.regime.name, m.regime.setting, m.regime.synthetic_ratio) for m in mixtures})
    tracker.log_params(parent, {
        "models": ",".join(spec.models), "regimes": ",".join(r[0] for r in regimes_run),
        "seeds": ",".join(map(str, spec.seeds)), "test_sets": ",".join(sorted(inputs.test_sets)),
        "synthetic_ratio": spec.synthetic_ratio, "tiny": spec.tiny, "threshold": THRESHOLD,
        "epochs": ",".join(f"{m}:{spec.recipe(m).epochs}" for m in spec.models),
        "learning_rate": ",".join(f"{m}:{spec.recipe(m).learning_rate:g}" for m in spec.models),
        "n_real_train": len(inputs.real_train), "n_real_val": len(inputs.real_val),
        "n_synthetic_usable": len(inputs.synthetic), "validate_config_digest": identity.spec_digest(spec),
    })
    tracker.log_dict(parent, spec.model_dump(mode="json"), "config/validate.json")
    intro = comparison_description(spec, inputs, regimes_run, skipped)
    tracker.set_tags(parent, {TAG_DESCRIPTION: intro})  # the report adds its verdict to this
    tracker.set_description(parent, intro)
    tracker.log_dict(parent, {"regimes": [{"name": n, "setting": s, "synthetic_ratio": r} for n, s, r in regimes_run],
                              "skipped": skipped, "synthetic": inputs.synthetic_note}, "config/regimes.json")
    return parent, False


def log_quality(tracker: Tracker, parent: str, workdir: Workdir) -> None:
    """The quality gate's shortcut audit on the comparison's parent run: each flag's rate per class and
    image set (metrics ``flag_rate.<set>.<class>.<flag>``), the flags called out (a tag), and the
    quality reports, grids and audit figures as artifacts, so a shortcut shows next to the results it
    may inflate and the images next to the classifiers trained on them. Read from the quality stage's
    ``flag_rates.parquet`` (the reports are for people, never inputs)."""
    from dermt2im.core.manifest import FLAG_RATES, read_manifest

    rates = read_manifest(workdir.flag_rates_manifest, FLAG_RATES)
    if rates.empty:
        return
    points = [(metric_key("flag_rate", r["images"], r["label"], flag), float(r[flag]), 0)
              for r in rates.to_dict("records") if r["n"] for flag in FLAG_NAMES]
    tracker.log_points(parent, points)
    called = [s for s in rates["shortcut"].dropna() if s]
    tracker.set_tags(parent, {"dermt2im.shortcuts": "; ".join(called) or "none"})
    for name in ("quality.json", "quality.md"):
        if (workdir.reports / name).is_file():
            tracker.log_file(parent, workdir.reports / name, "quality")
    # what the images look like, next to what classifiers made of them: class x sampler grids, audit pairs
    for sub in ("grids", "audit"):
        for png in sorted((workdir.reports / sub).glob("*.png")):
            tracker.log_file(parent, png, f"quality/{sub}")


def plan_comparison(workdir: Workdir, spec: ValidateConfig,
                    test_sets: dict[str, str | Path] | None = None) -> Comparison:
    """Load and check the inputs and build the cells and the comparison's key (no tracking store)."""
    if not spec.models:
        raise ValidationError("validate.models is empty")
    if not spec.seeds:
        raise ValidationError("validate.seeds is empty")
    inputs = load_inputs(workdir, test_sets)
    mixtures, skipped = plan_mixtures(inputs, spec)
    cells = tuple(Cell(model, m) for model in spec.models for m in mixtures)
    return Comparison(comparison_key(spec, inputs), inputs, cells, tuple(mixtures), skipped)


def open_parent_run(workdir: Workdir, spec: ValidateConfig, tracker: Tracker, comparison: Comparison, *,
                    resume: bool = True) -> ValidationPlan:
    """The comparison's MLflow parent run, opened (or resumed by key): what its cells run under."""
    import json

    parent, resumed = _open_parent(tracker, spec, comparison.inputs, list(comparison.mixtures), comparison.skipped,
                                   comparison.comparison_key, resume)
    if not resumed:
        log_quality(tracker, parent, workdir)
    tracker.set_tags(parent, {TAG_SKIPPED: json.dumps(comparison.skipped, sort_keys=True)})
    return ValidationPlan(parent, tracker.experiment, tracker.experiment_id, comparison.comparison_key,
                          comparison.inputs, comparison.cells, comparison.skipped, resumed)
