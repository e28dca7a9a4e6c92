"""The gate measures images while rendering goes on, in worker processes, and keeps the measures: the
verdicts are the ones measuring after rendering gives, measures are read back instead of measured
again, and measured again when the bytes (or, for the audit, the seeds) change."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
from pandas.testing import assert_frame_equal

from dermt2im import pipelines
from dermt2im.core.config import load_config
from dermt2im.core.fileio import atomic_write_bytes, sha256_bytes
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import FIDELITY, FLAG_RATES, QUALITY, SYNTHETIC, read_manifest, write_manifest
from dermt2im.core.views import synthetic_view
from dermt2im.core.workdir import Workdir
from dermt2im.quality import measures
from dermt2im.quality.measures import MeasureCache, audit_key, measures_key
from dermt2im.quality.stage import QualityStage, assess
from dermt2im.runners.sequential import run_pipeline
from tests.quality.gate_config import tiny_with_full_gate
from tests.quality.test_quality import altered_copy, bad_images, phantom, seed_workdir, synthetic_workdir

RENDER = ["generate.per_class=4", "generate.shard_size=2", "generate.steps_min=2", "generate.steps_max=2",
          "generate.width=64", "generate.height=64", "runtime.generate.batch_size=2", "runtime.quality.workers=1"]


def _table(path, kind) -> pd.DataFrame:
    return read_manifest(path, kind).sort_values(list(kind.key)).reset_index(drop=True)


def test_gating_while_rendering_gives_the_verdicts_of_gating_after(tmp_path):
    cfg = load_config("tiny", RENDER)
    while_rendering, after = (Workdir.at(tmp_path / name).using(cfg) for name in ("while", "after"))
    for w in (while_rendering, after):
        seed_workdir(w, n_seeds=4)

    # measured in a worker process as each batch is written, then judged on the whole set
    stages = pipelines.generate(while_rendering, cfg, base_model_only=True, report=False)
    assert [s.name for s in stages] == ["generate", "quality"]
    gate = stages[1]
    cached_before_the_gate = []
    run = gate.run

    def counting_run(unit, key):
        gate.pool.wait(take_back=False)  # every batch handed over while rendering, measured by the workers
        rows, _ = MeasureCache(while_rendering.quality / "measures").read()
        cached_before_the_gate.append(len(rows))
        return run(unit, key)

    gate.run = counting_run
    run_pipeline(stages)
    assert not gate.pool.started  # its processes are gone once the gate has run

    # rendered alone, then measured and judged here, in threads, as before there was a pipeline
    run_pipeline(pipelines.generate(after, cfg, base_model_only=True, gated=False))
    assess(after, cfg.quality)

    renders = [_table(w.synthetic_manifest, SYNTHETIC) for w in (while_rendering, after)]
    assert len(renders[0]) == 8 and renders[0]["sha256"].tolist() == renders[1]["sha256"].tolist()
    assert cached_before_the_gate == [8]  # every image measured while rendering, before the gate ran
    for kind, path in ((QUALITY, "quality_manifest"), (FIDELITY, "fidelity_manifest"),
                       (FLAG_RATES, "flag_rates_manifest")):
        assert_frame_equal(_table(getattr(while_rendering, path), kind), _table(getattr(after, path), kind))
    verdicts = _table(while_rendering.quality_manifest, QUALITY)
    assert verdicts["nearest_seed"].notna().all() and verdicts["sharpness"].notna().all()


def test_the_gate_reads_kept_measures_and_measures_again_what_changed(workdir, monkeypatch):
    seeds = seed_workdir(workdir)
    bad = bad_images()
    images = {f"benign-{i:06d}": phantom("benign", 10 + i) for i in range(3)}
    images.update({f"malignant-{i:06d}": phantom("malignant", 20 + i) for i in range(3)})
    images["benign-000010"] = bad["noise"]
    images["malignant-000011"] = bad["blur"]
    images["benign-000012"] = images["benign-000001"].copy()  # identical pixels: a duplicate
    images["benign-000014"] = altered_copy(seeds[0][1])  # a near-copy of a seed
    synthetic_workdir(workdir, images)
    q = tiny_with_full_gate().quality
    calls = {"measure": 0, "audit": 0}
    measure, measure_audit = measures.measure, measures.measure_audit

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(measures, "measure", counted("measure", measure))
    monkeypatch.setattr(measures, "measure_audit", counted("audit", measure_audit))

    first = assess(workdir, q)
    verdicts = _table(workdir.quality_manifest, QUALITY)
    assert calls["measure"] == len(images) and first.reasons == {"noise": 1, "blur": 1, "duplicate": 1, "memorised": 1}

    calls.update(measure=0, audit=0)
    again = assess(workdir, q)
    assert calls == {"measure": 0, "audit": 0}  # read back, nothing measured
    assert (again.accepted, again.rejected, again.reasons) == (first.accepted, first.rejected, first.reasons)
    assert_frame_equal(_table(workdir.quality_manifest, QUALITY), verdicts)

    # new bytes for one image: that one is measured again, and judged on what it shows now
    data = encode_png(bad["blur"], {"dermt2im": "{}"})
    atomic_write_bytes(workdir.synthetic / "benign" / "benign-000002.png", data)
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    df.loc[df["sample_key"] == "benign-000002", "sha256"] = sha256_bytes(data)
    write_manifest(df, workdir.synthetic_manifest, SYNTHETIC)
    calls.update(measure=0, audit=0)
    changed = assess(workdir, q)
    assert calls == {"measure": 1, "audit": 1}
    assert changed.reasons["blur"] == 2
    assert synthetic_view(workdir).set_index("sample_key").at["benign-000002", "reason"].startswith("blur")

    # another seed set: only the audit is done again, on every image
    seed_workdir(workdir, n_seeds=2)
    calls.update(measure=0, audit=0)
    assess(workdir, q)
    assert calls == {"measure": 0, "audit": len(images)}

    # the parts are folded into one table holding the current measures only
    cache = MeasureCache(workdir.quality / "measures")
    rows, parts = cache.read()
    assert parts == [] and len(rows) == len(images)


def test_measures_survive_the_cache_exactly():
    rgb = phantom("malignant", 5, 96)
    q = tiny_with_full_gate().quality
    m = {**measures.measure(rgb, q, None), "sha256": "x"}
    back = measures.from_row(measures.to_row("k", m, ("mk", None)), None)
    assert back["metrics"] == m["metrics"] and back["phash"] == m["phash"] and back["pixels"] == m["pixels"]
    for a in measures.ARRAYS:
        assert np.array_equal(back[a], m[a])
    assert back["skin_tone"] == m["skin_tone"] or np.isnan(m["skin_tone"].ita)


def test_the_renderer_listens_only_in_its_own_process_and_only_when_asked(workdir):
    on = load_config("tiny", ["runtime.quality.workers=1"])
    off = load_config("tiny", ["runtime.quality.while_rendering=false"])
    render, gate = pipelines.generate(workdir, on, base_model_only=True, report=False)
    assert render.listeners == [gate]
    copy = pickle.loads(pickle.dumps(render))  # as a Ray renderer receives it
    assert copy.listeners == []
    quiet = QualityStage.of(workdir, off)
    quiet.rendering()
    quiet.rendered([{"sample_key": "benign-000000", "path": str(workdir.synthetic / "x.png")}])
    assert not quiet.pool.started


def test_the_gate_measures_in_its_own_process_when_the_workers_die(workdir):
    import os
    import signal

    from dermt2im.quality.seeds import seed_index

    images = {f"benign-{i:06d}": phantom("benign", 40 + i, 64) for i in range(8)}
    rows = synthetic_workdir(workdir, images)
    stage = QualityStage.of(workdir, tiny_with_full_gate(["runtime.quality.workers=1"]))
    stage.pool.start()
    stage.pool.wait(take_back=False)  # the worker is up
    for pid in list(stage.pool._executor._processes):
        os.kill(pid, signal.SIGKILL)
    items = [(k, p, None) for k, p in zip(rows["sample_key"], rows["path"])]
    measured = stage.pool.measure(items, *seed_index(workdir))
    assert len(measured) == 8 and all("metrics" in m and "audit" in m for m in measured)
    assert not stage.pool.started  # given up, not left half broken


def test_the_workers_prepare_the_typicality_cut_the_gate_would_make_itself(workdir):
    """While rendering goes on the workers learn the seed embedding and calibrate its cut; the gate
    then takes their cut instead of calibrating again, and judges every image as it would have."""
    from dermt2im.fidelity.measures import image_measures, prepared_cut, typicality_cut

    seed_workdir(workdir, n_seeds=14, held_out=6)
    rows = synthetic_workdir(workdir, {f"benign-{i:06d}": phantom("benign", 60 + i, 96) for i in range(6)})
    rows = rows.assign(source="dermt2im")
    q = tiny_with_full_gate(["runtime.quality.workers=1"])
    stage = QualityStage.of(workdir, q)
    stage.pool.start()
    stage.pool.wait(take_back=False)
    prepared = stage.pool.prepared_cut()
    stage.pool.shutdown()
    assert prepared is not None and prepared.calibration is not None and prepared.held_out == 6

    _, here = typicality_cut(workdir, q.quality.max_typicality_quantile)
    np.testing.assert_allclose(prepared.calibration.held_out, here.calibration.held_out, rtol=1e-5)
    assert prepared.embedding == here.embedding and prepared.quantile == here.quantile
    with_prepared, _ = image_measures(workdir, rows, q.quality.max_typicality_quantile, prepared=prepared)
    calibrated_here, _ = image_measures(workdir, rows, q.quality.max_typicality_quantile)
    assert_frame_equal(with_prepared, calibrated_here, rtol=1e-5)
    assert with_prepared["typicality"].notna().all()
    # a cut made for another quantile is not taken
    _, other = prepared_cut(workdir, 0.5, prepared)
    assert other.quantile == 0.5 and other.calibration.quantile == 0.5


def test_the_seeds_pipeline_prepares_what_the_gate_needs_of_the_seeds_once(workdir, monkeypatch):
    """gate-seeds (after preprocess) measures, indexes and embeds the seeds; a generation run's gate
    and its measuring processes then read them back instead of making them."""
    from dermt2im.fidelity import embeddings
    from dermt2im.fidelity.measures import embedding_kept, seed_rows, typicality_cut
    from dermt2im.quality.seeds import load_seeds
    from dermt2im.quality.stage import GateSeedsStage

    seed_workdir(workdir, n_seeds=14, held_out=6)
    cfg = tiny_with_full_gate()
    first = run_pipeline([GateSeedsStage.of(workdir, cfg)])["gate-seeds"]
    assert first.ran == 1 and first.closing["seeds"] == 14
    assert first.closing["typicality"]["cut"] is not None and first.closing["typicality"]["held_out"] == 6
    assert embedding_kept(workdir, seed_rows(workdir)[0])

    again = run_pipeline([GateSeedsStage.of(workdir, cfg)])["gate-seeds"]
    assert again.ran == 0 and again.cached == 1

    def no_fitting(*args, **kwargs):
        raise AssertionError("the seed embedding was fitted again")

    monkeypatch.setattr(embeddings, "fit_seed_network", no_fitting)
    _, cut = typicality_cut(workdir, cfg.quality.max_typicality_quantile)
    assert cut.calibration is not None and load_seeds(workdir, cfg.quality).index.size == 14


def test_the_gate_takes_the_measures_the_workers_send_back_and_reads_no_part(tmp_path, monkeypatch):
    """What the workers measured while rendering comes back with their answers: the gate reads no
    cache part for the images this process rendered (the queued batches it took back it measures
    itself), judges them as gating after rendering does, and the parts are folded afterwards."""
    cfg = load_config("tiny", RENDER)
    w = Workdir.at(tmp_path / "w").using(cfg)
    seed_workdir(w, n_seeds=4)
    looked_up = []
    lookup = MeasureCache.lookup

    def counted(self, images, *keys):
        looked_up.append(len(images))
        return lookup(self, images, *keys)

    monkeypatch.setattr(MeasureCache, "lookup", counted)
    run_pipeline(pipelines.generate(w, cfg, base_model_only=True, report=False))
    assert looked_up == []
    verdicts = _table(w.quality_manifest, QUALITY)
    assert len(verdicts) == 8 and verdicts["sharpness"].notna().all() and verdicts["nearest_seed"].notna().all()
    rows, parts = MeasureCache(w.quality / "measures").read()
    assert parts == [] and len(rows) == 8
    monkeypatch.setattr(MeasureCache, "lookup", lookup)
    again = tmp_path / "again"
    import shutil

    shutil.copytree(w.root, again)
    after = Workdir.at(again).using(cfg)
    (after.quality / "measures" / "measures.parquet").unlink()
    assess(after, cfg.quality)  # measured again here, in threads
    assert_frame_equal(_table(after.quality_manifest, QUALITY), verdicts)


def test_measuring_processes_start_only_on_the_cores_the_renderer_leaves(workdir, monkeypatch):
    """A CPU renderer whose torch threads fill the host's cores gets no image measured beside it: the
    measuring processes start (they make the seeds ready while the pipeline loads) and wait for the
    gate; one that leaves cores gets at most that many processes, and its images handed over."""
    from dermt2im.quality import stage as quality_stage
    from dermt2im.quality.seeds import seed_index

    monkeypatch.setattr(quality_stage, "pool_cores", lambda: 4)
    written = [{"sample_key": "benign-000000", "path": str(workdir.synthetic / "x.png")}]
    gate = QualityStage.of(workdir, tiny_with_full_gate(["runtime.quality.workers=3"]))
    gate.rendering(4)
    gate.rendered(written)
    try:
        assert gate.pool.started and gate.pool.workers == 3
        assert gate.pool.handed("any") == ({}, set(), set())  # nothing handed over while rendering
    finally:
        gate.pool.shutdown()
    gate = QualityStage.of(workdir, tiny_with_full_gate(["runtime.quality.workers=3"]))
    gate.rendering(3)
    gate.rendered(written)
    try:
        assert gate.pool.started and gate.pool.workers == 1
        found, _, _ = gate.pool.handed(seed_index(workdir)[0], settle=True)
        assert list(found) == ["benign-000000"] and found["benign-000000"]["reason"].startswith("missing")
    finally:
        gate.pool.shutdown()
    render, _ = pipelines.generate(workdir, load_config("tiny"), base_model_only=True, report=False)
    import torch

    assert render.renderer_cores() == torch.get_num_threads()  # the tiny model renders on the CPU here


def test_the_gate_takes_the_tasks_a_busy_worker_has_not_started(workdir, monkeypatch):
    """Once rendering is over the gate's own process measures, from the last task back, whatever no
    worker has started: a worker still busy gets none of a small batch, and the measures come back
    in the items' order."""
    import time

    from dermt2im.core.fileio import sha256_file
    from dermt2im.quality import pool as quality_pool
    from dermt2im.quality.seeds import seed_index

    images = {f"benign-{i:06d}": phantom("benign", 70 + i, 64) for i in range(8)}
    rows = synthetic_workdir(workdir, images)
    stage = QualityStage.of(workdir, tiny_with_full_gate(["runtime.quality.workers=1"]))
    here = []
    measure_items = quality_pool.measure_items

    def counted(w, q, key, index, items, **kw):
        here.extend(k for k, _, _ in items)
        return measure_items(w, q, key, index, items, **kw)

    monkeypatch.setattr(quality_pool, "measure_items", counted)
    stage.pool.start(prepare=False)
    try:
        busy = [stage.pool.call(time.sleep, 4) for _ in range(2)]  # the worker, and the task queued behind it
        items = [(k, p, None) for k, p in zip(rows["sample_key"], rows["path"])]
        measured = stage.pool.measure(items, *seed_index(workdir))
        assert all(not f.done() for f in busy)  # done before the worker was free
    finally:
        stage.pool.shutdown()
    assert sorted(here) == sorted(rows["sample_key"])
    assert [m["sha256"] for m in measured] == [sha256_file(p) for p in rows["path"]]
    # kept for the next run, with their audits, though the workers measured some of them
    key = seed_index(workdir)[0]
    q = stage.spec
    kept = MeasureCache(workdir.quality / "measures").lookup(rows, measures_key(q), audit_key(key, q))
    assert sorted(kept) == list(range(len(rows))) and all("audit" in m for m in kept.values())


def test_measuring_runs_one_thread_per_library_in_the_workers_and_here(workdir):
    """The workers' numpy BLAS (loaded before their initializer runs) and OpenCV run one thread each,
    and this process's while it measures beside them: threads of one library that outnumber the free
    cores wait on each other (64 tiny images took twice as long with the other core busy)."""
    import cv2
    from threadpoolctl import threadpool_info

    from dermt2im.quality.pool import MeasurePool, one_thread_each

    pool = MeasurePool(workdir, load_config("tiny").quality, 1)
    pool.start(prepare=False)
    try:
        libraries = pool.call(threadpool_info).result()
        assert libraries and {lib["num_threads"] for lib in libraries} == {1}
        assert pool.call(cv2.getNumThreads).result() == 1
    finally:
        pool.shutdown()
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        with one_thread_each():
            assert cv2.getNumThreads() == 1
            assert {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"} == {1}
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
