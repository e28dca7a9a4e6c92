"""The automatic quality gate and the memorisation audit over the synthetic images.

The paper discarded images "with noisy artifacts" by hand; here every image, rendered by the factory
(``synthetic.parquet``) or imported (``imported.parquet``, ``dermt2im.generate.imports``), is
measured and scanned by the detectors (``checks``), compared with the seeds (``audit``) and with the
other images of its source (``dedupe``), and the flags of the accepted ones are audited per class
(``shortcuts``). A rejected image keeps its file. Cuts left empty in the config are calibrated on the
workdir's real seeds (``calibrate``, ``seeds``); ``report`` and ``figures`` write what people look at
(``W/reports``; nothing reads them back).

What the gate decides is written by this stage alone, into tables of its own keyed by the image's
``sample_key`` (it never writes the renders' or the imports' manifests): ``quality.parquet``, one
verdict per image with the ``sha256`` it judged (``status`` accepted / rejected, a ``reason`` whose
first word is the check that failed, every measure, score and flag, the audit's nearest seed), and
``flag_rates.parquet`` beside it (the shortcut audit). Readers join the verdicts to the images
(``dermt2im.core.views.synthetic_view``); a verdict on bytes re-rendered since joins nothing.

``QualityStage`` is the stage: one unit, the whole synthetic set. The per-image work (measures,
detectors, the audit against the seeds, thumbnails, skin tone) is apart from the decisions
(``measures``): in a generate pipeline it is done while rendering goes on, each batch handed to
worker processes as soon as it is written (``pool``, ``QualityStage.rendered``), and kept by image
bytes in ``W/quality/measures``. When the stage runs it reads what is kept, measures what is not
(imports, renders made elsewhere), and takes the decisions on the whole set: cuts calibrated on the
seeds, duplicates across shards, the shortcut audit and its balancing, typicality. A verdict is the
same whether its image was measured while rendering or after (``tests/quality/test_measuring``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.manifest import FIDELITY, FLAG_RATES, QUALITY, manifest_exists, read_manifest, rewrite, write_manifest
from dermt2im.core.runtime import QualityRuntime
from dermt2im.core.specs import ATYPICAL, QualityConfig
from dermt2im.core.views import made_synthetic, seeds_view
from dermt2im.core.workdir import Workdir
from dermt2im.core.writers import compact, writer_lock
from dermt2im.quality.calibrate import cut_table, resolve_cuts, seed_rejections
from dermt2im.quality.checks import SCORE_COLUMNS, flags_of, judge, reason_code
from dermt2im.quality.dedupe import mark_duplicates, phash_hex
from dermt2im.quality.figures import OWN, audit_histogram, write_audit, write_grids
from dermt2im.quality.measures import MeasureCache, audit_key, measures_key
from dermt2im.quality.pool import MeasurePool, call_here, default_workers, fold_cache, measure_here
from dermt2im.quality.pool import cores as pool_cores
from dermt2im.quality.report import QualityReport, write_quality_reports
from dermt2im.quality.seeds import Seeds, load_seeds
from dermt2im.quality.shortcuts import Shortcut, audit_shortcuts
from dermt2im.stage import Stamps

log = logging.getLogger(__name__)
MEASURE_COLUMNS = ["grey_std", "saturated_fraction", "sharpness", "high_frequency_ratio", "lesion_fraction",
                   "lesion_contrast", *SCORE_COLUMNS.values()]
QUALITY_COLUMNS = [c for c in QUALITY.columns if c not in ("sample_key", "sha256")]  # what a verdict holds
QUARANTINED = "quarantined"  # imported files with bad input: never assessed, never used


def with_sources(df: pd.DataFrame) -> pd.DataFrame:
    """Rows without a ``source`` (made before imports existed) are the factory's own renders."""
    return df.assign(source=df["source"].fillna(OWN)) if len(df) else df


def measure_all(workdir: Workdir, df: pd.DataFrame, q: QualityConfig, seeds: Seeds,
                pool: MeasurePool | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Every image gated and audited: the frame with the quality columns filled, and the measures
    (small thumbnails and hashes; never the full pixels). Measures kept in the cache for these bytes
    are read (``measures``: made while rendering, or by an earlier run); the rest are measured now, in
    ``pool``'s processes or, without one, in threads here. The verdicts come from the measures and the
    cuts of ``q`` alone (``checks.judge``)."""
    cache = MeasureCache(workdir.quality / "measures")
    keys = (measures_key(q), audit_key(seeds.key, q))
    sample_keys = [str(k) for k in df["sample_key"]]
    found: dict[int, dict] = {}
    running: set[str] = set()
    taken_back: set[str] = set()
    if pool is not None:  # what the workers measured while rendering, sent back: no cache part is read
        pool.take_back()
        handed, running, taken_back = pool.handed(seeds.key)
        found = {i: m for i, (k, sha) in enumerate(zip(sample_keys, df["sha256"]))
                 if (m := handed.get(k)) is not None and m.get("sha256") == sha and "audit" in m}
    rest = [i for i in range(len(df)) if i not in found and sample_keys[i] not in running]
    unknown = [i for i in rest if sample_keys[i] not in taken_back]  # not rendered by this process: maybe kept
    if unknown:
        kept = cache.lookup(df.iloc[unknown].reset_index(drop=True), *keys)
        found.update((unknown[j], m) for j, m in kept.items())
    paths = [storage.resolve(p, workdir.root) if isinstance(p, str) else Path("/nonexistent") for p in df["path"]]
    todo = [i for i in rest if "audit" not in found.get(i, {})]
    items = [(sample_keys[i], paths[i], found.get(i)) for i in todo]
    if pool is not None:
        fresh = pool.measure(items, seeds.key, seeds.index)
    else:
        fresh = measure_here(workdir, q, seeds.key, seeds.index, items)
    found.update(zip(todo, fresh))
    if running:  # the batches a worker was still on when rendering ended (measured beside this process)
        handed, _, _ = pool.handed(seeds.key, settle=True)
        late = [i for i in range(len(df)) if i not in found]
        found.update((i, m) for i in late if (m := handed.get(sample_keys[i])) is not None
                     and m.get("sha256") == df.at[i, "sha256"] and "audit" in m)
        again = [i for i in late if i not in found]  # a task that failed, or bytes changed since
        found.update(zip(again, measure_here(workdir, q, seeds.key, seeds.index,
                                             [(sample_keys[i], paths[i], None) for i in again])))
        todo += again
    if todo:
        log.info("quality gate: %d of %d image(s) measured now, %d measured before", len(todo), len(df),
                 len(df) - len(todo))
    measured = [found[i] for i in range(len(df))]
    out = df.copy()
    for c in QUALITY_COLUMNS:
        out[c] = None
    for i, m in enumerate(measured):
        if "metrics" in m:
            verdict = judge(m["metrics"], q)
            m["reason"], m["flags"] = verdict.reason, verdict.flags
        else:  # missing or unreadable: its reason says which
            m["metrics"], m["flags"] = {}, []
        for k, v in m["metrics"].items():
            out.at[i, k] = v
        out.at[i, "flags"] = ",".join(m["flags"])
        if "phash" in m:
            out.at[i, "phash"] = phash_hex(m["phash"])
    return out, measured


def fold_measures(workdir: Workdir, df: pd.DataFrame, measured: list[dict], q: QualityConfig,
                  pool: MeasurePool | None = None) -> Future:
    """Fold the measure cache's parts into its table (the current measures of ``df``'s images only):
    in a worker while this process writes the rest, when ``pool`` runs."""
    kept = {(k, m["sha256"]) for k, m in zip(df["sample_key"], measured) if "sha256" in m}
    args = (workdir.quality / "measures", kept, measures_key(q))
    return (pool.call if pool is not None else call_here)(fold_cache, *args)


def _apply_audit(out: pd.DataFrame, measured: list[dict], reasons: list[str | None], seeds: Seeds,
                 q: QualityConfig) -> list[dict]:
    rows = []
    for i, m in enumerate(measured):
        a = m.get("audit")
        if a is None or a.seed < 0:
            continue
        sid = seeds.index.ids[a.seed]
        out.at[i, "nearest_seed"], out.at[i, "nearest_seed_distance"] = sid, a.distance
        out.at[i, "memorised"], out.at[i, "audit_inliers"], out.at[i, "audit_method"] = a.memorised, a.inliers, a.method
        if a.memorised and q.exclude_memorised and reasons[i] is None:
            how = f"{a.inliers} verified keypoint matches" if a.method == "geometric" else f"distance {a.distance:.3f}"
            reasons[i] = f"near-copy of seed {sid} ({how})"
        rows.append({"i": i, "seed": a.seed, "distance": a.distance, "inliers": a.inliers, "method": a.method,
                     "memorised": a.memorised})
    return rows


def _apply_duplicates(out: pd.DataFrame, measured: list[dict], reasons: list[str | None], q: QualityConfig) -> None:
    """Duplicates among the images still accepted, within each source; the earliest sample is kept."""
    for _, group in out.groupby("source", sort=True):
        order = sorted((i for i in group.index if reasons[i] is None),
                       key=lambda i: (int(out.at[i, "index"]), str(out.at[i, "label"])))
        for i, (reason, j) in mark_duplicates(measured, order, q.near_duplicate_hamming,
                                              q.near_duplicate_max_distance).items():
            reasons[i] = reason.format(out.at[j, "sample_key"])
            out.at[i, "duplicate_of"] = out.at[j, "sample_key"]


def _apply_typicality(workdir: Workdir, out: pd.DataFrame, measured: list[dict], reasons: list[str | None],
                      q: QualityConfig, pool: MeasurePool | None = None) -> tuple[pd.DataFrame, dict]:
    """Typicality and skin tone of every readable image (``dermt2im.fidelity.measures``): the
    ``atypical`` flag where an image lies beyond the calibrated cut, a rejection when
    ``quality.reject_flags`` names it. Returns the fidelity manifest's rows and the cut's summary."""
    from dermt2im.fidelity.measures import image_measures

    readable = [i for i, m in enumerate(measured) if "thumb" in m]
    rows, cut = image_measures(workdir, out.iloc[readable], q.max_typicality_quantile,
                               [measured[i] for i in readable], pool.prepared_cut() if pool is not None else None)
    for i, atypical, typicality in zip(readable, rows["atypical"], rows["typicality"]):
        if atypical is None or pd.isna(atypical) or not atypical:
            continue
        out.at[i, "flags"] = ",".join(f for f in (out.at[i, "flags"], ATYPICAL) if f)
        if ATYPICAL in q.reject_flags and reasons[i] is None:
            reasons[i] = (f"atypical: farther from the training seeds than {q.max_typicality_quantile:.0%} of held-out "
                          f"real images in the learned embedding (typicality {typicality:.2f}; quality.reject_flags)")
    return rows, cut.summary()


def assess(workdir: Workdir, q: QualityConfig, pool: MeasurePool | None = None) -> QualityReport:
    """Gate and audit every rendered or imported image; write status / reason / scores and the reports.
    ``pool`` measures the images not measured yet (see ``measure_all``)."""
    df = with_sources(made_synthetic(workdir))
    seeds = load_seeds(workdir, q) if len(df) else None
    resolved = resolve_cuts(q, seeds.measures if seeds is not None else {})
    gate = {"cuts": cut_table(resolved), "seeds": len(seeds.rows) if seeds is not None else 0,
            "seed_checks": seed_rejections(seeds.rows.to_dict("records"), resolved.config) if seeds is not None else {}}
    todo = df[df["status"] != QUARANTINED].reset_index(drop=True)
    if todo.empty:
        log.warning("no synthetic images to assess in %s or %s", workdir.synthetic_manifest, workdir.imported_manifest)
        _save(workdir, todo.assign(**{c: None for c in QUALITY.columns if c not in todo.columns}), [], [])
        files = write_quality_reports(workdir, df, resolved.config, gate)
        return QualityReport(0, 0, {}, 0, workdir.reports, files, quarantined=len(df))
    if seeds.index.size == 0:
        log.warning("memorisation audit skipped: no accepted seed images with a processed image in %s",
                    workdir.seeds_manifest)
    out, measured = measure_all(workdir, todo, resolved.config, seeds, pool)
    folding = fold_measures(workdir, todo, measured, resolved.config, pool)
    reasons: list[str | None] = [m["reason"] for m in measured]
    audit_rows = _apply_audit(out, measured, reasons, seeds, q)
    histogram = audit_histogram(audit_rows, q, draw=pool.call if pool is not None else None)
    _apply_duplicates(out, measured, reasons, q)
    fidelity_rows, gate["typicality"] = _apply_typicality(workdir, out, measured, reasons, q, pool)
    accepted = out[[r is None for r in reasons]]
    seed_flags = seeds.rows.assign(flags=_seed_flags(seeds, resolved.config))
    gate["rates"], shortcuts, balanced = audit_shortcuts(accepted, seed_flags, q)
    gate["shortcuts"] = [s.sentence() for s in shortcuts]
    for i, reason in balanced.items():
        reasons[i] = reason
    out["reason"] = reasons
    out["status"] = ["rejected" if r else "accepted" for r in reasons]
    out["memorised"] = out["memorised"].astype("boolean")
    _save(workdir, out, gate["rates"], shortcuts)
    write_manifest(fidelity_rows, workdir.fidelity_manifest, FIDELITY)
    whole = pd.concat([out, df[df["status"] == QUARANTINED]], ignore_index=True)
    files = write_quality_reports(workdir, whole, resolved.config, gate)
    files.update(write_grids(workdir, out, measured))
    files.update(write_audit(workdir, out, measured, seeds.index, audit_rows, q, histogram=histogram))
    folded = folding.result()
    if folded:
        log.debug("folded %d part(s) into the measure cache", folded)
    codes = pd.Series([reason_code(r) for r in reasons if r], dtype=object).value_counts()
    report = QualityReport(
        accepted=int((out["status"] == "accepted").sum()), rejected=int((out["status"] == "rejected").sum()),
        reasons={str(k): int(v) for k, v in codes.items()}, memorised=int(out["memorised"].fillna(False).sum()),
        report_dir=workdir.reports, files=files, seeds_compared=seeds.index.size,
        shortcuts=tuple(gate["shortcuts"]), quarantined=int((df["status"] == QUARANTINED).sum()),
    )
    log.info("quality gate: %d accepted, %d rejected %s; %d near-copies of seeds", report.accepted,
             report.rejected, report.reasons, report.memorised)
    return report


def _seed_flags(seeds: Seeds, q: QualityConfig) -> list[str]:
    return [",".join(flags_of(r, q)) for r in seeds.rows.to_dict("records")]


def _save(workdir: Workdir, assessed: pd.DataFrame, rates: list[dict], shortcuts: list[Shortcut]) -> None:
    """The gate's tables, written by this stage only: ``quality.parquet``, one verdict per image (its
    ``sample_key`` and the ``sha256`` it assessed: a verdict on bytes re-rendered since is joined to
    nothing), replacing the whole table and any parts appended to it; and ``flag_rates.parquet``
    beside it, the shortcut audit (each called-out flag's sentence on the row of its higher class)."""
    verdicts = assessed[list(QUALITY.columns)].copy()
    with writer_lock(workdir.quality_manifest, workdir.locks):
        rewrite(workdir.quality_manifest, QUALITY, lambda _current: verdicts)
    called: dict[tuple[str, str], list[str]] = {}
    for s in shortcuts:
        called.setdefault((s.source, s.higher), []).append(s.sentence())
    table = pd.DataFrame(rates, columns=FLAG_RATES.columns)
    table["shortcut"] = ["; ".join(called.get((str(i), str(lab)), [])) or None
                         for i, lab in zip(table["images"], table["label"])]
    write_manifest(table, workdir.flag_rates_manifest, FLAG_RATES)


# --------------------------------------------------------------------------------------------------
# the stage

def report_summary(report: QualityReport) -> dict:
    return {"accepted": report.accepted, "rejected": report.rejected, "reasons": report.reasons,
            "memorised": report.memorised, "seeds_compared": report.seeds_compared,
            "shortcuts": list(report.shortcuts), "quarantined": report.quarantined,
            "report_dir": str(report.report_dir), "files": {k: str(v) for k, v in report.files.items()},
            "text": report.summary()}


class QualityStage:
    """The quality gate and memorisation audit: one unit, the whole synthetic set; done when its
    stamp holds the current key (images, seeds, ``quality`` spec, code), the reports exist and no
    image waits for assessment.

    It also listens to the renderer of its pipeline (``pipelines.generate``): ``rendering`` starts
    its measuring processes (``pool``) and makes the seeds ready, ``rendered`` hands them each batch
    of images as soon as it is written, so that by the time the gate runs the per-image work is done
    and only the whole-set steps are left (``runtime.quality``: how many processes, and whether to)."""

    name = "quality"
    UNIT = "synthetic"

    def __init__(self, workdir: Workdir, spec: QualityConfig, runtime: QualityRuntime | None = None) -> None:
        self.workdir, self.spec = workdir, spec
        self.runtime = runtime or QualityRuntime()
        self.stamps = Stamps(workdir.stamps, self.name)
        self.pool = MeasurePool(workdir, spec, self.runtime.workers)
        self._hand_over = False  # images go to the measuring processes while rendering (``rendering``)

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any) -> "QualityStage":
        """The stage as a factory config sets it up."""
        return cls(workdir, cfg.quality, cfg.runtime.quality)

    def __getstate__(self) -> dict[str, Any]:
        # processes are not sent anywhere: a copy starts its own when it measures
        return {**self.__dict__, "pool": MeasurePool(self.workdir, self.spec, self.runtime.workers)}

    # --- listening to the renderer ---

    def rendering(self, cores: int = 1) -> None:
        """Rendering starts in this process, keeping ``cores`` of the host's cores busy: measuring
        processes start on the cores left (at most ``runtime.quality.workers``), make the seeds
        ready and measure each batch as it is written. With none left (a CPU renderer on every core)
        they start all the same, make the seeds ready while the pipeline loads and wait: the gate
        measures once rendering is over, with every core. Beside a renderer whose threads fill the
        cores a measuring process only slows it (on 2 cores, rendering 64 tiny images on torch's 2
        threads took 1.67x the plain loop's time beside one; at the lowest priority, SCHED_IDLE, the
        renderer still lost 0.5 s and the worker measured 8 of the 64)."""
        if not self.runtime.while_rendering or self.pool.started:
            return
        free = pool_cores() - cores
        self._hand_over = free >= 1
        if not self._hand_over:
            # Started anyway: they make the seeds ready while the pipeline loads (one thread, mostly),
            # then wait idle until the gate runs, so that they measure at once instead of starting then.
            log.info("the renderer keeps every core busy (%d thread(s)): the gate measures once rendering is over",
                     cores)
            self.pool.start()
            return
        self.pool = MeasurePool(self.workdir, self.spec, min(self.runtime.workers or default_workers(), free))
        self.pool.start()

    def rendered(self, rows: Sequence[dict]) -> None:
        """These images are written (rows with ``sample_key`` and ``path``): measure them meanwhile
        (when ``rendering`` started measuring processes). Never fails the renderer: whatever is not
        measured now is measured when the gate runs."""
        if not self._hand_over:  # set by ``rendering`` where measuring processes have cores of their own
            return
        try:
            self.pool.soon([(str(r["sample_key"]), storage.resolve(r["path"], self.workdir.root), None) for r in rows])
        except Exception as err:  # noqa: BLE001 - measured later instead
            log.warning("could not hand %d image(s) to the gate's measuring processes: %s", len(rows), err)

    # --- the stage ---

    def units(self) -> list[str]:
        return [self.UNIT]

    def describe(self, unit: str) -> str:
        return "quality gate and memorisation audit"

    def key(self, unit: str) -> str:
        w = self.workdir
        made = made_synthetic(w)
        images = identity.frame_digest(made, ["sample_key", "sha256", "render_key", "source", "status"])
        return identity.content_key("assess", images, _seeds_digest(w), identity.spec_digest(self.spec),
                                    identity.code_digest(__name__))

    def finished(self, unit: str, key: str) -> dict | None:
        """Done when the stamp holds ``key`` and every image still has its verdict on its bytes."""
        w = self.workdir
        if not (w.reports / "quality.md").is_file() or not storage.is_file(w.flag_rates_manifest):
            return None
        made = made_synthetic(w)
        made = made[made["status"] != QUARANTINED]
        verdicts = read_manifest(w.quality_manifest, QUALITY)
        judged = set(zip(verdicts["sample_key"], verdicts["sha256"]))
        if not all(pair in judged for pair in zip(made["sample_key"], made["sha256"])):
            return None
        if len(made) and not manifest_exists(w.fidelity_manifest):
            return None
        return self.stamps.matching(unit, key)

    def run(self, unit: str, key: str) -> dict:
        try:  # the workers' queued batches are taken back and measured beside them (measure_all)
            summary = report_summary(assess(self.workdir, self.spec, self.pool))
        finally:
            self.pool.shutdown(wait=False)  # the workers exit while the verdicts are stamped and reported
        self.stamps.write(unit, key, summary)
        return summary

    def close(self, results) -> dict:
        self.pool.shutdown()  # also when the gate was up to date and the renderer had started it
        # Verdicts appended as parts of quality.parquet (on an object store, or by a gate run per
        # shard while rendering goes on) are folded in here, by this stage, the table's one writer.
        compact(self.workdir.quality_manifest, QUALITY, self.workdir.locks)
        return results[0]


class GateSeedsStage:
    """What the gate needs of the seeds, made once per seed set after preprocessing (the seeds
    pipeline), so that no generation run pays for it: the seeds measured for the calibrated cuts, their
    index for the memorisation audit (``seeds.load_seeds``), and the typicality embedding learned from
    the training seeds with its cut calibrated on the held-out ones (``fidelity.measures``). Each is
    kept by its own key, so the gate (and its measuring processes) read them back; whatever is
    missing (a new seed set, another ``quality`` spec) is still made when the gate needs it. One unit,
    done when its stamp holds the key (seeds, ``quality`` spec, code) and the embedding is kept."""

    name = "gate-seeds"
    UNIT = "seeds"

    def __init__(self, workdir: Workdir, spec: QualityConfig) -> None:
        self.workdir, self.spec = workdir, spec
        self.stamps = Stamps(workdir.stamps, self.name)

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any) -> "GateSeedsStage":
        return cls(workdir, cfg.quality)

    def units(self) -> list[str]:
        return [self.UNIT]

    def describe(self, unit: str) -> str:
        return "the seeds measured, indexed and embedded for the gate"

    def key(self, unit: str) -> str:
        return identity.content_key("gate-seeds", _seeds_digest(self.workdir), identity.spec_digest(self.spec),
                                    identity.code_digest(__name__))

    def finished(self, unit: str, key: str) -> dict | None:
        from dermt2im.fidelity.measures import embedding_kept, seed_rows

        train, _ = seed_rows(self.workdir)
        if len(train) >= 2 and not embedding_kept(self.workdir, train):
            return None
        return self.stamps.matching(unit, key)

    def run(self, unit: str, key: str) -> dict:
        from dermt2im.fidelity.measures import typicality_cut

        seeds = load_seeds(self.workdir, self.spec)
        _, cut = typicality_cut(self.workdir, self.spec.max_typicality_quantile)
        summary = {"seeds": int(seeds.index.size), "typicality": cut.summary(),
                   "text": f"gate seeds: {seeds.index.size} seed(s) measured and indexed; typicality "
                           + (f"embedding {cut.embedding}, cut {cut.calibration.cut:.3f} on {cut.held_out} held-out"
                              if cut.calibration is not None else f"not calibrated ({cut.why_not})")}
        self.stamps.write(unit, key, summary)
        return summary

    def close(self, results) -> dict:
        return results[0] if results else {}


def _seeds_digest(workdir: Workdir) -> str:
    return identity.frame_digest(seeds_view(workdir.seeds_manifest), ["source_path", "sample_id", "status", "split",
                                                                      "label", "processed_path", "preprocess_key",
                                                                      "hair_fraction"])
