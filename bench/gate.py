"""The quality gate on real and planted images: what it rejects and flags, and what it costs.

    python bench/gate.py [--n 13]

1. The real ISIC images of ../shared/data (short side 512, centre crop, as seeds), with the cuts
   calibrated on themselves: rejections per check (each check on its own, then any), flags.
2. Plausible generated-like lesions: the same images softened (down to 128-256 px and back, a mild
   blur, colour shift, JPEG 60: tests/quality/artefacts.soften), judged with the real images' cuts.
3. Planted artefacts on ``--n`` smooth generated-like lesions each: a face (skimage's astronaut) at
   several sizes, text in the four corners, rulers, ink strokes, a dermatoscope frame; share caught
   with the right reason or flag.
4. Time per 512 px image: the whole gate vs the image measures alone (the gate before the detectors).
5. Throughput of everything the gate measures per image (``quality.measures``: checks, detectors,
   the memorisation audit against the seeds, thumbnails, skin tone) on 512 px images written as
   PNGs: one thread in this process, then ``--workers`` worker processes (``quality.pool``; default
   one per core but one) with this process measuring its share, as the gate does once rendering is
   over: images/s, and images/s per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermt2im.core.specs import QualityConfig  # noqa: E402
from dermt2im.quality.calibrate import resolve_cuts, seed_rejections  # noqa: E402
from dermt2im.quality.checks import flags_of, gate_image, image_metrics, measure_failures  # noqa: E402
from tests.quality import artefacts  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dermoscopy"
Q = QualityConfig()


def real_part() -> QualityConfig:
    from tests.real_images import real_images

    rows, images = real_images(REAL, 512)
    measured = [gate_image(im, Q).metrics for im in images]
    resolved = resolve_cuts(Q, {k: [m[k] for m in measured] for k in measured[0]})
    cfg = resolved.config
    print(f"## 1. {len(images)} real images, cuts calibrated on them\n")
    for name, origin in resolved.origin.items():
        print(f"- `{name}` = {getattr(cfg, name):.4g} ({origin})")
    counts = seed_rejections(measured, cfg)
    print("\n| check | real images rejected on its own | flagged |\n|---|---|---|")
    for check, c in counts.items():
        print(f"| {check} | {c.get('rejected', 0)} | {c.get('flagged', '')} |")
    rejected = {f: measure_failures(m, cfg) + [x for x in flags_of(m, cfg) if x in cfg.reject_flags]
                for f, m in zip(rows["file"], measured)}
    rejected = {f: r for f, r in rejected.items() if r}
    print(f"\nrejected by any check: **{len(rejected)} of {len(images)} ({len(rejected) / len(images):.1%})**: "
          + ", ".join(f"{f} ({r[0].split(':')[0]})" for f, r in rejected.items()))
    rng = np.random.default_rng(1)
    soft = [gate_image(artefacts.soften(im, rng), cfg) for im in images]
    bad = [v.reason.split(":")[0] for v in soft if v.reason]
    print(f"\n## 2. generated-like (softened) versions of the same images\n\nrejected: **{len(bad)} of {len(soft)} "
          f"({len(bad) / len(soft):.1%})**: {dict((k, bad.count(k)) for k in sorted(set(bad)))}")
    return cfg


def planted_part(n: int, cfg: QualityConfig) -> None:
    from skimage import data

    bases = [artefacts.smooth_lesion(np.random.default_rng(k)) for k in range(n)]
    face = artefacts.face_crop(data.astronaut(), (150, 30, 150, 170))
    cases: dict[str, list[tuple[np.ndarray, str]]] = {}
    for size in (40, 64, 128, 256):
        cases[f"face, {size} px crop"] = [(artefacts.plant_face(b, face, size, (30, 30)), "face") for b in bases]
    for text, h, colour, a in (("shutterstock", 14, (255, 255, 255), 1.0), ("Getty Images", 10, (180, 180, 180), 0.6),
                               ("(c) DermAI 2024", 10, (96, 96, 96), 0.5), ("(c) DermAI 2024", 8, (128, 128, 128), 0.4),
                               ("WATERMARK", 8, (255, 255, 255), 0.25), ("123456", 20, (0, 0, 0), 0.3)):
        cases[f"text {text!r} {h} px, grey {colour[0]}, opacity {a}"] = [
            (artefacts.plant_text(b, text, h, c, colour, a), "text") for b in bases for c in artefacts.CORNERS]
    for period, angle in ((5, 0), (8, 20), (8, 45), (12, 90)):
        cases[f"ruler, period {period} px, {angle} deg"] = [(artefacts.draw_ruler(
            b, period=period, angle=angle, length=0.5, at=(0.5, 0.88) if angle == 90 else (0.85, 0.5)), "ruler")
            for b in bases]
    for width in (2, 3, 5):
        cases[f"ink, {width} px strokes"] = [(artefacts.draw_ink(b, np.random.default_rng(k), width=width), "ink")
                                            for k, b in enumerate(bases)]
    cases["dermatoscope frame"] = [(artefacts.vignette(b, 1.0), "frame") for b in bases]
    print(f"\n## 3. planted artefacts on {n} smooth generated-like lesions (512 px)\n")
    print("| artefact | caught with the right reason or flag |\n|---|---|")
    for name, items in cases.items():
        hits = 0
        for im, want in items:
            v = gate_image(im, cfg)
            hits += (v.reason or "").startswith(want + ":") if want in cfg.reject_flags else want in v.flags
        print(f"| {name} | {hits} / {len(items)} |")


def timing() -> None:
    images = [artefacts.smooth_lesion(np.random.default_rng(k)) for k in range(10)]
    t = time.perf_counter()
    for im in images:
        gate_image(im, Q)
    whole = (time.perf_counter() - t) / len(images)
    t = time.perf_counter()
    for im in images:
        image_metrics(im)
    measures = (time.perf_counter() - t) / len(images)
    print(f"\n## 4. time per 512 px image, one thread\n\nwhole gate {1000 * whole:.0f} ms, image measures alone "
          f"{1000 * measures:.0f} ms: {whole / measures:.1f}x")


def throughput(n_images: int, n_seeds: int, workers: int) -> None:
    """Section 5: the per-image measures on ``n_images`` generated-like 512 px images, audited against
    ``n_seeds`` seeds (the real images when ../shared is there, else smooth lesions)."""
    import tempfile

    import cv2

    from dermt2im.core.fileio import atomic_write_bytes, sha256_bytes
    from dermt2im.core.imaging import encode_png
    from dermt2im.core.workdir import Workdir
    from dermt2im.quality.pool import MeasurePool, default_workers, measure_items
    from dermt2im.quality.seeds import load_seeds
    from tests.manifests import write_seeds

    rng = np.random.default_rng(5)
    if (REAL / "labels.csv").is_file():
        from tests.real_images import real_images

        _, real = real_images(REAL, 512)
        seeds, bases = list(real[:n_seeds]), list(real[n_seeds:])
        what = "real ISIC images"
    else:
        seeds = [artefacts.smooth_lesion(np.random.default_rng(100 + k)) for k in range(n_seeds)]
        bases, what = [], "smooth lesions"
    images = [artefacts.soften(bases[k % len(bases)], rng) if bases else artefacts.smooth_lesion(rng)
              for k in range(n_images)]
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        w = Workdir.at(Path(tmp) / "w")
        rows = []
        for k, rgb in enumerate(seeds):
            data = encode_png(rgb)
            path = atomic_write_bytes(w.processed / f"seed-{k}.png", data)
            rows.append({"sample_id": sha256_bytes(data), "source_path": f"/seeds/{k}.png", "status": "accepted",
                         "label": ("benign", "malignant")[k % 2], "split": "train", "processed_path": str(path),
                         "preprocess_key": f"k{k}"})
        write_seeds(w.seeds_manifest, rows)
        items = [(f"benign-{k:06d}", atomic_write_bytes(w.synthetic / "benign" / f"benign-{k:06d}.png", encode_png(rgb)),
                  None) for k, rgb in enumerate(images)]
        ready = load_seeds(w, Q)  # the seeds' measures and index, kept (not timed)
        cv2.setNumThreads(1)
        t = time.perf_counter()
        measure_items(w, Q, ready.key, ready.index, items)
        one = len(items) / (time.perf_counter() - t)
        pool = MeasurePool(w, Q, workers or default_workers())
        pool.start()
        pool.wait(take_back=False)
        pool.measure(items[: pool.workers], ready.key, ready.index)  # each worker has loaded its detectors
        t = time.perf_counter()
        pool.measure(items, ready.key, ready.index)
        many = len(items) / (time.perf_counter() - t)
        pool.shutdown()
    print(f"\n## 5. the gate's per-image measures, {len(items)} generated-like 512 px images (softened {what}), "
          f"audited against {len(seeds)} seeds\n\none thread in one process: {one:.2f} images/s "
          f"({1000 / one:.0f} ms per image); {pool.workers} worker process(es) and this one: {many:.2f} images/s = "
          f"**{many / (pool.workers + 1):.2f} images/s per core** (load average {os.getloadavg()[0]:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=13, help="lesions to plant each artefact on")
    ap.add_argument("--images", type=int, default=24, help="images for the throughput (section 5)")
    ap.add_argument("--seeds", type=int, default=32, help="seeds the throughput's audit compares with")
    ap.add_argument("--workers", type=int, default=0, help="worker processes for the throughput (0: cores - 1)")
    ap.add_argument("--only-throughput", action="store_true", help="section 5 alone")
    args = ap.parse_args()
    print(f"# quality gate (load average {os.getloadavg()[0]:.1f} at the start)\n")
    if not args.only_throughput:
        cfg = real_part() if (REAL / "labels.csv").is_file() else Q
        planted_part(args.n, cfg)
        timing()
    throughput(args.images, args.seeds, args.workers)


if __name__ == "__main__":
    main()
