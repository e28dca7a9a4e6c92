"""The ``dermt2im`` command line: one command per stage, plus ``run`` for the whole factory.

Stage commands call the domain functions directly (no server, no orchestration overhead);
``run`` executes the factory as a Prefect flow. Every command takes ``--workdir``, ``--config``,
``--set`` and ``--save``; which config a command uses and when ``W/config.yaml`` changes is
``dermt2im.cli_session``'s to say, and each command prints it in one line. Long work shows a
progress bar on an interactive terminal and a log line every few seconds otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermt2im.cli_base import (
    DEFAULT_WORKDIR,
    LAYOUTS,
    ConfigOpt,
    SaveOpt,
    SetOpt,
    WorkdirOpt,
    app,
    command,
    take,
)
from dermt2im.cli_base import echo as _echo
from dermt2im.cli_base import fail as _fail
from dermt2im.cli_base import guard as _guard
from dermt2im.cli_base import session as _session
from dermt2im.core import storage


@command()
def phantoms(
    out: Annotated[Path, typer.Argument(help="output folder: class folders plus labels.csv")],
    n: Annotated[int, typer.Option("--n", min=1, help="number of images, split evenly between classes")] = 24,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    style: Annotated[str, typer.Option(help="isic or ham: colour and lighting style")] = "isic",
    size: Annotated[int, typer.Option(min=32, help="side length in pixels (at least 32)")] = 256,
    hair_probability: Annotated[float, typer.Option(help="share of images with drawn hair")] = 0.3,
) -> None:
    """Make procedural dermoscopy-like phantom images with known labels."""
    from dermt2im.phantoms import make_phantoms

    if style not in ("isic", "ham"):
        raise typer.BadParameter("style must be isic or ham", param_hint="--style")
    labels = make_phantoms(out, n, seed=seed, style=style, size=size, hair_probability=hair_probability)
    _echo(f"wrote {n} phantoms ({style} style) to {out}; labels: {labels}")


@command("pretrain-mini")
def pretrain_mini(
    out: Annotated[Path, typer.Option("--out", help="the .safetensors file to write")] = Path("mini-sd.safetensors"),
    recipe_set: Annotated[
        list[str] | None, typer.Option("--recipe", help="change the recipe: NAME=VALUE (e.g. unet_steps=500); "
                                       "the shipped model uses the defaults")
    ] = None,
) -> None:
    """Pre-train the miniature Stable Diffusion on phantoms (deterministic; the smoke preset's `mini`)."""
    import yaml

    from dermt2im.mini.pretrain import pretrain
    from dermt2im.mini.recipe import MiniRecipe

    if out.suffix != ".safetensors":
        _fail(f"--out {out}: the model is written as a .safetensors file")
    changes = {}
    for item in recipe_set or []:
        name, sep, value = item.partition("=")
        if not sep:
            _fail(f"--recipe {item!r}: expected NAME=VALUE")
        changes[name.strip()] = yaml.safe_load(value)
    try:
        recipe = MiniRecipe(**changes)
    except ValueError as err:
        _fail(f"--recipe: {str(err).splitlines()[0]}; {'; '.join(str(err).splitlines()[1:3])}")
    header = pretrain(recipe, out)
    costs = ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in header["costs"].items())
    _echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; {header['training_images']} phantoms, data sha256 "
          f"{header['training_data_sha256'][:12]}; {costs} on {recipe.threads} thread(s))")


def _said(i: int, n: int, unit) -> None:
    """What the CLI prints as each unit of a stage ends."""
    text = unit.summary.get("text") if isinstance(unit.summary, dict) else None
    if unit.cached:
        _echo(f"{unit.description}: up to date" + (f" (as last made)\n{text}" if text else ""))
    elif text:
        _echo(text)


def _run(stages, scale=None) -> dict[str, dict]:
    """Run a pipeline's stages (``dermt2im.pipelines``) in this process, saying what each unit did;
    returns every stage's closing summary by name. ``scale``: the config's scale section (stages that
    can scale out run on the Ray cluster it names, ``dermt2im.runners.scaling``)."""
    from dermt2im.runners.sequential import run_pipeline

    return _guard(lambda: {name: r.closing for name, r in run_pipeline(stages, scale, on_unit=_said).items()})


@command()
def ingest(
    source: Annotated[Path, typer.Argument(help="folder of seed images (ISIC, HAM10000, class folders or CSV)")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    layout: Annotated[str, typer.Option(help=LAYOUTS)] = "auto",
    test_set: Annotated[
        str | None, typer.Option("--test-set", help="ingest SOURCE as the unseen real test set NAME instead of as seeds")
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Ingest seed images into W/manifests/seeds.parquet (bad files are quarantined with a reason)."""
    from dermt2im import pipelines
    from dermt2im.ingest.stage import check_source

    chosen = None if layout == "auto" else layout
    w, cfg = _session(workdir, config, overrides, save, existing=False,
                      check=lambda c: check_source(source, c.ingest, chosen))
    dataset = pipelines.dataset(w, source=source, test_set=test_set, layout=chosen)
    _run(pipelines.only(pipelines.datasets(w, cfg, [dataset]), "ingest"))


@command()
def preprocess(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    test_set: Annotated[str | None, typer.Option("--test-set", help="preprocess test set NAME instead of the seeds")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Remove hair (DullRazor) and resize / centre-crop every accepted image; cached by content. For the
    seeds, then measure, index and embed them for the quality gate (once per seed set)."""
    w, cfg = _session(workdir, config, overrides, save)
    from dermt2im import pipelines

    dataset = pipelines.dataset(w, test_set=test_set)
    if not storage.is_file(dataset.manifest):
        _fail(f"{dataset.manifest} does not exist: run `dermt2im ingest` first")
    done = _run(pipelines.only(pipelines.datasets(w, cfg, [dataset]), "preprocess", "gate-seeds"))
    for summary in done["preprocess"].values():
        _echo(summary["hair_text"])
    if "gate-seeds" in done:
        _echo(done["gate-seeds"]["text"])


@command()
def train(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint folder to resume from")] = None,
    run_id: Annotated[str | None, typer.Option(help="name of the run folder under W/lora/")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Fine-tune Stable Diffusion with DreamBooth + LoRA on the accepted training-split seeds."""
    w, cfg = _session(workdir, config, overrides, save)
    from dermt2im import pipelines

    result = _run(pipelines.train(w, cfg, resume=resume, run_id=run_id))["train"]
    how = "up to date, not trained again" if result.get("cached") else "trained now"
    _echo(f"LoRA run {result['run_id']} ({how}): {result['steps']} steps, final loss {result['final_loss']:.4f}, "
          f"optimizer {result['optimizer']} on {result['device']}")
    for label, path in result["weights"].items():
        _echo(f"  {label}: {path} (sha256 {result['sha256'][label][:12]})")


@command()
def generate(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    lora: Annotated[Path | None, typer.Option(help="LoRA run folder or .safetensors; default: the LoRA trained for the current config")] = None,
    per_class: Annotated[int | None, typer.Option(
        "--per-class", min=1, help="how many images each class should have in all (a target, not an increment); "
        "more than planned extends the plan, fewer keeps it")] = None,
    shard: Annotated[list[int] | None, typer.Option(help="render only these shards (repeatable)")] = None,
    base_model_only: Annotated[bool, typer.Option("--base-model-only", help="render with train.base_model alone, no LoRA")] = False,
    report: Annotated[bool, typer.Option("--report", help="then the fidelity report too (else: `dermt2im report`)")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Plan, render (Euler / Euler a / PLMS ...), then quality-gate and audit synthetic lesions (measured
    while rendering goes on). The fidelity report (FRD, KID, PRDC with intervals, MLflow) is `dermt2im
    report`, or --report here."""
    from dermt2im.core.loading import loading

    with loading():  # the command's imports and set-up, before the renderer's own loading
        w, cfg = _session(workdir, config, overrides, save)
        from dermt2im import pipelines

        stages = pipelines.generate(w, cfg, lora=lora, base_model_only=base_model_only, per_class=per_class,
                                    shards=shard, report=report)
    _run(stages, cfg.scale)
    if not report:
        _echo("fidelity report: `dermt2im report` (or `dermt2im generate --report`)")


@command()
def worker(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    shard_index: Annotated[int, typer.Option(
        "--shard-index", min=0, envvar=["DERMT2IM_SHARD_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"],
        help="this worker's partition, from 0 (default from a Kubernetes indexed Job or a Slurm array task)")] = 0,
    num_shards: Annotated[int, typer.Option(
        "--num-shards", min=1, envvar=["DERMT2IM_NUM_SHARDS", "SLURM_ARRAY_TASK_COUNT"],
        help="how many partitions the plan's shards are split into")] = 1,
    lora: Annotated[Path | None, typer.Option(help="LoRA run folder or .safetensors; default: the LoRA trained for the current config")] = None,
    base_model_only: Annotated[bool, typer.Option("--base-model-only", help="render with train.base_model alone, no LoRA")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Render one static partition of the plan: the shards whose number modulo --num-shards is --shard-index.

    For batch schedulers without Ray (Slurm arrays, Kubernetes indexed Jobs): N workers, indices 0..N-1,
    all seeing the workdir; a worker that died is started again with its index and skips what it
    finished. Then run `dermt2im quality`. On a Ray cluster: `dermt2im generate --set scale.ray_address=...`.
    """
    from dermt2im.runners.partition import check_partition

    _guard(lambda: check_partition(shard_index, num_shards))
    w, cfg = _session(workdir, config, overrides, save, hold="shared")
    from dermt2im import pipelines
    from dermt2im.runners.partition import Partition

    (render,) = pipelines.generate(w, cfg, lora=lora, base_model_only=base_model_only, gated=False)
    out = _run([Partition(render, shard_index, num_shards)])["generate"]
    _echo(f"worker {shard_index} of {num_shards}: {out['rendered']} image(s) rendered in shard(s) {out['shards']}")


@command()
def quality(workdir: WorkdirOpt = DEFAULT_WORKDIR, config: ConfigOpt = None, overrides: SetOpt = None,
            save: SaveOpt = False) -> None:
    """Run the quality gate and memorisation audit over W/manifests/synthetic.parquet."""
    w, cfg = _session(workdir, config, overrides, save)
    from dermt2im import pipelines

    _run(pipelines.gate(w, cfg))


@command("import-synthetic")
def import_synthetic(
    source: Annotated[Path, typer.Argument(help="folder of generated images: class folders, or a CSV of file,label")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    name: Annotated[str, typer.Option("--name", help="the set's name: its rows get source = NAME")] = "",
    layout: Annotated[str, typer.Option(help="auto | folders | csv")] = "auto",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Import an external synthetic set into W's synthetic manifest, then gate and audit it like the
    factory's own renders (validate.synthetic_sources can then restrict a regime to it)."""
    if not name:
        raise typer.BadParameter("give the set a name", param_hint="--name")
    from dermt2im import pipelines
    from dermt2im.generate.imports import check_name, plan_import

    def check(cfg) -> None:  # before the workdir or its config is written
        check_name(name)
        plan_import(source, layout, cfg.ingest)

    w, cfg = _session(workdir, config, overrides, save, existing=False, check=check)
    _run(pipelines.imported(w, cfg, source=source, name=name, layout=layout))


@command()
def export(
    out: Annotated[Path, typer.Argument(help="output folder")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    format: Annotated[str, typer.Option("--format", help="imagefolder")] = "imagefolder",
    include_rejected: Annotated[bool, typer.Option(help="also export rejected images")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Export the accepted synthetic set (class folders + metadata.csv, Hugging Face imagefolder) with its
    dataset card (README.md: counts, gate and audit, fidelity, provenance, licences and the terms they give)."""
    if format != "imagefolder":
        raise typer.BadParameter("only 'imagefolder' is supported", param_hint="--format")
    w, cfg = _session(workdir, config, overrides, save, hold=None)
    from dermt2im.core.errors import DermT2imError
    from dermt2im.export import export_imagefolder
    from dermt2im import pipelines

    try:  # the card's fidelity table: the report, made now if stale (an export never stops for it)
        from dermt2im.runners.sequential import run_pipeline

        fidelity = run_pipeline(pipelines.fidelity(w, cfg))["fidelity"].closing.get("csv")
    except DermT2imError as err:
        _echo(f"no fidelity table for the dataset card: {err}")
        fidelity = None
    path = _guard(lambda: export_imagefolder(w, out, include_rejected=include_rejected,
                                             base_model=cfg.train.base_model, fidelity_csv=fidelity))
    _echo(f"exported to {path} (dataset card: {path / 'README.md'})")


def _parse_test_sets(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, src = item.partition("=")
        if not sep or not name or not src:
            raise typer.BadParameter(f"{item!r} must look like NAME=SOURCE", param_hint="--test-set")
        out[name] = src
    return out


@command()
def validate(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    test_set: Annotated[list[str] | None, typer.Option("--test-set", help="NAME=SOURCE of an unseen real test set (repeatable)")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Fine-tune ViT / MobileNetV2 on baseline vs hybrid data and test on unseen real test sets (MLflow)."""
    tests = _parse_test_sets(test_set)
    from dermt2im.ingest.stage import check_source

    def check(cfg) -> None:
        for src in {**cfg.validation.test_sets, **tests}.values():
            check_source(src, cfg.ingest)

    w, cfg = _session(workdir, config, overrides, save, check=check)
    from dermt2im import pipelines

    _run(pipelines.validate(w, cfg, test_sets=tests), cfg.scale)


@command()
def report(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    parent_run_id: Annotated[str | None, typer.Option(help="comparison run id; default: the newest")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Rebuild the fidelity report of every synthetic set (imported ones included: reports/fidelity.md,
    MLflow) and Table IV (model x regime x test set, bootstrap intervals over test images) and Fig. 10
    from MLflow alone."""
    w, cfg = _session(workdir, config, overrides, save, hold=None)
    from dermt2im import pipelines
    from dermt2im.validate.table import NoComparison, build_report

    _run(pipelines.fidelity(w, cfg))

    def table_iv() -> dict:
        try:
            return build_report(w, cfg.tracking, parent_run_id=parent_run_id)
        except NoComparison as err:
            if parent_run_id is not None:
                raise
            _echo(f"Table IV: {err}")
            return {}

    for name, path in _guard(table_iv).items():
        _echo(f"{name}: {path}")


@command()
def run(
    source: Annotated[Path | None, typer.Argument(help="seed images; omit to use phantoms (smoke preset)")] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    layout: Annotated[str, typer.Option(help=LAYOUTS)] = "auto",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run the whole factory as one Prefect flow (temporary local Prefect server, SQLite MLflow).

    Its config (with any --set) is saved as W/config.yaml: every stage of the flow reads it there.
    Without SOURCE the factory makes phantom seed and test images and, on a fresh workdir, uses the
    smoke preset; with a SOURCE a fresh workdir gets the built-in defaults (the paper's settings).
    First it asks every stage whether anything is left to do (no torch, no server): when nothing
    is, it says so, prints where the results are, and exits."""
    from dermt2im import cli_session, pipelines
    from dermt2im.ingest.stage import check_source
    from dermt2im.runners.core import pending

    chosen = None if layout == "auto" else layout
    w, cfg = _session(workdir, config, overrides, True, existing=False, fallback="smoke" if source is None else None,
                      check=(lambda c: check_source(source, c.ingest, chosen)) if source is not None else None)
    left = _guard(lambda: pending(pipelines.factory(w, cfg, source=source, layout=chosen)))
    if left is None:
        _echo(f"everything in {w.root} is up to date for this config: nothing to do (no server started)")
        _echo(cli_session.where_results_are(w, cfg))
        return
    stage, todo = left
    _echo(f"to do, from the {stage.name} stage on: {todo[0].description}"
          + (f" and {len(todo) - 1} more unit(s)" if len(todo) > 1 else ""))
    from dermt2im.flows.factory import factory

    _guard(lambda: cli_session.start_prefect_server(_echo))
    result = _guard(lambda: factory(str(w.root), str(source) if source else None, None, None, chosen))
    _echo(f"factory finished in {w.root}")
    _echo(cli_session.format_result(result))


@command("config")
def show_config(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    save: SaveOpt = False,
) -> None:
    """Print the config a workdir's commands run with (with --save or --config, save it as W/config.yaml)."""
    import yaml

    from dermt2im import cli_session
    from dermt2im.flows.settings import orchestration

    root = workdir.expanduser().resolve()
    resolved = _guard(lambda: cli_session.resolve(root, config, overrides, save=save))
    _guard(lambda: orchestration(resolved.cfg))
    if resolved.write and (save or config is not None):  # a run in progress keeps the config it started with
        _guard(lambda: take(root, "dermt2im config --save"))
        typer.echo(cli_session.config_line(resolved, root), err=True)
        cli_session.start(root, resolved)
    else:
        typer.echo(f"config: {resolved.origin}{'' if root.exists() else ' (nothing saved: no such workdir yet)'}",
                   err=True)
    _echo(yaml.safe_dump(resolved.cfg.model_dump(mode="json", by_alias=True), sort_keys=False))


def main() -> None:
    """The ``dermt2im`` console command (``app`` is the same commands, for Typer's test runner)."""
    from dermt2im.cli_base import run_command_line

    run_command_line(app)


if __name__ == "__main__":  # pragma: no cover
    main()
