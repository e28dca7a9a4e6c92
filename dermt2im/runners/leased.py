"""The leased runner: many workers split one stage's units through leases (scale-out generation).

Each worker runs ``run_claimed``: it scans the stage's units, claims one that is neither finished nor
validly leased (``dermt2im.runners.leases``), runs it while a heartbeat renews the lease, releases
it, and goes on. When every remaining unit is leased by someone else it waits and looks again, so a
unit whose worker died is taken over once that lease expires (``runtime.generate.lease_seconds``).
It returns when every unit is finished (or at ``timeout``), after closing the stage.

Nothing is duplicated or lost when a worker dies mid-unit, because a stage's units are idempotent
(generation: PNGs written atomically, a PNG written but never recorded is adopted, rows recorded by
``sample_key``). Units are integers (shard numbers); leases live in ``<folder>`` on storage every
worker sees (one host, or a shared POSIX filesystem).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from dermt2im.runners import leases
from dermt2im.stage import Stage

log = logging.getLogger(__name__)

__all__ = ["default_owner", "run_claimed"]


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_claimed(stage: Stage[int], folder: str | Path, *, ttl: float, owner: str | None = None,
                poll_seconds: float = 2.0, timeout: float | None = None) -> dict[str, Any]:
    """Run the stage's unfinished units, claiming each through a lease in ``folder``, until all are
    finished; returns what this worker did. ``timeout``: give up waiting on other workers' units
    after this many seconds (None: wait as long as they hold valid leases)."""
    owner = owner or default_owner()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    units = [int(u) for u in stage.units()]
    t0 = time.monotonic()
    done: set[int] = set()
    mine: list[int] = []
    results: list[dict[str, Any]] = []
    takeovers = waits = 0
    log.info("worker %s: %d unit(s) of %s, lease %.0f s", owner, len(units), stage.name, ttl)
    while True:
        progressed = False
        for unit in units:
            if unit in done:
                continue
            current = leases.read_lease(folder, unit)
            if current is not None and not current.expired():
                continue  # someone is on it
            if stage.finished(unit) is not None:
                done.add(unit)
                continue
            lease = leases.claim(folder, unit, owner, ttl)
            if lease is None:
                continue  # lost the race for it
            takeovers += current is not None
            with leases.holding(folder, lease) as beat:
                results.append(stage.run(unit))
            mine.append(unit)
            if beat.lost:
                log.warning("worker %s: %s was taken over while running (idempotent: no harm)", owner,
                            stage.describe(unit))
            if stage.finished(unit) is not None:
                done.add(unit)
            progressed = True
            break  # rescan from the start: units finished by others meanwhile are seen as done
        if len(done) == len(units):
            break
        if timeout is not None and time.monotonic() - t0 > timeout:
            log.warning("worker %s: %d unit(s) still not done after %.0f s", owner, len(units) - len(done), timeout)
            break
        if not progressed:
            waits += 1
            time.sleep(poll_seconds)
    complete = len(done) == len(units)
    closing = stage.close(results) if complete else {}
    if complete:
        leases.sweep_temporaries(folder, older_than=max(ttl, 10.0))
    seconds = time.monotonic() - t0
    images = sum(int(r.get("rendered", 0)) for r in results)
    log.info("worker %s: %d unit(s) (%d taken over) in %.1f s; %s", owner, len(mine), takeovers, seconds,
             "all done" if complete else "NOT all done")
    return {"owner": owner, "shards": mine, "images": images, "takeovers": takeovers, "waits": waits,
            "planned_shards": len(units), "done_shards": len(done), "complete": complete,
            "seconds": round(seconds, 3), "closing": closing}
