"""Processing jobs on every allowed core: one job per distinct image, written atomically as a PNG that
carries its key and hair fraction (so a killed run loses no finished image)."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2

from dermt2im.core import progress
from dermt2im.core.errors import DecodeError
from dermt2im.core.fileio import atomic_write_bytes, sha256_bytes
from dermt2im.core.imaging import encode_png
from dermt2im.core.specs import PreprocessConfig
from dermt2im.preprocess.resize import preprocess_with_change

# Starting worker processes costs ~0.5 s; a batch smaller than about four 512 px images runs in-process.
POOL_MIN_PIXELS = 4 * 512 * 512
PNG_COMPRESS_LEVEL = 1  # zlib 1 vs 6 at 512 px: 5x faster to encode, files ~18% larger
TEXT_KEY = "dermt2im.preprocess_key"
TEXT_HAIR = "dermt2im.hair_fraction"
TEXT_CHANGED = "dermt2im.hair_changed_fraction"
# A failure that may pass (the file could not be read: a share away, a permission being fixed) carries
# this prefix; preprocess records it as ``unreadable`` and tries the row again next time.
TRANSIENT = "preprocess (transient): "


def is_transient(reason: str | None) -> bool:
    return str(reason or "").startswith(TRANSIENT)


@dataclass(frozen=True)
class _Job:
    sample_id: str
    sources: tuple[str, ...]  # every accepted copy with these bytes; the first readable one is used
    target: str
    key: str


@dataclass(frozen=True)
class _Outcome:
    sample_id: str
    hair_fraction: float | None  # None when it failed
    reason: str | None = None
    changed_fraction: float | None = None  # pixels hair removal moved by more than 10 grey levels


def _init_worker(parent: int) -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with(parent: int, every: float = 0.5) -> None:
    """End this worker when the process that started the pool is gone (killed, even by SIGKILL):
    the pool's queues would otherwise keep it waiting for work forever."""
    while True:
        time.sleep(every)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid now belongs to another user's process: ours is gone
            os._exit(1)


def _read_source(job: _Job) -> tuple[bytes | None, str]:
    """The bytes of the first copy that still exists and still hashes to the sample_id, else the
    quarantine reason: transient when no copy could be read at all (it may be there again later)."""
    reasons = []
    for source in job.sources:
        try:
            data = Path(source).read_bytes()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            reasons.append(f"{TRANSIENT}cannot read source file: {err.strerror or err}")
            continue
        actual = sha256_bytes(data)
        if actual == job.sample_id:
            return data, ""
        reasons.append(f"preprocess: file changed since ingest (sha256 is now {actual[:12]}…; ingest again)")
    return None, reasons[-1] if all(is_transient(r) for r in reasons) else next(r for r in reasons if not is_transient(r))


def _process_job(job: _Job, cfg: PreprocessConfig, max_pixels: int) -> _Outcome:
    # Only a plain OSError (EIO, stale NFS handle) escapes: it is transient and the task retries it.
    data, why_not = _read_source(job)
    if data is None:
        return _Outcome(job.sample_id, None, why_not)
    try:
        rgb, fraction, changed = preprocess_with_change(data, cfg, max_pixels=max_pixels)
    except DecodeError as err:
        return _Outcome(job.sample_id, None, f"preprocess: {err}")
    except cv2.error as err:
        return _Outcome(job.sample_id, None, f"preprocess: image processing failed: {str(err).strip()[:200]}")
    png = encode_png(rgb, {TEXT_KEY: job.key, TEXT_HAIR: repr(fraction), TEXT_CHANGED: repr(changed)},
                     compress_level=PNG_COMPRESS_LEVEL)
    atomic_write_bytes(job.target, png)
    return _Outcome(job.sample_id, fraction, changed_fraction=changed)


def _process_chunk(jobs: Sequence[_Job], cfg: PreprocessConfig, max_pixels: int) -> list[_Outcome]:
    return [_process_job(job, cfg, max_pixels) for job in jobs]


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def worker_count(cfg: PreprocessConfig, n_jobs: int, workers: int = 0) -> int:
    """Processes to use: ``workers`` (``runtime.preprocess.workers``; 0 = every core), never more than
    there are jobs, and one when the whole batch is cheaper than starting a pool (under
    ``POOL_MIN_PIXELS`` of output)."""
    if n_jobs == 0:
        return 0
    if n_jobs * cfg.size * cfg.size < POOL_MIN_PIXELS:
        return 1
    return min(workers or available_cores(), n_jobs)


def _chunks(jobs: Sequence[_Job], workers: int) -> list[Sequence[_Job]]:
    # about four chunks per worker balances uneven image sizes without paying per-image IPC
    size = max(1, min(32, math.ceil(len(jobs) / (4 * workers))))
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork is unsafe from a multi-threaded parent (Prefect runs tasks in threads); forkserver forks
    # workers from a clean single-threaded server that has this module imported once.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def run_jobs(jobs: Sequence[_Job], cfg: PreprocessConfig, max_pixels: int, workers: int = 0,
             description: str = "preprocess") -> list[_Outcome]:
    """Process ``jobs`` on every allowed core; no pool when one process will do (or there is no work)."""
    workers = worker_count(cfg, len(jobs), workers)
    if workers == 0:
        return []
    with progress.task(description, total=len(jobs), unit="images") as bar:
        if workers == 1:
            outcomes = []
            for job in jobs:
                outcomes.append(_process_job(job, cfg, max_pixels))
                bar.advance()
            return outcomes
        outcomes = []
        with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_process_chunk, chunk, cfg, max_pixels) for chunk in _chunks(jobs, workers)]
            for future in as_completed(futures):
                done = future.result()
                outcomes.extend(done)
                bar.advance(len(done))
        return outcomes
