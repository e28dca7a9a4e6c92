"""Prefect tasks for the seed stages: phantoms, ingest, preprocess."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from dermt2im import ingest as ingest_mod
from dermt2im import phantoms as phantoms_mod
from dermt2im import preprocess as preprocess_mod
from dermt2im.config import IngestConfig, PhantomConfig, PreprocessConfig
from dermt2im.manifest import SEEDS, digest, read_manifest
from tasks.caching import content_key, retry_transient_only, source_of, tree_listing


def _phantoms_key(context, p) -> str:
    out = Path(p["out"])
    return content_key("phantoms", p["n"], p["seed"], p["style"], p["size"], p["hair_probability"],
                       str(out), (out / "labels.csv").is_file(), source_of(phantoms_mod.render_phantom))


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
    manifest = Path(p["manifest"])
    return content_key("ingest", tree_listing(p["source"]), cfg.model_dump(mode="json"), p.get("layout"),
                       p.get("split"), str(manifest), manifest.is_file(), source_of(ingest_mod))


@task(name="ingest", cache_key_fn=_ingest_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def ingest_task(source: str, manifest: str, cfg: IngestConfig, layout: str | None = None,
                split: str | None = None) -> dict:
    report = ingest_mod.ingest_source(Path(source), Path(manifest), cfg, layout=layout, split=split)
    create_markdown_artifact(
        key="ingest-summary" if split is None else f"ingest-{split}-summary",
        markdown=f"### Ingest of `{source}`\n\n```\n{report.summary()}\n```\n",
        description="seed ingest counts and quarantine reasons",
    )
    return {"manifest": str(report.manifest_path), "accepted": report.accepted,
            "quarantined": report.quarantined, "digest": digest(report.manifest_path, SEEDS)}


def _preprocess_key(context, p) -> str:
    cfg: PreprocessConfig = p["cfg"]
    manifest = Path(p["manifest"])
    df = read_manifest(manifest, SEEDS)
    accepted = df[df["status"] == "accepted"]
    expected = {preprocess_mod.preprocess_key(s, cfg) for s in accepted["sample_id"]}
    done = set(accepted["preprocess_key"].dropna())
    files_ok = bool(accepted["processed_path"].map(lambda x: isinstance(x, str) and Path(x).is_file()).all())
    return content_key("preprocess", digest(manifest, SEEDS, ["source_path", "sample_id", "status"]),
                       sorted(expected), expected <= done and files_ok, cfg.model_dump(mode="json", exclude={"workers"}),
                       p["out_dir"], source_of(preprocess_mod))


@task(name="preprocess", cache_key_fn=_preprocess_key, persist_result=True, retries=2,
      retry_condition_fn=retry_transient_only, tags=["cpu"])
def preprocess_task(manifest: str, out_dir: str, cfg: PreprocessConfig, max_pixels: int) -> dict:
    report = preprocess_mod.preprocess_manifest(Path(manifest), Path(out_dir), cfg, max_pixels=max_pixels)
    create_markdown_artifact(
        key="preprocess-summary",
        markdown=f"### Preprocess of `{manifest}`\n\n```\n{report.summary()}\n```\n",
        description="hair removal and resizing",
    )
    return {"manifest": manifest, "processed": report.processed, "cached": report.cached,
            "failed": report.failed, "digest": digest(Path(manifest), SEEDS)}


__all__ = ["ingest_task", "make_phantoms_task", "phantom_sets", "preprocess_task"]
