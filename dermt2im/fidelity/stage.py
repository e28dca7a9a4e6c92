"""The fidelity report as a stage: ``reports/fidelity.md``, ``reports/fidelity.csv`` and the figures
under ``reports/fidelity/``, one MLflow run per generation run (``tracking``).

One unit, the whole workdir; done when its stamp holds the current key: the accepted synthetic images
and what made them, the gate's per-image measures, the seeds and test sets, the ``fidelity`` spec, the
user embeddings' folders and the code. ``dermt2im report`` rebuilds it (a set brought with
``import-synthetic`` is then included), the generate flow runs it after the gate, and
``dermt2im export`` reads its table for the dataset card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import atomic_path, atomic_write_text
from dermt2im.core.manifest import FIDELITY, manifest_exists
from dermt2im.core.runtime import TrackingConfig
from dermt2im.core.specs import FidelityConfig, GenerateConfig, QualityConfig
from dermt2im.core.views import seeds_view, synthetic_view
from dermt2im.core.workdir import Workdir
from dermt2im.stage import Stamps

log = logging.getLogger(__name__)
NOISE_DESCRIPTION = "{n} images rendered by the random-weight tiny Stable Diffusion ({steps} steps)"


class FidelityError(DermT2imError, ValueError):
    """The report cannot be made as configured (two embeddings of one name)."""


def _transformation_value(v: object) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return str(v).strip(" ,") or "(none)"


def build(workdir: Workdir, cfg: FidelityConfig, quality: QualityConfig, generate: GenerateConfig, token: str,
          tracking: TrackingConfig | None) -> dict:
    """Collect the sets, compute the table, write the report and log the runs; returns the summary."""
    from dermt2im.fidelity import collect, memorisation, report, text
    from dermt2im.fidelity.embeddings import model_embedding
    from dermt2im.fidelity.measures import seed_rows, typicality_cut

    train, held = seed_rows(workdir)
    if len(train) < 2:
        return _skipped(workdir, f"no fidelity report: it needs accepted, preprocessed training seeds to compare "
                                 f"with, and {workdir.seeds_manifest} has {len(train)} (run `dermt2im ingest` and "
                                 "`dermt2im preprocess`)")
    seed_emb, cut = typicality_cut(workdir, quality.max_typicality_quantile)
    embeddings = [seed_emb, *(model_embedding(p) for p in cfg.embeddings)]
    names = [e.name for e in embeddings]
    if len(set(names)) != len(names):
        raise FidelityError(f"two embeddings share a name ({', '.join(names)}): give the model folders distinct names")
    train_paths = train["processed_path"].tolist()
    reference_entries = np.concatenate([memorisation.seed_reference(images) for images in
                                        _chunks(workdir, train_paths)]) if train_paths else np.zeros((0, 192))
    ex = collect.Extractors.create(workdir, embeddings, cfg, reference_entries, cut.calibration)
    k = cfg.frd_max_images
    reference = collect.measure_set(workdir, "reference", "training seeds", train.assign(path=train["processed_path"],
                                    sample_key=train["sample_id"]), ex, radiomics_for=k)
    sets = [collect.measure_set(workdir, "floor", "held-out real", held.assign(path=held["processed_path"],
                                sample_key=held["sample_id"]), ex, radiomics_for=k)] if len(held) else []
    for name, rows in sorted(collect.test_set_rows(workdir).items()):
        sets.append(collect.measure_set(workdir, "test", name, rows, ex, radiomics_for=k))
    runs = collect.generation_runs(workdir, generate)
    known = collect.gate_measures(workdir)
    for run in runs:
        rows = run.rows.assign(transformation=run.rows["transformation"].map(_transformation_value))
        sets.append(collect.measure_set(workdir, "synthetic", run.source, rows, ex, radiomics_for=k, run=run.id,
                                        description=run.describe(), known=known))
    noise_text = ""
    if cfg.noise_images:
        size = collect.synthetic_size(runs, int(np.median([_side(workdir, p) for p in train_paths[:8]])))
        noise = collect.noise_images(workdir, cfg.noise_images, size, generate.prompt, token)
        noise_text = NOISE_DESCRIPTION.format(n=len(noise), steps=collect.NOISE_STEPS) + f" at {size[0]}x{size[1]} px"
        sets.append(collect.measure_set(workdir, "ceiling", "noise", noise, ex, radiomics_for=k,
                                        description=noise_text))
    ex.save()
    floor = next((s for s in sets if s.kind == "floor"), None)
    copy_cut = memorisation.copy_cut(floor.rows["nearest_seed"].to_numpy(float)) if floor is not None else float("nan")
    tab = report.table(sets, reference, names, cfg, copy_cut)
    responses = [r for s in sets if s.kind == "synthetic" and (r := report.skin_tone_response(s, cfg.bootstrap))]
    files = _write(workdir, tab, sets, reference, copy_cut)
    ctx = text.Context(
        reference=reference.rows["label"].value_counts().to_dict(), floor=len(held),
        test_sets={s.name: len(s) for s in sets if s.kind == "test"},
        runs={r.id: f"{r.describe()}; {len(r.rows)} accepted images" for r in runs},
        embeddings=[e.label for e in embeddings], noise=noise_text or "none (fidelity.noise_images: 0)",
        typicality=cut.summary(), copy_cut=copy_cut, responses=responses, gate=_gate_counts(workdir),
        gate_by_tone=_gate_by_skin_tone(workdir, known),
        figures={k: str(Path(v).relative_to(workdir.reports)) for k, v in files["figures"].items()},
        radiomics=(f"FRD on {', '.join(cfg.frd_filters)} features of L*, a*, b* at {cfg.frd_size} px"
                   if cfg.frd else ""))
    md = atomic_write_text(workdir.reports / "fidelity.md", text.render(tab, ctx))
    metric_columns = report.metric_names(names, cfg.frd)
    mlflow_runs = {}
    if tracking is not None and runs:
        info = {r.id: {"params": {**r.params, "embeddings": "; ".join(ctx.embeddings)}, "source": r.source,
                       "key": _run_key(r)} for r in runs}
        descriptions = {r.id: _run_sentence(tab, r.id, names[0]) for r in runs}
        mlflow_runs = _log(workdir, tracking, tab, info, metric_columns, [md, files["csv"], *files["figures"].values()],
                           descriptions)
    summary = {"md": str(md), "csv": str(files["csv"]), "figures": {k: str(v) for k, v in files["figures"].items()},
               "runs": {r.id: {"source": r.source, "images": len(r.rows), "mlflow_run_id": mlflow_runs.get(r.id)}
                        for r in runs},
               "embeddings": ctx.embeddings, "skin_tone": [r.sentence() for r in responses],
               "typicality": cut.summary()}
    summary["text"] = _summary_text(tab, summary, names[0])
    return summary


def _skipped(workdir: Workdir, why: str) -> dict:
    """The report says why there is none; the table is empty."""
    md = atomic_write_text(workdir.reports / "fidelity.md", f"# Fidelity of the synthetic sets\n\n{why}.\n")
    csv = workdir.reports / "fidelity.csv"
    with atomic_path(csv) as tmp:
        pd.DataFrame(columns=["kind", "set", "run", "stratum", "value", "n", "n_reference"]).to_csv(tmp, index=False)
    log.warning("%s", why)
    return {"md": str(md), "csv": str(csv), "figures": {}, "runs": {}, "embeddings": [], "skin_tone": [],
            "typicality": {}, "skipped": why, "text": why}


def _log(workdir, tracking, tab, info, names, files, descriptions) -> dict[str, str]:
    from dermt2im.fidelity.tracking import log_runs

    return log_runs(workdir, tracking, tab, info, names, files, descriptions)


def _chunks(workdir: Workdir, paths: Sequence[str]):
    from dermt2im.fidelity.measures import batches

    yield from batches(workdir, list(paths))


def _side(workdir: Workdir, path: str) -> int:
    from dermt2im.fidelity.measures import load_image

    return int(min(load_image(workdir, path).shape[:2]))


def _run_key(run) -> str:
    return identity.frame_digest(run.rows, ["sample_key", "sha256"])[:16]


def _run_sentence(tab: pd.DataFrame, run: str, emb: str) -> str:
    from dermt2im.fidelity.text import cell

    row = tab[(tab["kind"] == "synthetic") & (tab["run"] == run) & (tab["stratum"] == "all")]
    floor = tab[(tab["kind"] == "floor") & (tab["stratum"] == "all")]
    ceiling = tab[(tab["kind"] == "ceiling") & (tab["stratum"] == "all")]
    if row.empty:
        return ""
    r = row.iloc[0]
    parts = [f"Fidelity of {run} ({int(r['n'])} accepted images): KID ({emb}) {cell(r, f'kid.{emb}')}"]
    if len(floor):
        parts.append(f"held-out real {cell(floor.iloc[0], f'kid.{emb}')}")
    if len(ceiling):
        parts.append(f"noise {cell(ceiling.iloc[0], f'kid.{emb}')}")
    return "; ".join(parts) + f"; precision {cell(r, f'precision.{emb}')}, recall {cell(r, f'recall.{emb}')}."


def _summary_text(tab: pd.DataFrame, summary: dict, emb: str) -> str:
    from dermt2im.fidelity.figures import set_label
    from dermt2im.fidelity.text import cell

    lines = [f"fidelity report: {summary['md']} (embeddings: {', '.join(summary['embeddings'])})"]
    for _, r in tab[tab["stratum"] == "all"].iterrows():
        lines.append(f"  {set_label(r['kind'], r['set'], r['run'])}: n={int(r['n'])}, KID {cell(r, f'kid.{emb}')}, "
                     f"precision {cell(r, f'precision.{emb}')}, recall {cell(r, f'recall.{emb}')}")
    lines += [f"  skin tone: {s}" for s in summary["skin_tone"]]
    return "\n".join(lines)


def _gate_counts(workdir: Workdir) -> dict[str, dict[str, int]]:
    df = synthetic_view(workdir)
    if df.empty:
        return {}
    df = df.assign(source=df["source"].fillna("dermt2im"))
    out = {}
    for source, g in df.groupby("source", sort=True):
        out[str(source)] = {"accepted": int((g["status"] == "accepted").sum()),
                            "rejected": int((g["status"] == "rejected").sum()),
                            "near-copies found by the audit": int(g["memorised"].fillna(False).astype(bool).sum())}
    return out


def _gate_by_skin_tone(workdir: Workdir, known: pd.DataFrame | None) -> list[dict]:
    """The gate's decisions per source and skin-tone category of the assessed images."""
    from dermt2im.fidelity.skin_tone import BIN_NAMES, UNDEFINED

    df = synthetic_view(workdir)
    if known is None or df.empty:
        return []
    df = df[df["status"].isin(["accepted", "rejected"])].assign(source=df["source"].fillna("dermt2im"))
    merged = df.merge(known[["sample_key", "sha256", "skin_tone"]], on=["sample_key", "sha256"], how="inner")
    out = []
    for source, per_source in merged.groupby("source", sort=True):
        for tone in (*BIN_NAMES, UNDEFINED):
            g = per_source[per_source["skin_tone"] == tone]
            if len(g):
                rejected = int((g["status"] == "rejected").sum())
                out.append({"source": str(source), "skin tone": tone, "assessed": len(g), "rejected": rejected,
                            "share rejected": f"{rejected / len(g):.0%}"})
    return out


def _write(workdir: Workdir, tab: pd.DataFrame, sets, reference, copy_cut: float) -> dict:
    from dermt2im.fidelity import figures

    reports = workdir.reports
    folder = reports / "fidelity"
    folder.mkdir(parents=True, exist_ok=True)
    csv = reports / "fidelity.csv"
    with atomic_path(csv) as tmp:
        tab.to_csv(tmp, index=False)
    emb = next((c.split(".", 1)[1] for c in tab.columns if c.startswith("kid.") and not c.endswith(
        (".low", ".high", ".n"))), None)
    headline = [m for m in (f"kid.{emb}" if emb else "", "frd", f"precision.{emb}" if emb else "",
                            f"coverage.{emb}" if emb else "") if m]
    made = {
        "per-class metrics": figures.strata_bars(tab, "label", headline, folder / "per_class.png",
                                                 "Per class, with bootstrap intervals"),
        "per-sampler metrics": figures.strata_bars(tab, "sampler", headline, folder / "per_sampler.png",
                                                   "Per sampler, with bootstrap intervals"),
        "skin tone (ITA)": figures.ita_histogram(sets, reference, folder / "ita.png"),
        "nearest-seed distances": figures.nearest_seed_histogram(sets, copy_cut, folder / "nearest_seed.png"),
    }
    return {"csv": csv, "figures": {k: v for k, v in made.items() if v is not None}}


class FidelityStage:
    """The fidelity report: one unit; see the module docstring."""

    name = "fidelity"
    UNIT = "report"

    def __init__(self, workdir: Workdir, cfg: FidelityConfig, quality: QualityConfig, generate: GenerateConfig,
                 token: str = "sks", tracking: TrackingConfig | None = None) -> None:
        self.workdir, self.cfg, self.quality, self.generate, self.token = workdir, cfg, quality, generate, token
        self.tracking = tracking
        self.stamps = Stamps(workdir.stamps, self.name)

    @classmethod
    def of(cls, workdir: Workdir, config) -> "FidelityStage":
        """The stage for a factory config."""
        return cls(workdir, config.fidelity, config.quality, config.generate, config.train.instance_token,
                   config.tracking)

    def units(self) -> list[str]:
        return [self.UNIT]

    def describe(self, unit: str) -> str:
        return "fidelity report"

    def key(self, unit: str) -> str:
        from dermt2im.fidelity.embeddings import check_model_folder, folder_digest

        w = self.workdir
        synthetic = identity.frame_digest(synthetic_view(w), [
            "sample_key", "sha256", "status", "source", "label", "sampler", "transformation", "prompt", "base_model",
            "lora_sha256", "lora_scale", "width", "height", "memorised"])
        measured = identity.manifest_digest(w.fidelity_manifest, FIDELITY) if manifest_exists(w.fidelity_manifest) else ""
        seeds = identity.frame_digest(seeds_view(w.seeds_manifest), ["sample_id", "status", "split", "label",
                                                                     "processed_path", "preprocess_key"])
        tests = [(str(p), identity.frame_digest(seeds_view(p), ["sample_id", "status", "processed_path",
                                                                "preprocess_key"]))
                 for p in storage.files_in(w.test_sets_folder, ".parquet")]
        models = [folder_digest(check_model_folder(p)) for p in self.cfg.embeddings]
        return identity.content_key("fidelity", synthetic, measured, seeds, tests, identity.spec_digest(self.cfg),
                                    self.quality.max_typicality_quantile, self.generate.prompt,
                                    list(self.generate.transformations), self.token, models,
                                    self.tracking is not None, identity.code_digest(__name__))

    def finished(self, unit: str, key: str) -> dict | None:
        if not (self.workdir.reports / "fidelity.md").is_file() or not (self.workdir.reports / "fidelity.csv").is_file():
            return None
        return self.stamps.matching(unit, key)

    def run(self, unit: str, key: str) -> dict:
        summary = build(self.workdir, self.cfg, self.quality, self.generate, self.token, self.tracking)
        self.stamps.write(unit, key, json.loads(json.dumps(summary, default=str)))
        return summary

    def close(self, results) -> dict:
        return results[0]
