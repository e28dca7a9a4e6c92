"""Scale-out on a Ray cluster: a stage's units run on Ray while this process (the CLI, or a
Prefect flow run) stays the driver that decides what is stale and closes the stage.

Two shapes, chosen by the stage:

* **long-lived workers** for a stage that has a ``warm()`` method (generate: one renderer actor per
  GPU loads the base model, fuses the LoRA and builds the samplers once, then renders every shard
  handed to it; ``dermt2im.runners.ray_workers.WorkerPool``). Ray restarts a killed actor and re-runs
  its call (``scale.actor_restarts``, ``scale.task_retries``); the pool starts a new actor for one Ray
  gave up on and gives the unit to whichever actor is free, ``scale.shard_attempts`` times at most.
* **independent tasks** for any other stage (validate: one Ray task per (model, regime, seed) cell
  holding ``scale.gpus_per_cell`` GPUs), re-run by Ray when their process dies.

A retried unit is safe because every stage's ``run`` is idempotent through its manifests (a shard
skips recorded images, adopts PNGs written before the crash and records rows by sample key).

Ray's own API rather than prefect-ray's ``RayTaskRunner``: that runner ships each Prefect task to
a fresh Ray worker process, which cannot keep a loaded pipeline between shards, so every shard
would pay the model load (the cost this module exists to pay once). Prefect still shows one task
run per unit: the runner core (``dermt2im.runners.core``) submits them on threads that wait for the
cluster.

Ray is imported only here, and only when a stage has work left: with everything up to date no
Ray process is started or contacted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dermt2im.core.errors import DermT2imError
from dermt2im.core.runtime import ScaleConfig
from dermt2im.runners.scaling import Placed
from dermt2im.stage import Stage, Summary

log = logging.getLogger(__name__)


class ClusterError(DermT2imError, RuntimeError):
    """The Ray cluster cannot be reached, or cannot hold what the config asks of it."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError("scale.ray_address is set but Ray is not installed here: pip install 'dermt2im[ray]' "
                           "(the same Ray version as the cluster)") from None
    return ray


def worker_env(scale: ScaleConfig) -> dict[str, str]:
    """The variables of ``scale.forward_env`` that are set here, for the Ray workers' environment."""
    return {name: os.environ[name] for name in scale.forward_env if os.environ.get(name)}


def _local_cluster_defaults() -> None:
    # Before Ray is imported: a Ray started here listens on 127.0.0.1 only, and with a token of its
    # own unless one is given, so that nothing is written to ~/.ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A clear error at once for a head nobody answers at (``ray.init`` would retry for minutes)."""
    if address is None or address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ClusterError(f"nothing answers at the Ray cluster address {address} ({err.strerror or err}): is the "
                           "head running, and is scale.ray_address its GCS address (host:6379) or its Ray Client "
                           "address (ray://host:10001)?") from None


@contextlib.contextmanager
def connected(scale: ScaleConfig) -> Iterator[Any]:
    """The ``ray`` module, connected to ``scale.ray_address`` for the block (then disconnected,
    unless this process was connected before)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if scale.ray_address == "local":
        _local_cluster_defaults()
    already = sys.modules.get("ray")
    if already is not None and already.is_initialized():
        yield already
        return
    check_reachable(scale.ray_address)
    ray = import_ray()
    options: dict[str, Any] = {"address": scale.ray_address, "namespace": scale.namespace,
                               "logging_level": logging.WARNING}
    if scale.ray_address == "local":
        options["include_dashboard"] = False
    try:
        ray.init(**options)
    except Exception as err:  # noqa: BLE001 - every way of not reaching it reads the same to the user
        raise ClusterError(f"cannot connect to the Ray cluster at {scale.ray_address}: {err}") from err
    try:
        yield ray
    finally:
        ray.shutdown()


def placements(nodes: Sequence[dict], scale: ScaleConfig) -> list[str]:
    """One node id per actor to start: ``scale.actors_per_node`` on every live node that can hold
    one (by default as many as its GPUs allow, or one on a CPU node), never more than fit."""
    out: list[str] = []
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources") or {}
        fits = [math.floor(have.get(kind, 0.0) / need + 1e-9)
                for kind, need in (("GPU", scale.gpus_per_actor), ("CPU", scale.cpus_per_actor)) if need > 0]
        wanted = scale.actors_per_node or (min(fits) if scale.gpus_per_actor > 0 else 1)
        room = min(fits) if fits else wanted
        if room <= 0:
            continue
        if wanted > room:
            log.warning("node %s has room for %d actor(s), not scale.actors_per_node=%d", node.get("NodeID"), room,
                        wanted)
        out += [node["NodeID"]] * min(wanted, room)
    return out


def check_fits(nodes: Sequence[dict], gpus: float, cpus: float, what: str, address: str | None) -> None:
    """A clear error instead of a unit Ray would queue forever: no live node has the resources."""
    for node in nodes:
        have = node.get("Resources") or {}
        if node.get("Alive", True) and have.get("GPU", 0.0) >= gpus and have.get("CPU", 0.0) >= cpus:
            return
    raise ClusterError(f"no node of the Ray cluster at {address} has {gpus:g} GPU(s) and {cpus:g} CPU(s) for {what}; "
                       "on CPU-only nodes set the scale section's gpus_per_actor / gpus_per_cell to 0")


class RemoteStage:
    """``stage`` whose ``run(unit)`` executes on the cluster (``execute``); its other methods run
    here, one caller at a time, while any number of units are out on the cluster."""

    def __init__(self, stage: Stage, execute: Callable[[Any, str], Summary], pool: Any = None) -> None:
        self.stage, self.execute, self.pool = stage, execute, pool
        self.name = stage.name
        self._lock = threading.Lock()

    def units(self) -> list[Any]:
        with self._lock:
            return list(self.stage.units())

    def describe(self, unit: Any) -> str:
        with self._lock:
            return self.stage.describe(unit)

    def key(self, unit: Any) -> str:
        with self._lock:
            return self.stage.key(unit)

    def finished(self, unit: Any, key: str) -> Summary | None:
        with self._lock:
            return self.stage.finished(unit, key)

    def run(self, unit: Any, key: str) -> Summary:
        return self.execute(unit, key)

    def close(self, results: Sequence[Summary]) -> Summary:
        with self._lock:
            return self.stage.close(results)


@contextlib.contextmanager
def on_ray(stage: Stage, scale: ScaleConfig) -> Iterator[Placed]:
    """``stage`` placed on the Ray cluster at ``scale.ray_address`` for the block: workers started
    (and stopped afterwards) only when some unit is not finished."""
    from dermt2im.runners.core import survey

    todo = [u for u in survey(stage) if not u.cached]
    if not todo:
        log.info("%s: every unit is up to date; Ray not needed", stage.name)
        yield Placed(stage)
        return
    with connected(scale) as ray:
        from dermt2im.runners import ray_workers

        nodes = ray.nodes()
        env = worker_env(scale)
        if callable(getattr(stage, "warm", None)):
            where = placements(nodes, scale)
            if not where:
                check_fits(nodes, scale.gpus_per_actor, scale.cpus_per_actor, f"a {stage.name} actor",
                           scale.ray_address)
            pool = ray_workers.WorkerPool(stage, where, scale, env)
            try:
                log.info("%s: %d unit(s) on %d actor(s) of the Ray cluster at %s", stage.name, len(todo), len(pool),
                         scale.ray_address)
                yield Placed(RemoteStage(stage, pool.run, pool), concurrency=len(pool), on_ray=True)
            finally:
                pool.close()
        else:
            check_fits(nodes, scale.gpus_per_cell, scale.cpus_per_cell, f"a {stage.name} task", scale.ray_address)
            tasks = ray_workers.RemoteTasks(stage, scale, env)
            log.info("%s: %d unit(s) as Ray tasks on the cluster at %s", stage.name, len(todo), scale.ray_address)
            yield Placed(RemoteStage(stage, tasks.run), concurrency=len(todo), on_ray=True)
