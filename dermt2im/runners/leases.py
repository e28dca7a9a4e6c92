"""Shard leases: files that say "this worker is rendering this shard, until <expiry>".

A lease is ``<dir>/shard-NNNNNN.json``; ``dir`` is usually ``W/synthetic/.leases`` on storage that
every worker sees (one host, or a POSIX shared filesystem with atomic link / rename).

* **claim**: the lease is written to a unique temporary file and hard-linked onto its name;
  ``link`` fails when the name exists, so exactly one claimer wins and nobody ever reads a
  half-written lease.
* **renew**: the holder rewrites its lease (temporary file + ``os.replace``) with a later expiry,
  after checking the file still carries its token.
* **take over**: a lease whose expiry has passed (its holder died or stalled) is first renamed to
  a unique tombstone in ``<dir>/expired/``. Only one contender's rename can move a given file;
  the winner checks the tombstone is the very lease it judged expired (else it puts it back and
  gives up), then claims as above. Tombstones stay as a record of takeovers.
* **release**: the holder removes its lease after checking its token.

Leases only avoid duplicate *work*. Correctness does not rest on them: rendering is idempotent
and rows are recorded by ``sample_key`` (``manifest.record_rows``), so even two holders of one shard
(a holder stalled for longer than the TTL, then resumed) make the same rows, never duplicates.
Expiry uses wall-clock time, so hosts sharing a lease folder need roughly synchronised clocks
(well within the TTL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

__all__ = ["Lease", "LeaseHeartbeat", "claim", "holding", "lease_path", "read_lease", "release", "renew",
           "sweep_temporaries"]


@dataclass(frozen=True)
class Lease:
    shard: int
    owner: str  # who holds it (a worker / flow-run id)
    token: str  # unique per claim: tells this claim from any earlier or later one by the same owner
    host: str
    pid: int
    acquired: float  # wall-clock seconds (time.time())
    expires: float
    ttl: float

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


def lease_path(folder: str | Path, shard: int) -> Path:
    return Path(folder) / f"shard-{int(shard):06d}.json"


def read_lease(folder: str | Path, shard: int) -> Lease | None:
    """The current lease of ``shard``, or None when there is none."""
    return _read(lease_path(folder, shard))


def _read(path: Path) -> Lease | None:
    try:
        return Lease(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:  # not ours / corrupt: treat as long expired, so it can be taken over
        log.warning("unreadable lease %s (%s): treating it as expired", path, err)
        return Lease(shard=-1, owner="?", token="?", host="?", pid=-1, acquired=0.0, expires=0.0, ttl=0.0)


def _temp_with(folder: Path, lease: Lease) -> Path:
    tmp = folder / f".{lease.token}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as fh:
        json.dump(asdict(lease), fh)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _new_lease(shard: int, owner: str, ttl: float) -> Lease:
    now = time.time()
    return Lease(shard=int(shard), owner=str(owner), token=uuid.uuid4().hex, host=socket.gethostname(),
                 pid=os.getpid(), acquired=now, expires=now + float(ttl), ttl=float(ttl))


def _link_claim(folder: Path, shard: int, owner: str, ttl: float) -> Lease | None:
    lease = _new_lease(shard, owner, ttl)
    tmp = _temp_with(folder, lease)
    try:
        os.link(tmp, lease_path(folder, shard))
        return lease
    except FileExistsError:
        return None
    finally:
        tmp.unlink(missing_ok=True)


def claim(folder: str | Path, shard: int, owner: str, ttl: float, *, now: float | None = None) -> Lease | None:
    """Take the lease of ``shard`` for ``owner`` for ``ttl`` seconds; None when someone holds it.

    A lease that has expired (at ``now``, default the current time) is taken over; of several
    workers taking over the same expired lease at once, exactly one succeeds.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    got = _link_claim(folder, shard, owner, ttl)
    if got is not None:
        return got
    path = lease_path(folder, shard)
    current = _read(path)
    if current is None:  # released between our link and our read: try once more
        return _link_claim(folder, shard, owner, ttl)
    if not current.expired(now):
        return None
    tombs = folder / "expired"
    tombs.mkdir(exist_ok=True)
    tomb = tombs / f"{path.stem}.{uuid.uuid4().hex}.json"
    try:
        os.rename(path, tomb)  # only one contender can move this file
    except FileNotFoundError:  # another contender moved it (or its holder released it) first
        return None
    moved = _read(tomb)
    if moved is None or moved.token != current.token:
        # We moved a newer lease (a contender's fresh claim, or a renewal): put it back, give up.
        with contextlib.suppress(FileExistsError):
            os.link(tomb, path)
        tomb.unlink(missing_ok=True)
        return None
    log.warning("shard %d: lease of %s (host %s, pid %d) expired %.1f s ago: taking it over", shard,
                current.owner, current.host, current.pid, (time.time() if now is None else now) - current.expires)
    return _link_claim(folder, shard, owner, ttl)


def renew(folder: str | Path, lease: Lease, ttl: float | None = None) -> Lease | None:
    """Extend ``lease``; returns the renewed lease, or None when it is no longer ours (taken over)."""
    folder = Path(folder)
    path = lease_path(folder, lease.shard)
    current = _read(path)
    if current is None or current.token != lease.token:
        return None
    ttl = lease.ttl if ttl is None else float(ttl)
    fresh = Lease(**{**asdict(lease), "expires": time.time() + ttl, "ttl": ttl})
    tmp = _temp_with(folder, fresh)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return fresh


def release(folder: str | Path, lease: Lease) -> bool:
    """Remove ``lease`` if it is still ours; True when it was."""
    path = lease_path(folder, lease.shard)
    current = _read(path)
    if current is None or current.token != lease.token:
        return False
    path.unlink(missing_ok=True)
    return True


class LeaseHeartbeat:
    """Renews a lease every ``ttl / 3`` seconds in a daemon thread while work goes on."""

    def __init__(self, folder: str | Path, lease: Lease, interval: float | None = None):
        self.folder = Path(folder)
        self.lease = lease
        self.interval = interval if interval is not None else max(lease.ttl / 3.0, 0.05)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-shard-{lease.shard}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                renewed = renew(self.folder, self.lease)
            except OSError as err:  # transient (shared filesystem hiccup): try again next beat
                log.warning("shard %d: could not renew lease: %s", self.lease.shard, err)
                continue
            if renewed is None:
                self.lost = True
                log.warning("shard %d: lease lost to another worker (this one stalled past its TTL)", self.lease.shard)
                return
            self.lease = renewed

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def holding(folder: str | Path, lease: Lease) -> Iterator[LeaseHeartbeat]:
    """Keep ``lease`` renewed inside the block and release it afterwards (also on errors)."""
    beat = LeaseHeartbeat(folder, lease)
    try:
        with beat:
            yield beat
    finally:
        release(folder, beat.lease)


def sweep_temporaries(folder: str | Path, older_than: float = 60.0) -> int:
    """Remove lease temporaries a killed worker left (a live one keeps its own for milliseconds)."""
    n = 0
    cutoff = time.time() - older_than
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                n += 1
    return n
