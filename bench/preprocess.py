"""Throughput of the preprocess stage against the plain loop a user writes: resize first, then DullRazor.

    python bench/preprocess.py [--n 24] [--size 512] [--workers 0] [--repeats 3]

Both sides take the same images: the real ISIC images in ../shared/data/real-dermoscopy when
present, else phantoms rendered at 1024 px. The baseline: cv2.imread, resize and centre-crop to the
working size, black-hat / threshold / inpaint there (the kernel scaled to that size, as the factory
does), cv2.imwrite, one image after another on one thread. The factory runs ``preprocess_manifest``
(reduced JPEG decode, hair removal at the working size) on one process and on every core, pool
start-up included, each on a fresh output folder. The three are interleaved (baseline, one process,
all cores, baseline ...); printed: min / median / max seconds and the ratios of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import pandas as pd
from PIL import Image

from dermt2im.core.fileio import sha256_file
from dermt2im.core.manifest import SEEDS, write_manifest
from dermt2im.core.specs import PreprocessConfig
from dermt2im.phantoms import make_phantoms
from dermt2im.preprocess.hair import scaled
from dermt2im.preprocess.pool import worker_count
from dermt2im.preprocess.resize import resize_center_crop
from dermt2im.preprocess.stage import preprocess_manifest

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dermoscopy" / "images"


def pick_images(n: int, scratch: Path) -> tuple[list[Path], str]:
    """The first ``n`` real images by name, or ``n`` phantoms at 1024 px when there are none."""
    real = sorted(REAL.glob("*.jpg")) if REAL.is_dir() else []
    if real:
        return real[:n], f"real ISIC JPEGs from {REAL}"
    make_phantoms(scratch / "phantoms", n, seed=0, size=1024, hair_probability=1.0)
    return sorted((scratch / "phantoms").rglob("*.png")), "phantoms at 1024 px (no real images found)"


def _pixels(path: Path) -> int:
    with Image.open(path) as img:  # header only
        return img.width * img.height


def plain_dullrazor(path: Path, cfg: PreprocessConfig, out: Path) -> None:
    bgr = resize_center_crop(cv2.imread(str(path), cv2.IMREAD_COLOR), cfg.size)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    k = scaled(cfg.hair_kernel_size, min(grey.shape), odd=True, minimum=3)
    blackhat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k)))
    _, mask = cv2.threshold(blackhat, cfg.hair_threshold, 255, cv2.THRESH_BINARY)
    restored = cv2.inpaint(bgr, mask, cfg.inpaint_radius, cv2.INPAINT_TELEA)
    cv2.imwrite(str(out / f"{path.stem}.png"), restored)


def bench_baseline(images: list[Path], cfg: PreprocessConfig, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        start = time.perf_counter()
        for path in images:
            plain_dullrazor(path, cfg, out)
        return time.perf_counter() - start
    finally:
        cv2.setNumThreads(threads)


def seeds_manifest(images: list[Path], path: Path) -> Path:
    rows = [{"sample_id": sha256_file(p), "source_path": str(p), "status": "accepted", "label": "benign"} for p in images]
    return write_manifest(pd.DataFrame(rows).drop_duplicates("sample_id"), path, SEEDS)


def _spread(xs: list[float]) -> str:
    return f"min {min(xs):6.2f}  median {statistics.median(xs):6.2f}  max {max(xs):6.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="images (default 24)")
    parser.add_argument("--size", type=int, default=512, help="output side (default 512)")
    parser.add_argument("--workers", type=int, default=0, help="factory processes (default 0: every core)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    args = parser.parse_args(argv)
    cfg = PreprocessConfig(size=args.size)

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        scratch = Path(tmp)
        images, what = pick_images(args.n, scratch)
        for p in images:  # warm the page cache so neither side pays for the first read
            p.read_bytes()
        megapixels = sum(_pixels(p) for p in images) / len(images) / 1e6
        workers = worker_count(cfg, len(images), args.workers)
        print(f"{len(images)} images: {what}; ~{megapixels:.1f} MP on average; output {cfg.size} px")
        print(f"cores: {os.cpu_count()} (factory uses {workers} process(es)); {args.repeats} interleaved runs each")
        times: dict[str, list[float]] = {"plain": [], "one": [], "all": []}
        for r in range(args.repeats):
            times["plain"].append(bench_baseline(images, cfg, scratch / f"plain-{r}"))
            for name, n in (("one", 1), ("all", args.workers)):
                manifest = seeds_manifest(images, scratch / f"{name}-{r}.parquet")
                report = preprocess_manifest(manifest, scratch / f"{name}-{r}", cfg, workers=n)
                times[name].append(report.seconds)
        cached = preprocess_manifest(manifest, scratch / f"all-{args.repeats - 1}", cfg, workers=args.workers)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"plain loop (resize, then DullRazor), 1 thread: {_spread(times['plain'])}  {len(images) / med['plain']:6.2f} images/s")
        print(f"preprocess_manifest, 1 process:               {_spread(times['one'])}  {len(images) / med['one']:6.2f} images/s")
        print(f"preprocess_manifest, {workers} process(es):            {_spread(times['all'])}  {len(images) / med['all']:6.2f} images/s")
        print(f"second run (cached): {cached.cached} cached, {cached.processed} processed in {cached.seconds:.3f} s")
        print(f"ratio plain / factory (medians): {med['plain'] / med['all']:.2f}x on {workers} process(es), "
              f"{med['plain'] / med['one']:.2f}x on one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
