"""Progress reporting: plain log lines with counts, rate and ETA off a terminal; rich bars on one."""

import io
import logging
import time
from contextlib import contextmanager

from dermt2im.core import progress


@contextmanager
def _log_lines(caplog, interval: float):
    """Progress reported as log lines every ``interval`` s for the block, then the reporter as it was."""
    caplog.set_level(logging.INFO, logger="dermt2im.core.progress")
    previous = progress.use(progress.LogReporter(interval=interval))
    try:
        yield
    finally:
        progress.use(previous)


def test_log_lines_say_count_share_rate_and_eta_then_the_total(caplog):
    with _log_lines(caplog, 0.0), progress.task("render shard 3", total=4, unit="images") as bar:
        for _ in range(4):
            time.sleep(0.01)
            bar.advance(note="batch done")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("render shard 3: 1/4 images (25%), ") and " images/s, ETA " in lines[0]
    assert lines[0].endswith(", batch done")
    assert lines[-1].startswith("render shard 3: 4/4 images in 0 s (") and lines[-1].endswith(" images/s)")


def test_log_lines_are_throttled(caplog):
    with _log_lines(caplog, 3600), progress.task("preprocess seeds", total=1000, unit="images") as bar:
        for _ in range(1000):
            bar.advance()
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["preprocess seeds: 1000/1000 images"]


def test_rich_bars_show_description_counts_rate_and_eta():
    from rich.console import Console

    from dermt2im.progress_bar import RichReporter

    out = io.StringIO()
    reporter = RichReporter(Console(file=out, force_terminal=True, width=140))
    previous = progress.use(reporter)
    try:
        with progress.task("train LoRA abc", total=3, unit="steps") as bar:
            for step in range(1, 4):
                time.sleep(0.02)
                bar.update(step, note=f"loss {1.0 / step:.2f}")
    finally:
        progress.use(previous)
    text = out.getvalue()
    assert "train LoRA abc" in text and "3/3" in text and "steps/s" in text and "ETA" in text
    assert reporter._progress is None  # the display stops once no work is left
