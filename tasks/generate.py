"""Prefect tasks for generation: plan, render one shard (tag ``gpu``), quality gate + audit, and the
artifacts people look at. Tasks return paths and digests, never pipelines or images.

Cache keys hash content: the plan key is the generate config + token + requested size; a shard's
key is the render keys of its plan rows (prompt, sampler, steps, CFG, seed, size, LoRA scale, base
model identity, LoRA sha256) plus the dtype and the task's code; the assess key is the images'
sha256s, the seeds and the quality config. A cached result only says the work was done: the flow
checks the files cheaply first and passes ``refresh_cache=True`` when any are missing (see
``flows.generate``), so a deleted PNG or report is made again instead of being served from cache.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from dermt2im.generate import stage as gen
from dermt2im.quality import stage as quality_mod
from dermt2im.core.config import FactoryConfig, GenerateConfig
from dermt2im.core.manifest import PLAN, SEEDS, SYNTHETIC, digest, read_manifest, writer_lock
from dermt2im.generate.plan import build_plan, shards_of, update_plan
from dermt2im.core.workdir import Workdir
from tasks.caching import content_key, retry_transient_only, source_of


# ---------------------------------------------------------------------------------------------
# plan


# How the work is run, not what is planned: changing these must not re-plan.
RUNTIME_ONLY = {"batch_size", "writer_threads", "lease_seconds", "parallel_workers", "worker_deployment", "device"}


def _plan_key(context, p) -> str:
    cfg: GenerateConfig = p["cfg"]
    planned = cfg.model_dump(mode="json", exclude=RUNTIME_ONLY)
    where = [p["manifests"]] if p.get("manifests") else []  # only when set: the default keeps its earlier keys
    return content_key("plan", str(Path(p["workdir"]).resolve()), *where, planned, p["token"],
                       p.get("per_class"), source_of(update_plan))


def plan_is_complete(workdir: Workdir, cfg: GenerateConfig, token: str, per_class: int | None) -> bool:
    """Every row the config asks for is in the plan file (cheap: compares keys only)."""
    have = read_manifest(workdir.plan_manifest, PLAN)
    wanted = build_plan(cfg, token=token, per_class=per_class)
    return set(wanted["sample_key"]) <= set(have["sample_key"])


@task(name="plan", cache_key_fn=_plan_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def plan_task(workdir: str, cfg: GenerateConfig, token: str, per_class: int | None = None,
              manifests: str | None = None) -> dict:
    """Create or extend the plan; ``manifests`` is ``storage.manifests`` (None: W/manifests)."""
    w = Workdir.at(workdir, manifests)
    with writer_lock(w.plan_manifest, w.locks):
        plan = update_plan(w.plan_manifest, cfg, token=token, per_class=per_class)
    return {
        "plan": str(w.plan_manifest),
        "planned": len(plan),
        "per_label": {str(k): int(v) for k, v in plan["label"].value_counts().sort_index().items()},
        "shards": shards_of(plan),
        "digest": digest(w.plan_manifest, PLAN),
    }


# ---------------------------------------------------------------------------------------------
# render one shard


def _lora(p: dict) -> Path | None:
    return Path(p["lora"]) if p.get("lora") else None


def _render_key(context, p) -> str:
    cfg: FactoryConfig = p["cfg"]
    w = Workdir.of(p["workdir"], cfg)
    parts = gen.shard_cache_key_parts(w, cfg, int(p["shard"]), _lora(p))
    return content_key("render-shard", parts, source_of(gen.render_shard), source_of(gen.render_batch))


@task(name="render_shard", cache_key_fn=_render_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["gpu"],
      task_run_name="render-shard-{shard}")
def render_shard_task(workdir: str, cfg: FactoryConfig, shard: int, lora: str | None = None) -> dict:
    """Render what is missing in one shard (idempotent); returns the shard's files and digests."""
    w = Workdir.of(workdir, cfg)
    recorded = gen.render_shard(w, cfg, int(shard), lora=Path(lora) if lora else None)
    df = read_manifest(w.synthetic_manifest, SYNTHETIC)
    rows = df[df["shard"] == int(shard)]
    return {
        "shard": int(shard),
        "rendered": len(recorded),
        "images": len(rows),
        "paths": rows["path"].tolist(),
        "sha256": rows["sha256"].tolist(),
    }


# ---------------------------------------------------------------------------------------------
# quality gate + memorisation audit


def _assess_key(context, p) -> str:
    cfg: FactoryConfig = p["cfg"]
    w = Workdir.of(p["workdir"], cfg)
    images = digest(w.synthetic_manifest, SYNTHETIC, ["sample_key", "sha256", "render_key"])
    seeds = digest(w.seeds_manifest, SEEDS, ["source_path", "sample_id", "status", "processed_path"])
    where = [str(w.manifests)] if w.manifest_store else []  # only when set: the default keeps its earlier keys
    return content_key("assess", str(w.root), *where, images, seeds, cfg.quality.model_dump(mode="json"),
                       source_of(quality_mod))


def assess_is_current(workdir: Workdir) -> bool:
    """Reports exist and no image waits for assessment (status 'rendered')."""
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    return (workdir.reports / "quality.json").is_file() and not (df["status"] == "rendered").any()


@task(name="assess", cache_key_fn=_assess_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def assess_task(workdir: str, cfg: FactoryConfig) -> dict:
    w = Workdir.of(workdir, cfg)
    report = quality_mod.assess(w, cfg)
    return {
        "accepted": report.accepted,
        "rejected": report.rejected,
        "reasons": report.reasons,
        "memorised": report.memorised,
        "seeds_compared": report.seeds_compared,
        "report_dir": str(report.report_dir),
        "files": {k: str(v) for k, v in report.files.items()},
        "summary": report.summary(),
        "manifest_digest": digest(w.synthetic_manifest, SYNTHETIC),
    }


# ---------------------------------------------------------------------------------------------
# artifacts (called from the flow on every run, cached or not)


def publish_reports(workdir: Workdir, assessed: dict) -> list[str]:
    """Markdown (quality counts, audit), a table of counts by class, and the grids as image artifacts."""
    made = []
    reports = workdir.reports
    md = reports / "quality.md"
    audit = reports / "audit" / "audit.md"
    body = [f"```\n{assessed.get('summary', '')}\n```", ""]
    if md.is_file():
        body.append(md.read_text())
    if audit.is_file():
        body += ["", audit.read_text()]
    create_markdown_artifact(key="generate-quality", markdown="\n".join(body),
                             description="quality gate counts and memorisation audit")
    made.append("generate-quality")
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    table = quality_mod.quality_tables(df)["by_label"] if not df.empty else []
    if table:
        create_table_artifact(table=table, key="generate-counts", description="accepted / rejected by reason, per class")
        made.append("generate-counts")
    for name, path in sorted(assessed.get("files", {}).items()):
        p = Path(path)
        if p.suffix == ".png" and p.is_file():
            key = "generate-" + name.replace("_", "-").lower()
            create_image_artifact(image_url=p.resolve().as_uri(), key=key, description=f"{name}: {p}")
            made.append(key)
    return made
