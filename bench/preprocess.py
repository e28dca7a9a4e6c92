"""Throughput of the preprocess stage against a plain single-threaded DullRazor loop.

    python bench/preprocess.py [--n 24] [--size 512] [--workers 0]

Both sides take the same images: the real ISIC images in ../shared/data/real-dermoscopy when
present, else phantoms rendered at 1024 px. The baseline is the textbook loop: cv2.imread at full
resolution, black-hat / threshold / inpaint at full resolution (kernel scaled to it, so it removes
the same hair), resize and centre-crop, cv2.imwrite, one image after another on one thread. The
factory runs ``preprocess_manifest`` (reduced JPEG decode, hair removal at the working size, every
core) from a cold start, pool start-up included, and once more on one process to show how much of
the gain is the pipeline and how much the cores. Prints images/s for each and the ratios.
"""

from __future__ import annotations

import argparse
import os
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
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    k = scaled(cfg.hair_kernel_size, min(grey.shape), odd=True, minimum=3)
    blackhat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k)))
    _, mask = cv2.threshold(blackhat, cfg.hair_threshold, 255, cv2.THRESH_BINARY)
    restored = cv2.inpaint(bgr, mask, cfg.inpaint_radius, cv2.INPAINT_TELEA)
    cv2.imwrite(str(out / f"{path.stem}.png"), resize_center_crop(restored, cfg.size))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="images (default 24)")
    parser.add_argument("--size", type=int, default=512, help="output side (default 512)")
    parser.add_argument("--workers", type=int, default=0, help="factory processes (default 0: every core)")
    args = parser.parse_args(argv)
    cfg = PreprocessConfig(size=args.size, workers=args.workers)

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        scratch = Path(tmp)
        images, what = pick_images(args.n, scratch)
        for p in images:  # warm the page cache so neither side pays for the first read
            p.read_bytes()
        megapixels = sum(_pixels(p) for p in images) / len(images) / 1e6
        manifest = seeds_manifest(images, scratch / "seeds.parquet")
        workers = worker_count(cfg, len(images), 0)
        print(f"{len(images)} images: {what}; ~{megapixels:.1f} MP on average; output {cfg.size} px")
        print(f"cores: {os.cpu_count()} (factory uses {workers} process(es))")

        base_s = bench_baseline(images, cfg, scratch / "baseline")
        print(f"plain DullRazor, 1 thread, full resolution: {len(images) / base_s:7.2f} images/s ({base_s:.2f} s)")
        one = preprocess_manifest(seeds_manifest(images, scratch / "one.parquet"), scratch / "one", cfg, workers=1)
        print(f"preprocess_manifest, 1 process:            {one.processed / one.seconds:7.2f} images/s ({one.seconds:.2f} s)")
        report = preprocess_manifest(manifest, scratch / "processed", cfg)
        fact_s = report.seconds
        print(f"preprocess_manifest, {workers} process(es):         {report.processed / fact_s:7.2f} images/s ({fact_s:.2f} s)")
        cached = preprocess_manifest(manifest, scratch / "processed", cfg)
        print(f"second run (cached): {cached.cached} cached, {cached.processed} processed in {cached.seconds:.3f} s")
        print(f"speed-up vs plain: {base_s / fact_s:.1f}x ({base_s / one.seconds:.1f}x from the working-resolution "
              f"pipeline alone, {one.seconds / fact_s:.1f}x more from {workers} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
