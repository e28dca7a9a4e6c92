"""Many writers, one manifest.

Writers use one of two protocols:

* **local / shared POSIX storage**: ``writer_lock`` (an fcntl lock beside the file) serialises
  read-modify-write cycles (``upsert``);
* **object stores** (no locks, no rename): each writer *appends* its rows as a new, uniquely named
  Parquet part in ``<manifest>.parts/`` (``append_rows``; one put, never a read-modify-write).
  ``read_manifest`` returns the base file merged with every part (by key, later parts win), so
  readers see appended rows at once. ``compact`` (or any ``upsert`` / ``rewrite``) folds the parts
  it read into the base file and then deletes exactly those parts; a part appended meanwhile is kept
  and still wins over the base. Appends may run concurrently with anything. Rewrites of one
  manifest must not overlap (two would each write the base from what they read, and the second
  would drop rows the first folded in and deleted): ``writer_lock(url, lock_dir)`` holds an fcntl
  lock in ``lock_dir`` (the workdir's ``.locks``, on the POSIX storage every worker shares for the
  config and the LoRA weights anyway) while one process rewrites.

``record_rows`` picks the protocol from the location. Part names start with the writer's wall-clock
nanoseconds, so hosts appending to one manifest need roughly synchronised clocks (NTP): a sample
recorded twice before a fold, by a shard retried on another machine after its first worker died
or by a later re-render, must have its later row win.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from dermt2im.core import storage
from dermt2im.core.errors import ManifestError
from dermt2im.core.manifest import (
    ManifestSchema,
    _duplicate_keys,
    _rewrite,
    conform,
    parts_folder,
    pending_parts,
    upsert,
)


def append_rows(path: str | Path, rows: pd.DataFrame, kind: ManifestSchema) -> str | Path | None:
    """Record ``rows`` as a new part of the manifest (no read, no lock: safe for many writers on an
    object store). Later parts win over earlier ones and over the base. Returns the part's location."""
    table = conform(rows, kind)
    if table.num_rows == 0:
        return None
    if _duplicate_keys(table.to_pandas(), kind):
        raise ManifestError(f"rows for {kind.name} repeat a key: {_duplicate_keys(table.to_pandas(), kind)[:3]}")
    part = storage.join(parts_folder(path), f"{time.time_ns():020d}-{uuid.uuid4().hex}.parquet")
    if not storage.is_remote(part):
        Path(part).parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_target(part) as tmp:
        pq.write_table(table, tmp)
    return part


def compact(path: str | Path, kind: ManifestSchema, lock_dir: str | Path | None = None) -> int:
    """Fold pending parts into the base file under ``writer_lock(path, lock_dir)``; returns how many
    were folded (0: nothing to do). Do not call it while holding that lock (the lock is not re-entrant)."""
    if not pending_parts(path):
        return 0
    with writer_lock(path, lock_dir):
        if not pending_parts(path):
            return 0
        return len(_rewrite(path, kind, lambda current: current)[1])


@contextlib.contextmanager
def writer_lock(path: str | Path, lock_dir: str | Path | None = None) -> Iterator[None]:
    """Exclusive access for a read-modify-write of a manifest: an fcntl lock, for processes on one
    host or on a POSIX shared filesystem, released if the holder dies.

    A local manifest is locked beside itself (``lock_dir`` is ignored, so every caller agrees on the
    lock file); under the lock, temporaries a killed writer left for it are removed. A manifest on an
    object store is locked in ``lock_dir``; with no ``lock_dir`` there is no lock (one writer only).
    """
    if storage.is_remote(path):
        if lock_dir is None:
            yield
            return
        name = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        with _flock(Path(lock_dir) / f"{name}-{str(path).rsplit('/', 1)[-1]}.lock"):
            yield
        return
    path = storage.local_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _flock(path.with_name(path.name + ".lock")):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def _flock(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        fcntl = None
    with open(lock, "a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def record_rows(path: str | Path, rows: pd.DataFrame, kind: ManifestSchema) -> None:
    """Record rows from one of many concurrent writers: an upsert under ``writer_lock`` on local
    storage, an appended part (no lock, no read) on an object store."""
    if storage.is_remote(path):
        append_rows(path, rows, kind)
        return
    with writer_lock(path):
        upsert(path, rows, kind)
