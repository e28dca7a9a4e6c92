"""The factory: the paper's Fig. 1 as one Prefect flow.

seeds -> ingest -> preprocess -> train_lora (cuda) -> plan / generate shards (cuda) -> quality gate +
memorisation audit -> validate {ViT, MobileNetV2} x regimes x seeds (MLflow) -> Table IV.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from dermt2im.core import storage
from dermt2im.core.workdir import Workdir, open_workdir
from flows.dispatch import run_gpu_stage
from flows.generate import generate
from flows.seeds import prepare_seeds
from flows.train import train
from flows.validate import validate


@flow(name="derm-t2im-factory", log_prints=True)
def factory(
    workdir: str,
    source: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    layout: str | None = None,
) -> dict:
    w, cfg = open_workdir(workdir, config, overrides)  # saved as W/config.yaml; every stage below reads it
    seeds = prepare_seeds(workdir, source, layout=layout)
    lora = run_gpu_stage(train, cfg.orchestration.train_deployment, {"workdir": workdir}, cfg.orchestration)
    lora_dir = lora.get("lora_dir") if isinstance(lora, dict) else None
    synthetic = run_gpu_stage(generate, cfg.orchestration.generate_deployment,
                              {"workdir": workdir, "lora": lora_dir}, cfg.orchestration)
    validation = validate(workdir)
    result = {"seeds": seeds, "lora": lora, "synthetic": synthetic, "validation": validation}
    create_markdown_artifact(key="factory-summary", markdown=_summary(w, result),
                             description="derm-t2im factory run: where everything is")
    return result


def _summary(w: Workdir, result: dict) -> str:
    reports = sorted(p for p in w.reports.rglob("*") if p.suffix in (".md", ".png", ".csv"))
    lines = [f"# derm-t2im factory: `{w.root}`", ""]
    table = w.reports / "table_iv.md"
    if table.is_file():
        lines += ["## Table IV", "", table.read_text(), ""]
    lines += ["## Manifests", ""]
    manifests = storage.files_in(w.manifests, ".parquet") + storage.files_in(w.test_sets_folder, ".parquet")
    lines += [f"- `{p}`" for p in manifests]
    lines += ["", "## Reports", ""] + [f"- `{p}`" for p in reports]
    return "\n".join(lines)
