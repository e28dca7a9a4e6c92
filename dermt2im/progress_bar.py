"""Progress bars on an interactive terminal (rich), for the CLI: one line per piece of long work with
its description, a bar, done / total, rate and ETA (``dermt2im.core.progress`` says what runs).

Log lines go through the same rich console (``RichHandler``), so they print above the bars instead
of tearing them. Bars of finished work stay on screen; a new display starts with the next work.
"""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, in the task's own unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        return Text(f"{speed:.2f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


class RichReporter:
    """``dermt2im.core.progress.Reporter`` drawing rich bars on ``console``."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._active = 0

    def _display(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), TextColumn("[dim]{task.fields[note]}"),
                console=self.console, redirect_stdout=True, redirect_stderr=True)
            self._progress.start()
        return self._progress

    def start(self, description: str, total: int | None, unit: str) -> Any:
        with self._lock:
            self._active += 1
            return self._display().add_task(description, total=total, unit=unit, note="")

    def update(self, handle: Any, completed: int, note: str = "") -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.update(handle, completed=completed, note=note)

    def finish(self, handle: Any, completed: int) -> None:
        with self._lock:
            if self._progress is None:
                return
            self._progress.update(handle, completed=completed)
            self._progress.stop_task(handle)
            self._active -= 1
            if self._active == 0:  # the finished bars stay printed; the next work gets a fresh display
                self._progress.stop()
                self._progress = None

    def close(self) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
