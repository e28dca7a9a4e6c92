"""What the Prefect UI shows about a stage's outputs: markdown summaries, tables and figures.

A page served over http cannot load ``file://`` images, so figures are embedded in markdown
artifacts as data URIs, downscaled to thumbnails of at most ``THUMBNAIL_SIDE`` pixels (well under
the ~1 MB both Prefect UIs render), with the full-size file's path beside them. Artifact keys are
one per dataset, stage or report, so a key's history shows one thing over time.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dermt2im.core import storage
from dermt2im.core.manifest import FLAG_RATES, read_manifest
from dermt2im.core.views import synthetic_view
from dermt2im.core.runtime import TrackingConfig
from dermt2im.core.workdir import Workdir
from dermt2im.quality.report import quality_tables

THUMBNAIL_SIDE = 720
MAX_EMBEDDED_BYTES = 150_000  # a larger PNG thumbnail (noisy synthetic images) is sent as JPEG


def artifact_key(*parts: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) from ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")


def embedded_image(path: str | Path, alt: str, max_side: int = THUMBNAIL_SIDE) -> str:
    """Markdown showing ``path`` as an inline thumbnail (PNG, or JPEG when that is much smaller)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        mime = "image/png"
        if buf.tell() > MAX_EMBEDDED_BYTES:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            mime = "image/jpeg"
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"![{alt}](data:{mime};base64,{data})"


def _figure(path: str | Path, caption: str) -> list[str]:
    return [f"**{caption}**", "", embedded_image(path, caption), "", f"Full size: `{path}`", ""]


def publish_datasets(stage: str, summary: dict[str, Any]) -> None:
    """One markdown artifact per dataset of an ingest / preprocess stage (key ``<stage>-<dataset>``)."""
    for name, s in summary.items():
        text = s.get("text") or "\n".join(f"{k}: {v}" for k, v in s.items())
        create_markdown_artifact(key=artifact_key(stage, name), markdown=f"### {stage}: `{name}`\n\n```\n{text}\n```\n",
                                 description=f"{stage} of {name}")


def publish_lora(summary: dict[str, Any]) -> None:
    how = "up to date, not trained again" if summary.get("cached") else "trained in this run"
    lines = [f"### LoRA `{summary['run_id']}` ({how})", "",
             f"- folder: `{summary['lora_dir']}`", f"- steps: {summary['steps']}, final loss {summary['final_loss']:.4f}",
             f"- optimizer: {summary['optimizer']} on {summary['device']}", "", "| LoRA | weights | sha256 |",
             "|---|---|---|"]
    lines += [f"| {k} | `{p}` | `{summary['sha256'][k][:16]}…` |" for k, p in summary["weights"].items()]
    loss = Path(summary["lora_dir"]) / "loss.png"
    if loss.is_file():
        lines += ["", *_figure(loss, "training loss")]
    create_markdown_artifact(key=artifact_key("lora", summary["run_id"]), markdown="\n".join(lines) + "\n",
                             description="DreamBooth-LoRA training result")


def _png_files(assessed: dict[str, Any]) -> dict[str, Path]:
    return {name: Path(p) for name, p in sorted(assessed.get("files", {}).items())
            if str(p).endswith(".png") and Path(p).is_file()}


def publish_quality(workdir: Workdir, assessed: dict[str, Any]) -> list[str]:
    """Markdown (quality counts, audit), a table of counts by class, and each grid and audit figure
    as a markdown artifact with the image embedded."""
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
    df = synthetic_view(workdir)
    table = quality_tables(df)["by_label"] if not df.empty else []
    if table:
        create_table_artifact(table=table, key="generate-counts", description="accepted / rejected by reason, per class")
        made.append("generate-counts")
    made += publish_shortcuts(workdir)
    for name, path in _png_files(assessed).items():
        key = artifact_key("generate", name)
        create_markdown_artifact(key=key, markdown="\n".join(_figure(path, name.replace("_", " "))),
                                 description=f"{name}: {path}")
        made.append(key)
    return made


def publish_shortcuts(workdir: Workdir) -> list[str]:
    """The shortcut audit as a table: each flag's rate per class among accepted synthetic images (per
    source) and real seeds; the flags called out by name in the description (the quality stage's
    ``flag_rates.parquet``)."""
    rates = read_manifest(workdir.flag_rates_manifest, FLAG_RATES)
    rows = [{"images": r["images"], "class": r["label"], "n": int(r["n"]),
             **{f: round(float(r[f]), 4) for f in ("ruler", "ink", "frame", "hair", "text") if r["n"]}}
            for r in rates.to_dict("records")]
    if not rows:
        return []
    called = [s for s in rates["shortcut"].dropna() if s] or ["no flag differs strongly between benign and malignant"]
    create_table_artifact(table=rows, key="quality-shortcuts",
                          description="flag rates per class (shortcut audit): " + "; ".join(called))
    return ["quality-shortcuts"]


def mlflow_link(tracking: TrackingConfig, workdir: Workdir, experiment_id: str, run_id: str) -> str:
    """Where to see a run in MLflow: its URL on a tracking server, or how to open the local store.

    DERMT2IM_MLFLOW_UI_URL gives the address a browser uses when it differs from the tracking URI
    the workers use (docker compose: http://mlflow:5000 inside, http://127.0.0.1:5000 outside)."""
    import os

    from dermt2im.core.tracking import sqlite_artifact_root, tracking_uri

    uri = tracking_uri(workdir, tracking)
    browser = os.environ.get("DERMT2IM_MLFLOW_UI_URL") or (uri if uri.startswith(("http://", "https://")) else "")
    if browser:
        url = f"{browser.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"[MLflow comparison run {run_id}]({url})"
    artifacts = sqlite_artifact_root(uri)
    serve = f" --artifacts-destination {artifacts}" if artifacts else ""
    return (f"MLflow comparison run `{run_id}` (experiment {experiment_id}): start "
            f"`mlflow ui --backend-store-uri {uri}{serve} --host 127.0.0.1` and open "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}")


def _compact_table(workdir: Workdir) -> list[str]:
    """Table IV's verdict and the columns that fit the artifact pane, from reports/table_iv.csv."""
    import pandas as pd

    from dermt2im.validate.table_text import compact_markdown

    csv, verdict = workdir.reports / "table_iv.csv", workdir.reports / "verdict.txt"
    if not csv.is_file():
        return []
    out = []
    if verdict.is_file():
        head, *lines = verdict.read_text().strip().splitlines()
        out += [f"**{head}**", ""] + [f"- {line}" for line in lines] + [""]
    out += [compact_markdown(pd.read_csv(csv, keep_default_na=False, na_values=[""])), "",
            f"Every metric, interval and McNemar test: `{workdir.reports / 'table_iv.md'}`", ""]
    return out


def publish_table_iv(workdir: Workdir, compared: dict[str, Any], tracking: TrackingConfig) -> None:
    if not compared.get("table_md"):
        return
    lines = ["## Table IV", "", *_compact_table(workdir),
             mlflow_link(tracking, workdir, compared["experiment_id"], compared["parent_run_id"]), ""]
    fig10 = workdir.reports / "fig10.png"
    if fig10.is_file():
        lines += _figure(fig10, "Fig. 10")
    create_markdown_artifact(key="table-iv", markdown="\n".join(lines),
                             description=f"Table IV rebuilt from MLflow comparison run {compared['parent_run_id']}")


def publish_segmentation(summary: dict[str, Any]) -> None:
    md = summary.get("md")
    if md and Path(md).is_file():
        create_markdown_artifact(key="segmentation-check", markdown=Path(md).read_text(),
                                 description="SAM mask statistics, real vs synthetic")


def publish_fidelity(summary: dict[str, Any]) -> list[str]:
    """The fidelity report: its markdown with the figures embedded (key ``fidelity``), and the per class
    and per sampler figures of every set as a table (``fidelity-table``)."""
    import pandas as pd

    from dermt2im.fidelity.figures import set_label
    from dermt2im.fidelity.text import cell

    md, csv = Path(summary.get("md", "")), Path(summary.get("csv", ""))
    if not md.is_file() or not csv.is_file():
        return []
    body = [line for line in md.read_text().splitlines() if not line.startswith("![")]
    for caption, path in summary.get("figures", {}).items():
        if Path(path).is_file():
            body += ["", *_figure(path, caption)]
    create_markdown_artifact(key="fidelity", markdown="\n".join(body) + "\n",
                             description="fidelity, diversity, privacy and skin tone of each synthetic set")
    tab = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    if tab.empty:  # no report (no seeds to compare with): the markdown says why
        return ["fidelity"]
    emb = next((c.split(".", 1)[1] for c in tab.columns if c.startswith("kid.") and c.count(".") == 1), None)
    metrics = [m for m in ("frd", f"kid.{emb}", f"precision.{emb}", f"recall.{emb}", f"coverage.{emb}") if m in tab]
    rows = [{"set": set_label(r["kind"], r["set"], r["run"]), "stratum": f"{r['stratum']}: {r['value']}",
             "n": int(r["n"]), **{m: cell(r, m) for m in metrics}}
            for _, r in tab[tab["stratum"].isin(["all", "label", "sampler"])].iterrows()]
    create_table_artifact(table=rows, key="fidelity-table",
                          description="per class and sampler, with the real floor and the noise ceiling")
    return ["fidelity", "fidelity-table"]


def _class_agreement(workdir: Workdir) -> list[str]:
    """Do the synthetic images show their class? From reports/class_agreement.csv."""
    import pandas as pd

    from dermt2im.validate.agreement import compact_markdown, headline

    csv = workdir.reports / "class_agreement.csv"
    if not csv.is_file():
        return []
    table = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    return ["## Class agreement", "", *[f"**{line}**" for line in headline(table)], "", compact_markdown(table), "",
            f"By transformation and source: `{workdir.reports / 'class_agreement.md'}`", ""]


def publish_factory(workdir: Workdir, validation: dict[str, Any], tracking: TrackingConfig) -> None:
    """The factory at a glance: Table IV (compact), the grids, where to look in MLflow, every file."""
    lines = [f"# derm-t2im factory: `{workdir.root}`", ""]
    if validation.get("parent_run_id"):
        lines += ["## Table IV", "", *_compact_table(workdir),
                  mlflow_link(tracking, workdir, validation["experiment_id"], validation["parent_run_id"]), ""]
    lines += _class_agreement(workdir)
    overview = workdir.reports / "grids" / "overview.png"
    if overview.is_file():
        lines += ["## Synthetic images", "", *_figure(overview, "class x sampler (the paper's Fig. 5 / 7)"),
                  "One grid per class: the `generate-grid-*` artifacts.", ""]
    manifests = storage.files_in(workdir.manifests, ".parquet") + storage.files_in(workdir.test_sets_folder, ".parquet")
    reports = sorted(p for p in workdir.reports.rglob("*") if p.suffix in (".md", ".png", ".csv"))
    lines += ["## Manifests", ""] + [f"- `{p}`" for p in manifests]
    lines += ["", "## Reports", ""] + [f"- `{p}`" for p in reports]
    create_markdown_artifact(key="factory-summary", markdown="\n".join(lines),
                             description="derm-t2im factory run: Table IV, grids, where everything is")


def publish(stage: Any, summary: dict[str, Any]) -> list[str]:
    """What the Prefect UI shows after a stage has closed, by stage (``dermt2im.tasks.stage.run_pipeline``
    calls it after each one): the keys of the artifacts made."""
    name = stage.name
    if name in ("ingest", "preprocess"):
        publish_datasets(name, summary)
        return [artifact_key(name, dataset) for dataset in summary]
    if name == "train":
        publish_lora(summary)
        return [artifact_key("lora", summary["run_id"])]
    if name == "quality":
        return publish_quality(stage.workdir, summary)
    if name == "fidelity":
        return publish_fidelity(summary)
    if name == "validate":
        publish_table_iv(stage.workdir, summary, stage.tracking)
        return ["table-iv"] if summary.get("table_md") else []
    if name == "segmentation":
        publish_segmentation(summary)
        return ["segmentation-check"] if summary.get("md") else []
    return []
