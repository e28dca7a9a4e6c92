"""Looking at processes from a test (Linux /proc): what a process started, and whether a pid lives."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _stat(pid: int | str) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``. A flow-run supervisor starts its own session and a forkserver
    forks the pool workers, so killing a process group alone can leave work running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry.name)) is not None:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            out.append(child)
            frontier.append(child)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie that nobody has reaped yet has ended)."""
    stat = _stat(pid)
    return stat is not None and stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
               on_fail: Callable[[], str] | None = None) -> Any:
    """``predicate()``'s first truthy value, polled every ``interval`` s; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{on_fail()}" if on_fail else ""))
