"""Prefect tasks for the seed stages: phantoms, ingest, preprocess."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from dermt2im.ingest import stage as ingest_mod
from dermt2im.core import storage
from dermt2im import phantoms as phantoms_mod
from dermt2im.preprocess import stage as preprocess_mod
from dermt2im.core.config import IngestConfig, PhantomConfig, PreprocessConfig
from dermt2im.core.manifest import SEEDS, digest, read_manifest
from tasks.caching import content_key, retry_transient_only, source_of, tree_listing


def _phantoms_key(context, p) -> str:
    out = Path(p["out"])
    return content_key("phantoms", p["n"], p["seed"], p["style"], p["size"], p["hair_probability"],
                       str(out), source_of(phantoms_mod.render_phantom))


@task(name="make_phantoms", cache_key_fn=_phantoms_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def make_phantoms_task(out: str, n: int, seed: int, style: str, size: int, hair_probability: float) -> str:
    return str(phantoms_mod.make_phantoms(Path(out), n, seed=seed, style=style, size=size,
                                          hair_probability=hair_probability))


def phantom_sets(data_dir: Path, cfg: PhantomConfig) -> tuple[Path, dict[str, Path]]:
    """Where the smoke preset's phantom seed set and its phantom test sets live."""
    seeds = data_dir / f"phantoms-seed-{cfg.seed_style}"
    tests = {f"phantom-{s}": data_dir / f"phantoms-test-{s}" for s in cfg.test_styles}
    return seeds, tests


def _ingest_key(context, p) -> str:
    cfg: IngestConfig = p["cfg"]
    return content_key("ingest", tree_listing(p["source"]), cfg.model_dump(mode="json"), p.get("layout"),
                       p.get("split"), str(p["manifest"]), source_of(ingest_mod))


@task(name="ingest", cache_key_fn=_ingest_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def ingest_task(source: str, manifest: str, cfg: IngestConfig, layout: str | None = None,
                split: str | None = None) -> dict:
    report = ingest_mod.ingest_source(Path(source), manifest, cfg, layout=layout, split=split)
    create_markdown_artifact(
        key="ingest-summary" if split is None else f"ingest-{split}-summary",
        markdown=f"### Ingest of `{source}`\n\n```\n{report.summary()}\n```\n",
        description="seed ingest counts and quarantine reasons",
    )
    return {"manifest": str(report.manifest_path), "accepted": report.accepted,
            "quarantined": report.quarantined, "digest": digest(report.manifest_path, SEEDS)}


def _ingested_rows(manifest: str | Path) -> list:
    """What ingest decided, ignoring the quarantines preprocess adds itself."""
    df = read_manifest(manifest, SEEDS)
    by_preprocess = df["reason"].fillna("").str.startswith("preprocess:")
    status = df["status"].where(~by_preprocess, "accepted")
    return sorted(zip(df["source_path"], df["sample_id"].fillna(""), status))


def _preprocess_key(context, p) -> str:
    cfg: PreprocessConfig = p["cfg"]
    return content_key("preprocess", _ingested_rows(p["manifest"]),
                       cfg.model_dump(mode="json", exclude={"workers"}), p["out_dir"], source_of(preprocess_mod))


def preprocess_outputs_missing(manifest: str | Path, cfg: PreprocessConfig) -> bool:
    df = read_manifest(manifest, SEEDS)
    accepted = df[df["status"] == "accepted"]
    if accepted.empty:
        return not storage.is_file(manifest)
    keys_ok = (accepted["preprocess_key"] == accepted["sample_id"].map(lambda s: preprocess_mod.preprocess_key(s, cfg))).all()
    files_ok = accepted["processed_path"].map(lambda x: isinstance(x, str) and Path(x).is_file()).all()
    return not (keys_ok and files_ok)


@task(name="preprocess", cache_key_fn=_preprocess_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def preprocess_task(manifest: str, out_dir: str, cfg: PreprocessConfig, max_pixels: int) -> dict:
    report = preprocess_mod.preprocess_manifest(manifest, Path(out_dir), cfg, max_pixels=max_pixels)
    create_markdown_artifact(
        key="preprocess-summary",
        markdown=f"### Preprocess of `{manifest}`\n\n```\n{report.summary()}\n```\n",
        description="hair removal and resizing",
    )
    return {"manifest": manifest, "processed": report.processed, "cached": report.cached,
            "failed": report.failed, "digest": digest(manifest, SEEDS)}


# Cache keys hash inputs only; these wrappers refresh the cache when a task's outputs are gone
# (a deleted manifest or processed folder), so a cache hit never hands back files that no longer exist.


def make_phantoms(out: str, n: int, seed: int, style: str, size: int, hair_probability: float) -> str:
    missing = not (Path(out) / "labels.csv").is_file()
    return make_phantoms_task.with_options(refresh_cache=missing)(out, n, seed, style, size, hair_probability)


def ingest(source: str, manifest: str, cfg: IngestConfig, layout: str | None = None, split: str | None = None) -> dict:
    missing = not storage.is_file(manifest)
    return ingest_task.with_options(refresh_cache=missing)(source, manifest, cfg, layout, split)


def preprocess(manifest: str, out_dir: str, cfg: PreprocessConfig, max_pixels: int) -> dict:
    missing = preprocess_outputs_missing(manifest, cfg)
    return preprocess_task.with_options(refresh_cache=missing)(manifest, out_dir, cfg, max_pixels)


__all__ = ["ingest", "make_phantoms", "preprocess", "ingest_task", "make_phantoms_task", "phantom_sets", "preprocess_task"]
