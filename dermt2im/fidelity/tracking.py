"""The fidelity report in MLflow: one run per generation run, so that runs (samplers, LoRA scales,
steps, base models, imported sets) are compared in MLflow's compare view; and the lines Table IV's
verdict takes from them.

A fidelity run is tagged ``dermt2im.kind = fidelity`` with its ``dermt2im.generation_run`` and
``dermt2im.source``; its parameters say what made the images, its metrics are every figure of the
report for that run, keyed ``<stratum>/<value>/<metric>`` (``all/all/kid.seed-cnn``,
``label/benign/frd``, ``sampler/euler/precision.seed-cnn``) with ``.low``, ``.high`` and ``.n``, and
the floor's and the ceiling's beside them (``floor/...``, ``ceiling/...``) so each figure is read
against what real images and noise score. The report's files are its artifacts. The same images
measured the same way log into the same run again (``dermt2im.fidelity_key``); other images get a
new run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from dermt2im.core.runtime import TrackingConfig
from dermt2im.core.tracking import RunRecord, Tracker, open_tracker
from dermt2im.core.workdir import Workdir

KIND = "fidelity"
SUFFIXES = ("", ".low", ".high", ".n")


def metric_key(*parts: str) -> str:
    """Parts joined by '/', each with what MLflow refuses in a metric name replaced."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(p)).strip() for p in parts)


def _metrics(rows: pd.DataFrame, names: Sequence[str], prefix: str = "") -> dict[str, float]:
    out = {}
    for _, r in rows.iterrows():
        for m in names:
            for s in SUFFIXES:
                v = r.get(m + s)
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    out[metric_key(*(p for p in (prefix, r["stratum"], str(r["value"]), m + s) if p))] = float(v)
    return out


def run_metrics(tab: pd.DataFrame, run: str, names: Sequence[str]) -> dict[str, float]:
    mine = tab[(tab["kind"] == "synthetic") & (tab["run"] == run)]
    out = _metrics(mine, names)
    for kind in ("floor", "ceiling"):
        ref = tab[(tab["kind"] == kind) & tab["stratum"].isin(["all", "label"])]
        out.update(_metrics(ref, names, kind))
    return out


def log_runs(workdir: Workdir, tracking: TrackingConfig, tab: pd.DataFrame, runs: Mapping[str, dict],
             names: Sequence[str], files: Sequence[Path], description: Mapping[str, str]) -> dict[str, str]:
    """One MLflow run per generation run (``runs``: id -> {params, key, source}); returns id -> MLflow run id."""
    tracker = open_tracker(workdir, tracking)
    out = {}
    for run_id, info in runs.items():
        flt = (f"tags.`dermt2im.kind` = '{KIND}' and tags.`dermt2im.generation_run` = '{run_id}' "
               f"and tags.`dermt2im.fidelity_key` = '{info['key']}'")
        found = tracker.runs(flt, order_by=["attributes.start_time DESC"], limit=1)
        if found:
            rid = found[0].run_id
            tracker.reopen(rid)
        else:
            rid = tracker.start(f"fidelity {run_id}", tags={"dermt2im.kind": KIND, "dermt2im.generation_run": run_id,
                                                            "dermt2im.source": info["source"],
                                                            "dermt2im.fidelity_key": info["key"]})
            tracker.log_params(rid, info["params"])
        try:
            tracker.log_metrics(rid, run_metrics(tab, run_id, names))
            for f in files:
                tracker.log_file(rid, f, "fidelity")
            tracker.set_description(rid, description.get(run_id, ""))
        except BaseException:
            tracker.finish(rid, "FAILED")
            raise
        tracker.finish(rid)
        out[run_id] = rid
    return out


# --- Table IV -------------------------------------------------------------------------------------


def newest_by_source(tracker: Tracker) -> dict[str, RunRecord]:
    runs = tracker.runs(f"tags.`dermt2im.kind` = '{KIND}' and attributes.status = 'FINISHED'",
                        order_by=["attributes.end_time DESC"])
    out: dict[str, RunRecord] = {}
    for r in runs:
        out.setdefault(r.tags.get("dermt2im.source", ""), r)
    return out


def _value(record: RunRecord, key: str) -> str:
    m = record.metrics
    v = m.get(key)
    if v is None:
        return "n/a"
    lo, hi = m.get(key + ".low"), m.get(key + ".high")
    return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def fidelity_lines(tracker: Tracker, table: pd.DataFrame, embedding: str = "seed-cnn") -> list[str]:
    """For each regime that trained on synthetic images, the fidelity of the set it used (the newest
    fidelity run of each source it drew on), against the floor and the ceiling."""
    if table.empty or "synthetic_source" not in table:
        return []
    fidelity = newest_by_source(tracker)
    if not fidelity:
        return ["No fidelity report in MLflow yet for the synthetic sets (run `dermt2im report`)."]
    out, seen = [], set()
    for _, row in table[table["regime"] != "baseline"].iterrows():
        named = str(row.get("synthetic_source") or "all")
        sources = sorted(fidelity) if named in ("all", "none", "") else [named]
        for source in sources:
            if (row["regime"], source) in seen or source not in fidelity:
                continue
            seen.add((row["regime"], source))
            r = fidelity[source]
            kid, prec, rec, cov = (metric_key("all", "all", f"{m}.{embedding}") for m in
                                   ("kid", "precision", "recall", "coverage"))
            floor, ceiling = metric_key("floor", "all", "all", f"kid.{embedding}"), metric_key("ceiling", "all", "all",
                                                                                                 f"kid.{embedding}")
            frd = metric_key("all", "all", "frd")
            out.append(f"Fidelity of the synthetic images {row['regime']} drew on (source {source}, MLflow run "
                       f"{r.run_id}): KID ({embedding}) {_value(r, kid)} against {_value(r, floor)} for held-out real "
                       f"images and {_value(r, ceiling)} for noise; FRD {_value(r, frd)}; precision {_value(r, prec)}, "
                       f"recall {_value(r, rec)}, coverage {_value(r, cov)} (reports/fidelity.md).")
    return out
