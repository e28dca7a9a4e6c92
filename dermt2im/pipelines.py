"""Each pipeline of the factory, defined once: which stages, built how (Kedro's ``create_pipeline``).

A pipeline is a list of stages (``dermt2im.stage``) built from the workdir and its config, every one
the same way (``XStage.of(workdir, cfg, **choices)``), here and nowhere else. Nothing runs when a
pipeline is built: a stage that needs an earlier stage's output looks it up when it first needs it
(generate finds the LoRA trained for the config when it plans its shards), so a whole pipeline can be
built, and asked what is left to do (``dermt2im.runners.core.pending``), before anything runs.

Who runs them only chooses a runner:

* the CLI: ``dermt2im.runners.sequential.run_pipeline`` (this process; Ray when ``scale`` says so);
* the Prefect flows (``dermt2im.flows``): ``dermt2im.tasks.stage.run_pipeline`` (a task run per unit);
* ``dermt2im worker`` and the generate-worker flow: a static ``Partition`` of generate's shards;
* ``dermt2im run``: ``factory`` asked ``pending`` before any import of torch or start of a server.

The pipelines:

``seeds``      (phantoms, when there is no SOURCE) -> ingest -> preprocess, for the seeds and every test set
               -> the seeds measured, indexed and embedded for the gate (gate-seeds)
``train``      the LoRA(s) of the config
``generate``   plan and render shards -> quality gate and memorisation audit (measuring while rendering)
               -> fidelity report
``imported``   an external synthetic set -> the same gate, audit and report
``validate``   (ingest -> preprocess of test sets named now) -> classifier cells -> the SAM check
``factory``    all of them in the paper's order (Fig. 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dermt2im.core.workdir import Workdir
from dermt2im.fidelity.stage import FidelityStage
from dermt2im.generate.imports import ImportStage
from dermt2im.generate.stage import GenerateStage
from dermt2im.ingest.stage import Dataset, IngestStage, seed_datasets
from dermt2im.phantoms import PhantomStage
from dermt2im.preprocess.stage import PreprocessStage
from dermt2im.quality.stage import GateSeedsStage, QualityStage
from dermt2im.stage import Stage
from dermt2im.train.stage import TrainStage
from dermt2im.validate.segmentation import SegmentationStage
from dermt2im.validate.stage import ValidateStage


def only(stages: Sequence[Stage], *names: str) -> list[Stage]:
    """The stages of a pipeline with these names, in its order (a stage command runs one of them)."""
    return [stage for stage in stages if stage.name in names]


def dataset(workdir: Workdir, *, source: str | Path = "", test_set: str | None = None,
            layout: str | None = None) -> Dataset:
    """The seeds (``source``), or the unseen real test set ``test_set``, and where its rows go."""
    if test_set:
        return Dataset(test_set, str(source), str(workdir.test_set_manifest(test_set)), "test", layout)
    return Dataset("seeds", str(source), str(workdir.seeds_manifest), None, layout)


def datasets(workdir: Workdir, cfg: Any, ds: Sequence[Dataset]) -> list[Stage]:
    """Ingest, then preprocess, the given datasets (seeds and / or test sets); then, for the seeds,
    what the gate needs of them (measured, indexed, embedded: made once per seed set, not per run)."""
    if not ds:
        return []
    stages = [IngestStage.of(workdir, cfg, datasets=ds), PreprocessStage.of(workdir, cfg, datasets=ds)]
    if any(d.split is None for d in ds):  # the seeds (test sets carry their split)
        stages.append(GateSeedsStage.of(workdir, cfg))
    return stages


def seeds(workdir: Workdir, cfg: Any, *, source: str | Path | None = None,
          test_sets: Mapping[str, str | Path] | None = None, layout: str | None = None) -> list[Stage]:
    """The seed set (from ``source``; without one, the factory's own phantoms) and every unseen real
    test set (``validate.test_sets`` of the config, then ``test_sets``: name -> source), ingested and
    preprocessed."""
    tests = {**cfg.validation.test_sets, **(test_sets or {})}
    made: list[Stage] = []
    if source is None:
        phantoms = PhantomStage.of(workdir, cfg)
        folders = phantoms.folders()
        source = folders.pop("seeds")
        tests = {**folders, **tests}
        made.append(phantoms)
    return made + datasets(workdir, cfg, seed_datasets(workdir, source, tests, layout))


def train(workdir: Workdir, cfg: Any, *, resume: str | None = "latest", run_id: str | None = None) -> list[Stage]:
    return [TrainStage.of(workdir, cfg, resume=resume, run_id=run_id)]


def fidelity(workdir: Workdir, cfg: Any) -> list[Stage]:
    """The fidelity report of every synthetic set of the workdir (imported ones included)."""
    return [FidelityStage.of(workdir, cfg)]


def gate(workdir: Workdir, cfg: Any, *, report: bool = True) -> list[Stage]:
    """The quality gate and memorisation audit over every synthetic image of the workdir, then (with
    ``report``) the fidelity report of the sets it passed."""
    return [QualityStage.of(workdir, cfg), *(fidelity(workdir, cfg) if report else [])]


def generate(workdir: Workdir, cfg: Any, *, lora: str | Path | None = None, base_model_only: bool = False,
             per_class: int | None = None, shards: Sequence[int] | None = None, gated: bool = True,
             report: bool = True) -> list[Stage]:
    """Plan (or extend the plan) and render the shards with the LoRA the config names (or ``lora``),
    then gate and audit, then (with ``report``) the fidelity report; ``gated=False`` for scale-out
    workers, whose shards are gated once all are in. The gate measures each batch of images while
    the next renders (``QualityStage.rendered``): when it runs, only its whole-set steps are left."""
    render = GenerateStage.of(workdir, cfg, lora=lora, base_model_only=base_model_only, per_class=per_class,
                              shards=shards)
    if not gated:
        return [render]
    judged = gate(workdir, cfg, report=report)
    render.listen(judged[0])
    return [render, *judged]


def imported(workdir: Workdir, cfg: Any, *, source: str | Path, name: str, layout: str = "auto") -> list[Stage]:
    """An external synthetic set imported as ``name``, then the same gate, audit and report as the renders."""
    return [ImportStage.of(workdir, cfg, source=source, name=name, layout=layout), *gate(workdir, cfg)]


def validate(workdir: Workdir, cfg: Any, *, test_sets: Mapping[str, str | Path] | None = None,
             log_model: bool = True) -> list[Stage]:
    """The comparison, then the SAM check. The test sets the config names (``validate.test_sets``) and
    ``test_sets`` (name -> source) are ingested and preprocessed first (up to date when the seeds
    pipeline did it). The comparison tests on ``test_sets`` when some are given; otherwise on every
    test set the workdir holds, and the seeds' own test split."""
    given = dict(test_sets or {})
    tests = seed_datasets(workdir, "", {**cfg.validation.test_sets, **given})[1:]  # the test sets only
    chosen = {d.name: d.manifest for d in tests if d.name in given} or None
    return [*datasets(workdir, cfg, tests), ValidateStage.of(workdir, cfg, test_sets=chosen, log_model=log_model),
            SegmentationStage.of(workdir, cfg)]


def factory(workdir: Workdir, cfg: Any, *, source: str | Path | None = None, layout: str | None = None) -> list[Stage]:
    """The whole factory in the paper's order (Fig. 1), as ``dermt2im run`` runs it: the seeds and the
    test sets, the LoRA, the synthetic set with its gate, the comparison."""
    return [*seeds(workdir, cfg, source=source, layout=layout), *train(workdir, cfg), *generate(workdir, cfg),
            *validate(workdir, cfg)]
