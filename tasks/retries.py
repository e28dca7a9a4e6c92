"""When a task is worth running again: transient faults only (I/O and network hiccups, a locked
SQLite tracking store), never bad input, missing files or configuration errors."""

from __future__ import annotations

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, InterruptedError, BlockingIOError)
PERMANENT_OS_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: network / I/O hiccups. Not: bad input, missing files, config errors."""
    if exc is None:
        return False
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if "database is locked" in str(exc).lower():  # SQLite tracking store under concurrent writers
        return True
    return type(exc) is OSError  # plain OSError (EIO, stale NFS handle, ...) but none of its specific subclasses


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure was transient."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, never swallow
        return is_transient(exc)
    return False
