"""Cache keys and retry policy shared by every task.

Cache keys hash content (file digests, manifest digests, config sections, the task's own code),
never path strings alone: Prefect's INPUTS policy hashes a Path by its string and would serve a
stale result after the file changed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, InterruptedError, BlockingIOError)
PERMANENT_OS_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def content_key(*parts: Any) -> str:
    """sha256 over JSON-serialised parts (Paths by string: pair them with a digest of their content)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def source_of(fn: Any) -> str:
    """Hash of a function's source, so editing a task's code invalidates its cache."""
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", "?")


def tree_listing(root: str | Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) for every file below ``root``: the cheap change detector that
    make and rsync use. Ingest hashes every file's bytes itself, so this only decides whether to look."""
    root = Path(root)
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: network / I/O hiccups. Not: bad input, missing files, config errors."""
    if exc is None:
        return False
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return type(exc) is OSError  # plain OSError (EIO, stale NFS handle, ...) but none of its specific subclasses


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure was transient."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, never swallow
        return is_transient(exc)
    return False
