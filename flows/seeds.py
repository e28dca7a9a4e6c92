"""Seed preparation: (phantoms when no SOURCE) -> ingest -> preprocess, plus unseen real test sets."""

from __future__ import annotations


from prefect import flow, get_run_logger

from dermt2im.core.workdir import open_workdir
from tasks.seeds import ingest, make_phantoms, phantom_sets, preprocess


@flow(name="prepare-seeds", log_prints=True)
def prepare_seeds(
    workdir: str,
    source: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    layout: str | None = None,
    test_sets: dict[str, str] | None = None,
) -> dict:
    """Ingest and preprocess the seed set and every test set; returns their manifest paths.

    With no ``source`` the factory makes its own phantom seed set and phantom test sets of each
    configured style, so a new user sees the whole pipeline work offline.
    """
    log = get_run_logger()
    w, cfg = open_workdir(workdir, config, overrides)
    tests: dict[str, str] = dict(cfg.validation.test_sets)
    tests.update(test_sets or {})
    if source is None:
        seed_dir, phantom_tests = phantom_sets(w.data, cfg.phantoms)
        p = cfg.phantoms
        make_phantoms(str(seed_dir), p.n_seed, p.seed, p.seed_style, p.size, p.hair_probability)
        for i, (name, folder) in enumerate(sorted(phantom_tests.items()), start=1):
            style = name.removeprefix("phantom-")
            make_phantoms(str(folder), p.n_test, p.seed + 1000 * i, style, p.size, p.hair_probability)
            tests.setdefault(name, str(folder))
        source = str(seed_dir)
        log.info("no SOURCE given: using phantom seeds in %s", source)

    seeds = ingest(source, str(w.seeds_manifest), cfg.ingest, layout)
    prep = preprocess(seeds["manifest"], str(w.processed), cfg.preprocess, cfg.ingest.max_pixels)
    out = {"seeds": prep["manifest"], "seeds_digest": prep["digest"], "test_sets": {}}
    for name, src in sorted(tests.items()):
        manifest = w.test_set_manifest(name)
        ingest(src, str(manifest), cfg.ingest, layout, "test")
        t = preprocess(str(manifest), str(w.processed), cfg.preprocess, cfg.ingest.max_pixels)
        out["test_sets"][name] = t["manifest"]
    log.info("seeds: %s accepted, %s quarantined", seeds["accepted"], seeds["quarantined"])
    return out


if __name__ == "__main__":  # python -m flows.seeds WORKDIR [SOURCE]
    import sys

    prepare_seeds(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
