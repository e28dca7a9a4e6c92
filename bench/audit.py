"""The memorisation audit at scale: images/s and planted-copy recall, new audit vs the old global check.

    python bench/audit.py                          # 3,000 seeds against 6,000 synthetic images
    python bench/audit.py --seeds 300 --synthetic 600

How the scale is simulated (there are 130 real images, not 3,000): the real ISIC images of
../shared/data are split by class into seed sources and held-out images, half each. Seed j is a
distinct-looking variant of a seed source (rotated by any angle, zoomed 1-1.3x, shifted up to 5 %,
mildly re-coloured, 512 x 512 with reflected borders). The synthetic images alternate: a planted
near-copy of a random seed (crop 2-10 %, a flip / quarter turn, colour jitter, JPEG 60-90) or a
near-copied variant of a held-out image (unrelated to every seed: must not be flagged). A copy counts
as found when flagged with a seed of its own source (a source's seeds overlap each other; the share
flagged with the exact seed is printed too). Seeds and images are made on the fly and streamed; the
time spent making them is measured and left out. Without ../shared the sources are phantoms.

The audit runs as the quality stage runs it: ``audit_image`` per image on a thread pool, against
an index built once (``build_index``). The baseline is the old audit: nearest seed under the global
descriptor over the eight flips / quarter turns of the whole seed, distance below 0.1. Prints
images/s of both and the ratio, and the recall and false flags of both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermt2im.quality import audit as A  # noqa: E402
from dermt2im.quality.images import workers  # noqa: E402
from tests.quality.near_copies import jitter, near_copy  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dermoscopy"


def sources() -> tuple[list[np.ndarray], list[str], str]:
    """(images at 512, labels, description) to make seeds and held-out images from."""
    if (REAL / "labels.csv").is_file():
        from tests.real_images import real_images

        rows, images = real_images(REAL, 512)
        return list(images), list(rows["label"]), f"the {len(images)} real ISIC images in {REAL}"
    from dermt2im.phantoms import render_phantom

    labels = [("benign", "malignant")[i % 2] for i in range(130)]
    return ([render_phantom(lab, np.random.default_rng(i), size=512) for i, lab in enumerate(labels)], labels,
            "130 phantoms (../shared/data not found)")


def seed_variant(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = src.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(0, 360), rng.uniform(1.0, 1.3))
    m[:, 2] += rng.uniform(-0.05, 0.05, 2) * (w, h)
    return jitter(cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101), rng, 0.5)


class Timer:
    """Seconds spent making test images, to leave out of the audit's time."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, make: Callable[[], np.ndarray]) -> np.ndarray:
        t = time.perf_counter()
        out = make()
        self.seconds += time.perf_counter() - t
        return out


def old_audit(index: A.SeedIndex, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The old global check: whole-image entries only (crop 0 of each seed's 48), distance < 0.1."""
    whole = index.refs.reshape(index.size, 6, 8, -1)[:, 0]
    q = np.stack([A.embed(im) for im in images])
    d = np.sqrt(np.clip(2 - 2 * np.einsum("nd,svd->nsv", q, whole), 0, None)).min(axis=2)
    return d.argmin(axis=1), d.min(axis=1) < 0.1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3000)
    ap.add_argument("--synthetic", type=int, default=6000)
    args = ap.parse_args()
    images, labels, what = sources()
    order = np.random.default_rng(0).permutation(len(images))
    by_class = {lab: [i for i in order if labels[i] == lab] for lab in set(labels)}
    seed_sources = [i for lab in sorted(by_class) for i in by_class[lab][: len(by_class[lab]) // 2]]
    held_out = [i for i in order if i not in seed_sources]
    seed_src = np.array([seed_sources[j % len(seed_sources)] for j in range(args.seeds)])
    threads = workers()
    print(f"# memorisation audit: {args.seeds} seeds, {args.synthetic} synthetic images, {threads} threads "
          f"(load average {os.getloadavg()[0]:.1f} at the start); sources: {what}\n")

    def seed(j: int) -> np.ndarray:
        return seed_variant(images[seed_src[j]], np.random.default_rng([1, j]))

    made = Timer()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda j: A.build_index([(str(j), made(lambda: seed(j)))]), range(args.seeds)))
    index = A.merge_indexes(parts)
    t_index = time.perf_counter() - t0 - made.seconds / threads

    rng = np.random.default_rng(2)
    copied = rng.integers(0, args.seeds, args.synthetic)
    is_copy = np.arange(args.synthetic) % 2 == 0
    held = rng.choice(held_out, args.synthetic)

    def synthetic(t: int) -> np.ndarray:
        r = np.random.default_rng([2, t])
        return near_copy(seed(copied[t]) if is_copy[t] else seed_variant(images[held[t]], r), r)

    made = Timer()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda t: A.audit_image(made(lambda: synthetic(t)), index), range(args.synthetic)))
    t_new = time.perf_counter() - t0 - made.seconds / threads

    step = max(1, args.synthetic // 600) | 1  # odd: copies and unrelated images alike
    sample = range(0, args.synthetic, step)  # the old check on a tenth: it is fast
    imgs = [synthetic(t) for t in sample]
    t0 = time.perf_counter()
    old_seed, old_flag = old_audit(index, imgs)
    t_old = (time.perf_counter() - t0) / len(imgs) * args.synthetic

    copies = [t for t in range(args.synthetic) if is_copy[t]]
    found = np.array([results[t].memorised and seed_src[results[t].seed] == seed_src[copied[t]] for t in copies])
    exact = np.array([results[t].memorised and results[t].seed == copied[t] for t in copies])
    false = sum(results[t].memorised for t in range(args.synthetic) if not is_copy[t])
    old_found = np.mean([f and seed_src[s] == seed_src[copied[t]] for t, s, f in zip(sample, old_seed, old_flag)
                         if is_copy[t]])
    old_false = sum(f for t, f in zip(sample, old_flag) if not is_copy[t])
    n_old_unrelated = sum(not is_copy[t] for t in sample)
    print(f"- index: {args.seeds} seeds in {t_index:.0f} s ({args.seeds / t_index:.1f} seeds/s), "
          f"{index.refs.nbytes / 2**20:.0f} MiB of global entries")
    print(f"- new audit: {args.synthetic} images in {t_new:.0f} s: **{args.synthetic / t_new:.1f} images/s**")
    print(f"- old global check: {args.synthetic / t_old:.0f} images/s (timed on {len(imgs)} images); "
          f"new / old speed: {t_old / t_new:.3f}x")
    print(f"- planted-copy recall, new: **{found.mean():.2%}** ({found.sum()} of {len(found)}; "
          f"{exact.mean():.1%} with the exact seed); old: {old_found:.2%} (on {len(imgs) - n_old_unrelated} copies)")
    print(f"- unrelated images flagged, new: **{false} of {args.synthetic - len(copies)}**; "
          f"old: {old_false} of {n_old_unrelated}")


if __name__ == "__main__":
    main()
