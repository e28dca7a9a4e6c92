"""Progress of long work (files ingested, images processed or rendered, training steps, cells), told
to whoever shows it.

Domain code wraps a long loop in ``progress.task("render shard 3", total=120, unit="images")`` and
calls ``advance`` (or ``update``) as it goes; it never knows how progress is shown. The process
chooses once, with ``use(reporter)``: the CLI shows a bar with counts, rate and ETA on an interactive
terminal (``dermt2im.progress_bar``); everywhere else (a piped CLI, Prefect workers) the default
``LogReporter`` writes a plain line every ``interval`` seconds and one when the work ends, through
the ``dermt2im`` logger, which Prefect shows in the task run's logs::

    render shard 3: 40/120 images (33%), 2.10 images/s, ETA 38 s
    render shard 3: 120/120 images in 57 s (2.10 images/s)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def start(self, description: str, total: int | None, unit: str) -> Any: ...

    def update(self, handle: Any, completed: int, note: str = "") -> None: ...

    def finish(self, handle: Any, completed: int) -> None: ...


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class _Logged:
    description: str
    total: int | None
    unit: str
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    completed: int = 0


class LogReporter:
    """Plain log lines: one every ``interval`` seconds while work goes on, one when it ends."""

    def __init__(self, interval: float = 10.0, logger: logging.Logger = log) -> None:
        self.interval, self.logger = interval, logger

    def start(self, description: str, total: int | None, unit: str) -> _Logged:
        return _Logged(description, total, unit)

    def update(self, handle: _Logged, completed: int, note: str = "") -> None:
        handle.completed = completed
        now = time.monotonic()
        if now - handle.last_line < self.interval:
            return
        handle.last_line = now
        self.logger.info("%s", self.line(handle, now, note))

    def finish(self, handle: _Logged, completed: int) -> None:
        handle.completed = completed
        elapsed = time.monotonic() - handle.started
        rate = f" ({completed / elapsed:.2f} {handle.unit}/s)" if elapsed > 0 and completed else ""
        total = f"/{handle.total}" if handle.total is not None else ""
        self.logger.info("%s: %d%s %s in %s%s", handle.description, completed, total, handle.unit,
                         _duration(elapsed), rate)

    @staticmethod
    def line(h: _Logged, now: float, note: str = "") -> str:
        elapsed = now - h.started
        rate = h.completed / elapsed if elapsed > 0 else 0.0
        parts = [f"{h.description}: {h.completed}"]
        if h.total:
            parts[0] += f"/{h.total} {h.unit} ({h.completed / h.total:.0%})"
        else:
            parts[0] += f" {h.unit}"
        parts.append(f"{rate:.2f} {h.unit}/s")
        if h.total and rate > 0:
            parts.append(f"ETA {_duration((h.total - h.completed) / rate)}")
        if note:
            parts.append(note)
        return ", ".join(parts)


_lock = threading.Lock()
_reporter: Reporter = LogReporter()


def use(reporter: Reporter) -> Reporter:
    """Show progress with ``reporter`` from now on; returns the one it replaces."""
    global _reporter
    with _lock:
        previous, _reporter = _reporter, reporter
    return previous


def current() -> Reporter:
    return _reporter


class Task:
    """One piece of long work with a known (or unknown) number of steps; a context manager."""

    def __init__(self, description: str, total: int | None, unit: str = "items") -> None:
        self.description, self.total, self.unit = description, total, unit
        self.completed = 0
        self._reporter = _reporter
        self._handle: Any = None

    def __enter__(self) -> Task:
        self._handle = self._reporter.start(self.description, self.total, self.unit)
        return self

    def advance(self, n: int = 1, note: str = "") -> None:
        self.update(self.completed + n, note)

    def update(self, completed: int, note: str = "") -> None:
        self.completed = completed
        self._reporter.update(self._handle, completed, note)

    def __exit__(self, *exc: object) -> None:
        self._reporter.finish(self._handle, self.completed)


def task(description: str, total: int | None, unit: str = "items") -> Task:
    return Task(description, total, unit)
