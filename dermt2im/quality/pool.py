"""The gate's image measures in worker processes, spread over the host's cores: while rendering goes
on (``MeasurePool.soon``, each batch as soon as its PNGs are written) and for what is left when the
gate runs (``MeasurePool.measure``).

The workers are a ``concurrent.futures.ProcessPoolExecutor`` started with ``spawn`` (the renderer's
process holds torch's threads, which a fork would copy mid-flight) at the first call, so a pipeline
that never measures starts none. Each worker reads the seed index once (``seeds.seed_index``: kept
in the workdir, built by the first process that needs it while the others wait), runs OpenCV on one
thread (the processes are the parallelism), measures its images (``measures.measure_file``) and
sends the measures back: a batch handed over while rendering is also written as one part of the
measure cache before its task returns (``handed``: the gate reads none of those parts), and what the
gate measures with the workers once rendering is over it keeps in one part itself. The first
task of a pool makes the seeds ready (``seeds.load_seeds``: their measures for the calibrated cuts
and their index; the embedding typicality is measured in, and its cut, handed to the gate:
``prepared_cut``), so that work overlaps rendering too; usually ``gate-seeds`` made them already and
they are read back. Once rendering is over the gate takes back the batches no worker has started
(``take_back``) and measures them with its own process beside the workers, which finish what they
hold. If a background task fails, or the workers die, what they did not keep is measured when the
gate runs; a render that fails leaves the workers to finish the batches handed over (their measures
are kept for the next run) before the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from dermt2im.core.specs import QualityConfig
from dermt2im.core.workdir import Workdir
from dermt2im.quality.measures import Measured, MeasureCache, audit_key, measure_file, measures_key, to_row

log = logging.getLogger(__name__)
Item = tuple[str, str | Path, Measured | None]  # sample key, image location, measures of its bytes already known
NICENESS = 10  # the workers' scheduling priority below the renderer's
SMALL = 8  # fewer images than this are measured in this process when no worker is running yet


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """One worker per core but one: the renderer (or the gate's own whole-set steps) keeps a core."""
    return max(1, cores() - 1)


@contextlib.contextmanager
def one_thread_each() -> Iterator[None]:
    """OpenCV and the BLAS numpy calls on one thread each while this process measures: beside the
    workers, their threads wait on one another for a busy core (64 tiny images took 3.4 s instead of
    1.6 s with the other core busy)."""
    import cv2
    from threadpoolctl import threadpool_limits

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        cv2.setNumThreads(before)


def measure_items(workdir: Workdir, q: QualityConfig, index_key: str, index, items: Sequence[Item], *,
                  keep: bool = True) -> list[Measured]:
    """Measure ``items`` here; with ``keep``, keep what was measured as a part of the cache."""
    found = [measure_file(path, q, index, have) for _, path, have in items]
    if keep:
        keep_measures(workdir, q, index_key, items, found)
    return found


def keep_measures(workdir: Workdir, q: QualityConfig, index_key: str, items: Sequence[Item],
                  measured: Sequence[Measured]) -> None:
    """The measures of ``items``, audited against the seed index ``index_key``, as one part of the cache."""
    keys = (measures_key(q), audit_key(index_key, q))
    MeasureCache(workdir.quality / "measures").append(
        [to_row(key, m, keys) for (key, _, _), m in zip(items, measured) if "reason" not in m])


# --- in the worker processes ----------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _start(workdir: Workdir, q: QualityConfig, fsspec_conf: dict | None = None, prepare: bool = True) -> None:
    # One thread per worker for every library: the workers are the parallelism, and OpenMP threads
    # that outnumber the free cores spin against each other (the seed embedding's fit took 150 s
    # instead of a few on two busy cores). torch is imported later, and reads this then; numpy's
    # BLAS was loaded with this module (spawn imports it to find this function), and is told here.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    # The collector paused until the seeds are ready (``_prepare_seeds``): the worker's imports and
    # the seeds' loading make its long-lived objects (``dermt2im.core.loading``).
    if prepare:
        gc.disable()
    # Below the renderer: where the cores are all busy the renderer keeps its pace (on two cores,
    # rendering 64 tiny images took about a second longer beside the workers than alone; what the
    # lower priority gains was not measured apart).
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    import cv2

    cv2.setNumThreads(1)
    # A worker holds nothing unwritten when the pool stops (each task writes its part, or sends its
    # measures back, before it returns): it skips the interpreter's teardown of torch and the rest,
    # which made the gate's command wait most of a second for its workers to exit.
    atexit.register(os._exit, 0)
    if fsspec_conf:  # the parent's fsspec settings (an object store's endpoint, keys): spawn does not carry them
        import fsspec

        fsspec.config.conf.update(fsspec_conf)
    _WORKER.update(workdir=workdir, q=q, index=None)


def _fsspec_conf() -> dict:
    import fsspec

    return {k: dict(v) for k, v in fsspec.config.conf.items()}


def _seed_index() -> tuple[str, Any]:
    if _WORKER["index"] is None:
        from dermt2im.quality.seeds import seed_index

        _WORKER["index"] = seed_index(_WORKER["workdir"])
    return _WORKER["index"]


def _prepare_seeds() -> Any:
    """The seeds' measures and index, the typicality embedding learned from them (made and kept) and
    its cut calibrated on the held-out seeds (returned: ``MeasurePool.prepared_cut``); and the
    plotting library the gate's figures are drawn with here (``MeasurePool.call``) imported."""
    try:
        from dermt2im.fidelity.measures import typicality_cut
        from dermt2im.quality.seeds import load_seeds

        workdir, q = _WORKER["workdir"], _WORKER["q"]
        seeds = load_seeds(workdir, q)
        _WORKER["index"] = (seeds.key, seeds.index)
        _, cut = typicality_cut(workdir, q.max_typicality_quantile)
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot  # noqa: F401
        return cut
    finally:  # what the worker loaded stays: frozen out of the collector's sight, which resumes
        gc.freeze()
        gc.enable()


def _measure_and_send(items: Sequence[Item], keep: bool = True) -> tuple[str, list[Measured]]:
    """A batch measured, sent back with the key of the seed index it was audited against; with
    ``keep`` (handed over while rendering) kept as a cache part too."""
    key, index = _seed_index()
    return key, measure_items(_WORKER["workdir"], _WORKER["q"], key, index, items, keep=keep)


def fold_cache(folder: Path, keep: set[tuple[str, str]], measures: str) -> int:
    """``MeasureCache.fold`` (a function, so that a worker can run it)."""
    return MeasureCache(folder).fold(keep, measures)


# --- in the process that renders or gates ---------------------------------------------------------


class MeasurePool:
    """``workers`` processes measuring images for the gate of ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Workdir, q: QualityConfig, workers: int = 0) -> None:
        self.workdir, self.q = workdir, q
        self.workers = workers or default_workers()
        self._executor: ProcessPoolExecutor | None = None
        self._background: list[Future] = []
        self._handed: list[tuple[Future, list[Item]]] = []  # the batches handed over while rendering
        self._prepared: Future | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._executor is not None

    def start(self, prepare: bool = True) -> ProcessPoolExecutor:
        """Start the workers (if not yet); with ``prepare``, with the seeds as their first task (while
        rendering goes on). Started when the gate runs, they measure at once (the gate's own process
        makes the typicality cut)."""
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_start,
                                                     initargs=(self.workdir, self.q, _fsspec_conf(), prepare))
                if prepare:
                    self._prepared = self._executor.submit(_prepare_seeds)
                    self._background.append(self._prepared)
            return self._executor

    def _chunks(self, items: Sequence[Item], at_least: int, at_most: int) -> list[Sequence[Item]]:
        """``items`` spread over the workers, ``at_least`` to ``at_most`` per task."""
        size = max(1, at_least, min(at_most, math.ceil(len(items) / self.workers)))
        return [items[i:i + size] for i in range(0, len(items), size)]

    def soon(self, items: Sequence[Item]) -> None:
        """Measure these images in the background; what they give is read from the cache later."""
        if not items:
            return
        pool = self.start()
        # one batch spread over the workers, 1 or 2 images a task: when rendering ends the workers
        # hold at most two images each (the executor hands a task more than there are workers) and
        # the queued rest is taken back, to be measured by the gate's own process beside them. Each
        # task keeps its measures as a cache part and sends them back (``handed``), so the gate
        # reads none of those parts.
        for chunk in self._chunks(items, at_least=1, at_most=2):
            future = pool.submit(_measure_and_send, list(chunk))
            self._background.append(future)
            self._handed.append((future, list(chunk)))

    def wait(self, take_back: bool = True) -> None:
        """Wait for the background tasks a worker has taken; with ``take_back``, those still queued
        are cancelled: their images are measured by ``measure`` when the gate runs, with this
        process's core too (rendering is over). A task that failed is logged (its images are measured
        again)."""
        for future in self._background if take_back else []:
            future.cancel()  # only those no worker has taken yet
        done, _ = wait(self._background)
        for future in done:
            if not future.cancelled() and future.exception() is not None:
                log.warning("measuring images while rendering failed (%s); they are measured now",
                            future.exception())
        self._background = []

    def take_back(self) -> None:
        """Cancel the background tasks no worker has taken yet (rendering is over): their images are
        measured when the gate runs, with this process's core too."""
        for future in self._background:
            if future is not self._prepared:
                future.cancel()

    def handed(self, index_key: str, *, settle: bool = False) -> tuple[dict[str, Measured], set[str], set[str]]:
        """The images handed over while rendering: their measures by sample key, from the tasks done
        (with ``settle``, after waiting for those a worker is still on), audited against the seed
        index ``index_key``; the keys of those still being measured; and of those taken back
        (``take_back``: never measured). A task that failed is logged and its images are left out
        (the gate measures them)."""
        if settle:
            wait([f for f, _ in self._handed if not f.cancelled()])
        found: dict[str, Measured] = {}
        running: set[str] = set()
        taken_back: set[str] = set()
        for future, items in self._handed:
            if future.cancelled():
                taken_back.update(key for key, _, _ in items)
                continue
            if not future.done():
                running.update(key for key, _, _ in items)
                continue
            if future.exception() is not None:
                log.warning("measuring images while rendering failed (%s); they are measured now", future.exception())
                continue
            key, measured = future.result()
            if key == index_key:
                found.update((k, m) for (k, _, _), m in zip(items, measured))
        return found, running, taken_back

    def measure(self, items: Sequence[Item], index_key: str, index) -> list[Measured]:
        """Measure ``items`` now, in the items' order, this process and the workers taking turns: the
        items go to the workers in tasks of 1-2 images, and this process (its core is free: rendering
        is over) takes the tasks no worker has started, from the last one back, cancelling each before
        it measures it; so a worker still busy with what it held, or still starting, gets fewer. What
        they measured is kept as one part of the cache (a part per task cost more than the tasks'
        measuring of tiny images). All here, in threads, when they are few and no worker runs."""
        if not items:
            return []
        if not self.started and len(items) < SMALL:
            return measure_here(self.workdir, self.q, index_key, index, items)
        pool = self.start(prepare=False)
        chunks = [list(c) for c in self._chunks(items, at_least=1, at_most=2)]
        try:
            futures = [pool.submit(_measure_and_send, chunk, False) for chunk in chunks]
        except BrokenProcessPool:
            futures = []
        done: list[list[Measured] | None] = [None] * len(chunks)
        with one_thread_each():
            for i in reversed(range(len(futures))):
                if not futures[i].cancel():  # a worker has it, and every task before it
                    break
                done[i] = measure_items(self.workdir, self.q, index_key, index, chunks[i], keep=False)
        try:
            if not futures:
                raise BrokenProcessPool("a worker died earlier")
            for i, future in enumerate(futures):
                if done[i] is None:
                    key, measured = future.result()
                    done[i] = measured if key == index_key else measure_items(  # the seeds changed meanwhile
                        self.workdir, self.q, index_key, index, chunks[i], keep=False)
            keep_measures(self.workdir, self.q, index_key, [it for c in chunks for it in c],
                          [m for part in done for m in part])
        except BrokenProcessPool as err:  # a worker killed (out of memory ...): measured here instead
            left = [i for i in range(len(chunks)) if done[i] is None]
            log.warning("the gate's measuring processes stopped (%s); measuring %d image(s) here", err,
                        sum(len(chunks[i]) for i in left))
            self.shutdown()
            kept = [i for i in range(len(chunks)) if done[i] is not None]
            keep_measures(self.workdir, self.q, index_key, [it for i in kept for it in chunks[i]],
                          [m for i in kept for m in done[i]])
            again = measure_here(self.workdir, self.q, index_key, index, [it for i in left for it in chunks[i]])
            for i in left:
                done[i], again = again[:len(chunks[i])], again[len(chunks[i]):]
        return [m for part in done for m in part]

    def prepared_cut(self) -> Any:
        """The typicality cut the workers calibrated while rendering went on
        (``fidelity.measures.TypicalityCut``, waited for), or None (not started, or failed)."""
        future = self._prepared
        if future is None or future.cancelled():
            return None
        try:
            return future.result()  # usually done long before; else the gate would make it here anyway
        except Exception:  # noqa: BLE001 - a worker that failed or died: the gate calibrates itself
            return None

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """``fn(*args, **kwargs)`` in a worker when the pool runs (a figure drawn there while this
        process writes the rest), else here; a worker that died leaves it to this process."""
        if self.started:
            try:
                return self.start().submit(fn, *args, **kwargs)
            except (BrokenProcessPool, RuntimeError):
                pass
        return call_here(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the workers; without ``wait`` they finish exiting while this process goes on."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=wait, cancel_futures=True)
                self._executor = None
            self._background = []
            self._handed = []
            self._prepared = None


def call_here(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """``fn(*args, **kwargs)`` run now, in this process, as a done ``Future`` (where a pool's
    ``call`` would have given one)."""
    done: Future = Future()
    done.set_result(fn(*args, **kwargs))
    return done


def measure_here(workdir: Workdir, q: QualityConfig, index_key: str, index, items: Sequence[Item]) -> list[Measured]:
    """``items`` measured in this process, in threads (OpenCV and onnxruntime release the GIL)."""
    from dermt2im.quality.images import workers

    n = workers()
    size = max(1, math.ceil(len(items) / n))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    with one_thread_each(), ThreadPoolExecutor(n) as threads:
        return [m for part in threads.map(lambda c: measure_items(workdir, q, index_key, index, c), chunks) for m in part]
