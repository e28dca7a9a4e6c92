"""Scale-out generation: several workers split one plan through shard leases.

Each worker runs ``run_worker``: it scans the plan's shards, claims one that is neither done nor
validly leased (``dermt2im.runners.leases``), renders it with ``render_shard`` while a heartbeat renews the
lease, releases it, and goes on. When every remaining shard is leased by someone else it waits and
looks again, so a shard whose worker died is taken over once that lease expires
(``generate.lease_seconds``). It returns when every shard is done (or at ``timeout``).

Nothing is duplicated or lost when a worker dies mid-shard: ``render_shard`` is idempotent (PNGs
are written atomically, a PNG written but never recorded is adopted, temporaries are removed) and
rows are recorded by ``sample_key`` (``manifest.record_rows``: an upsert under a lock, or an appended
part on an object store, which each worker folds in after its shard). Leases live in
``W/synthetic/.leases``; all workers must see the same workdir (one host, or a shared POSIX
filesystem), while the manifests and images may sit in a bucket (``storage.manifests``,
``generate.image_store``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path

import pandas as pd

from dermt2im.generate import stage as gen
from dermt2im.runners import leases
from dermt2im.core.config import LABELS, FactoryConfig
from dermt2im.core.manifest import PLAN, SYNTHETIC, compact, read_manifest
from dermt2im.generate.plan import shards_of
from dermt2im.core.workdir import Workdir

log = logging.getLogger(__name__)

__all__ = ["default_owner", "leases_folder", "plan_shards", "run_worker", "shard_done"]

# Test-only: seconds to sleep before each PNG write, so a test can kill a worker mid-shard.
TEST_WRITE_DELAY_ENV = "DERMT2IM_TEST_WRITE_DELAY"


def leases_folder(workdir: Workdir) -> Path:
    return workdir.synthetic / ".leases"


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def plan_shards(workdir: Workdir) -> list[int]:
    """The plan's shards, one class after the other (per-class LoRAs: one pipeline swap per class)."""
    plan = read_manifest(workdir.plan_manifest, PLAN)
    if plan.empty:
        raise gen.GenerationError(f"no plan at {workdir.plan_manifest}: plan first (dermt2im generate)")
    return sorted(shards_of(plan), key=lambda s: (s % len(LABELS), s))


def shard_done(workdir: Workdir, cfg: FactoryConfig, shard: int, lora: Path | None, *,
               plan: pd.DataFrame | None = None, recorded: pd.DataFrame | None = None) -> bool:
    """Every image of the shard is on disk *and* recorded (``generation.shard_complete``)."""
    return gen.shard_complete(workdir, cfg, shard, lora, plan=plan, recorded=recorded)


def _install_test_write_delay() -> None:
    delay = float(os.environ.get(TEST_WRITE_DELAY_ENV) or 0)
    if delay <= 0 or getattr(gen._write_png, "_dermt2im_delayed", False):
        return
    original = gen._write_png

    def slow_write(target, data):
        time.sleep(delay)
        return original(target, data)

    slow_write._dermt2im_delayed = True  # type: ignore[attr-defined]
    gen._write_png = slow_write
    log.warning("%s=%s: every PNG write sleeps first (tests only)", TEST_WRITE_DELAY_ENV, delay)


def run_worker(
    workdir: Workdir,
    cfg: FactoryConfig,
    *,
    lora: Path | None,
    owner: str | None = None,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
    pipe=None,
) -> dict:
    """Render shards of the existing plan until all are done; returns what this worker did.

    ``lora``: a resolved LoRA run folder or weights file (None: base model). ``timeout``: give up
    waiting on other workers' shards after this many seconds (None: wait as long as they hold
    valid leases; a dead worker's lease expires after ``cfg.generate.lease_seconds``).
    """
    _install_test_write_delay()
    owner = owner or default_owner()
    ttl = float(cfg.generate.lease_seconds)
    folder = leases_folder(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(workdir)
    plan = read_manifest(workdir.plan_manifest, PLAN)
    t0 = time.monotonic()
    done: set[int] = set()
    mine: list[int] = []
    images = 0
    takeovers = 0
    waits = 0
    log.info("worker %s: %d shard(s) in the plan, lease %.0f s", owner, len(shards), ttl)
    while True:
        progressed = False
        recorded = read_manifest(workdir.synthetic_manifest, SYNTHETIC)  # one read per scan, not per shard
        for shard in shards:
            if shard in done:
                continue
            current = leases.read_lease(folder, shard)
            if current is not None and not current.expired():
                continue  # someone is on it
            if shard_done(workdir, cfg, shard, lora, plan=plan, recorded=recorded):
                done.add(shard)
                continue
            lease = leases.claim(folder, shard, owner, ttl)
            if lease is None:
                continue  # lost the race for it
            if current is not None:
                takeovers += 1
            with leases.holding(folder, lease) as beat:
                recorded = gen.render_shard(workdir, cfg, shard, lora=lora, pipe=pipe)
            images += len(recorded)
            mine.append(shard)
            if beat.lost:
                log.warning("worker %s: shard %d was taken over while rendering (idempotent: no harm)", owner, shard)
            if workdir.manifests_are_remote:  # keep the appended parts few, so every read stays cheap
                compact(workdir.synthetic_manifest, SYNTHETIC, workdir.locks)
            if shard_done(workdir, cfg, shard, lora, plan=plan):
                done.add(shard)
            progressed = True
            break  # rescan from the start: shards finished by others meanwhile are seen as done
        if len(done) == len(shards):
            break
        if timeout is not None and time.monotonic() - t0 > timeout:
            log.warning("worker %s: %d shard(s) still not done after %.0f s", owner, len(shards) - len(done), timeout)
            break
        if not progressed:
            waits += 1
            time.sleep(poll_seconds)
    complete = len(done) == len(shards)
    if complete:
        leases.sweep_temporaries(folder, older_than=max(ttl, 10.0))
    seconds = time.monotonic() - t0
    log.info("worker %s: rendered %d image(s) in %d shard(s) (%d taken over) in %.1f s; plan %s", owner, images,
             len(mine), takeovers, seconds, "complete" if complete else "NOT complete")
    return {
        "owner": owner,
        "shards": mine,
        "images": images,
        "takeovers": takeovers,
        "waits": waits,
        "planned_shards": len(shards),
        "done_shards": len(done),
        "complete": complete,
        "seconds": round(seconds, 3),
    }
