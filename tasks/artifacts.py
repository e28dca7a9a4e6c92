"""What the Prefect UI shows about a stage's outputs: markdown summaries, tables and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from dermt2im.core import storage
from dermt2im.core.manifest import SYNTHETIC, read_manifest
from dermt2im.core.workdir import Workdir
from dermt2im.quality.report import quality_tables


def publish_datasets(stage: str, summary: dict[str, Any]) -> None:
    """One markdown artifact per dataset of an ingest / preprocess stage."""
    for name, s in summary.items():
        text = s.get("text") or "\n".join(f"{k}: {v}" for k, v in s.items())
        create_markdown_artifact(key=f"{stage}-{name}".lower().replace("_", "-"),
                                 markdown=f"### {stage}: `{name}`\n\n```\n{text}\n```\n",
                                 description=f"{stage} of {name}")


def publish_lora(summary: dict[str, Any]) -> None:
    lines = [f"### LoRA `{summary['run_id']}`{' (cached)' if summary.get('cached') else ''}", "",
             f"- folder: `{summary['lora_dir']}`", f"- steps: {summary['steps']}, final loss {summary['final_loss']:.4f}",
             f"- optimizer: {summary['optimizer']} on {summary['device']}", "", "| LoRA | weights | sha256 |",
             "|---|---|---|"]
    lines += [f"| {k} | `{p}` | `{summary['sha256'][k][:16]}…` |" for k, p in summary["weights"].items()]
    create_markdown_artifact(key=f"lora-{summary['run_id']}".lower(), markdown="\n".join(lines) + "\n",
                             description="DreamBooth-LoRA training result")


def publish_quality(workdir: Workdir, assessed: dict[str, Any]) -> list[str]:
    """Markdown (quality counts, audit), a table of counts by class, and the grids as image artifacts."""
    made = []
    reports = workdir.reports
    md, audit = reports / "quality.md", reports / "audit" / "audit.md"
    body = [f"```\n{assessed.get('text', '')}\n```", ""]
    if md.is_file():
        body.append(md.read_text())
    if audit.is_file():
        body += ["", audit.read_text()]
    create_markdown_artifact(key="generate-quality", markdown="\n".join(body),
                             description="quality gate counts and memorisation audit")
    made.append("generate-quality")
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    table = quality_tables(df)["by_label"] if not df.empty else []
    if table:
        create_table_artifact(table=table, key="generate-counts", description="accepted / rejected by reason, per class")
        made.append("generate-counts")
    made += publish_shortcuts(workdir)
    for name, path in sorted(assessed.get("files", {}).items()):
        p = Path(path)
        if p.suffix == ".png" and p.is_file():
            key = "generate-" + name.replace("_", "-").lower()
            create_image_artifact(image_url=p.resolve().as_uri(), key=key, description=f"{name}: {p}")
            made.append(key)
    return made


def publish_shortcuts(workdir: Workdir) -> list[str]:
    """The shortcut audit as a table: each flag's rate per class among accepted synthetic images (per
    source) and real seeds; the flags called out by name in the description."""
    import json

    try:
        quality = json.loads((workdir.reports / "quality.json").read_text())
    except (OSError, ValueError):
        return []
    rows = [{"images": r["images"], "class": r["label"], "n": r["n"],
             **{f: round(float(r[f]), 4) for f in ("ruler", "ink", "frame", "hair", "text") if r["n"]}}
            for r in quality.get("flag_rates", [])]
    if not rows:
        return []
    called = quality.get("shortcuts") or ["no flag differs strongly between benign and malignant"]
    create_table_artifact(table=rows, key="quality-shortcuts",
                          description="flag rates per class (shortcut audit): " + "; ".join(called))
    return ["quality-shortcuts"]


def publish_table_iv(table_md: str | None, parent_run_id: str) -> None:
    if table_md and Path(table_md).is_file():
        create_markdown_artifact(key="table-iv", markdown=Path(table_md).read_text(),
                                 description=f"Table IV rebuilt from MLflow comparison run {parent_run_id}")


def publish_segmentation(summary: dict[str, Any]) -> None:
    md = summary.get("md")
    if md and Path(md).is_file():
        create_markdown_artifact(key="segmentation-check", markdown=Path(md).read_text(),
                                 description="SAM mask statistics, real vs synthetic")


def publish_factory(workdir: Workdir) -> None:
    """Where everything the factory made is: Table IV, manifests and reports."""
    reports = sorted(p for p in workdir.reports.rglob("*") if p.suffix in (".md", ".png", ".csv"))
    lines = [f"# derm-t2im factory: `{workdir.root}`", ""]
    table = workdir.reports / "table_iv.md"
    if table.is_file():
        lines += ["## Table IV", "", table.read_text(), ""]
    lines += ["## Manifests", ""]
    manifests = storage.files_in(workdir.manifests, ".parquet") + storage.files_in(workdir.test_sets_folder, ".parquet")
    lines += [f"- `{p}`" for p in manifests]
    lines += ["", "## Reports", ""] + [f"- `{p}`" for p in reports]
    create_markdown_artifact(key="factory-summary", markdown="\n".join(lines),
                             description="derm-t2im factory run: where everything is")
