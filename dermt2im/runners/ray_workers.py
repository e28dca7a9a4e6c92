"""What runs on the Ray cluster: long-lived unit workers (actors) and one-off unit tasks.

Imported by ``dermt2im.runners.ray_runner`` only, once Ray is needed.

``UnitWorker`` holds a copy of the stage, warms it once (generate: the pipeline with the LoRA fused
and the samplers built) and runs the units handed to it. ``WorkerPool`` keeps one per placement
(usually one per GPU) and hands each unit to whichever is free:

* Ray restarts an actor whose process died (``max_restarts``) and re-runs the call it was making
  (``max_task_retries``): the caller sees nothing but the time it took;
* an actor Ray gave up on (``ActorDiedError``) is replaced by a new one while
  ``scale.actor_replacements`` last, and its unit goes to the next free actor, at most
  ``scale.shard_attempts`` times;
* an error raised by the unit itself (bad input, a missing file) is not retried here: it reaches
  the caller as itself, and the Prefect adapter retries only transient ones.

``RemoteTasks`` runs each unit as a Ray task with ``scale.gpus_per_cell`` GPUs, re-run by Ray when
its process dies (``scale.task_retries``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dermt2im.core.runtime import ScaleConfig
from dermt2im.runners.ray_runner import ClusterError
from dermt2im.stage import Stage, Summary

log = logging.getLogger(__name__)

STATUS = "status"  # the actor's concurrency group that answers while a unit runs


def whoami() -> dict[str, Any]:
    return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}


def _worker_logging() -> None:
    """The CLI's log format and levels, in a Ray worker process (its lines reach the driver)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore", "urllib3", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # probes for CUDA kernels even on CPU


class UnitWorker:
    """One long-lived process running the units of one stage (see the module docstring)."""

    def __init__(self, stage: Stage) -> None:
        _worker_logging()
        self.stage, self.unit, self.done = stage, None, 0
        t0 = time.perf_counter()
        stage.warm()  # type: ignore[attr-defined]
        self.load_seconds = time.perf_counter() - t0
        log.info("%s worker ready in %.1f s (pid %d)", stage.name, self.load_seconds, os.getpid())

    def ready(self) -> dict[str, Any]:
        return {**whoami(), "load_seconds": self.load_seconds}

    def run(self, unit: Any, key: str) -> Summary:
        self.unit = unit
        try:
            summary = self.stage.run(unit, key)
        finally:
            self.unit = None
        self.done += 1
        return {**summary, "worker": {**whoami(), "load_seconds": round(self.load_seconds, 3)}}

    @ray.method(concurrency_group=STATUS)
    def status(self) -> dict[str, Any]:
        """What this worker is doing, answered while a unit runs."""
        return {**whoami(), "unit": self.unit, "done": self.done, "load_seconds": self.load_seconds}


RemoteUnitWorker = ray.remote(concurrency_groups={STATUS: 1})(UnitWorker)


@ray.remote
def run_unit_task(stage: Stage, unit: Any, key: str) -> Summary:
    _worker_logging()
    return {**stage.run(unit, key), "worker": whoami()}


def result(ref: Any) -> Any:
    """``ray.get``, with an error the unit raised re-raised as itself (chained to Ray's report)."""
    try:
        return ray.get(ref)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from err
        raise


class WorkerPool:
    """One ``UnitWorker`` per entry of ``nodes`` (a node id each), the units handed to free ones."""

    def __init__(self, stage: Stage, nodes: Sequence[str], scale: ScaleConfig, env: dict[str, str]) -> None:
        self.stage, self.scale, self.env = stage, scale, env
        self.run_id = uuid.uuid4().hex[:8]
        self._nodes = list(nodes)
        self._made = 0
        self._replacements_left = scale.actor_replacements
        self._cond = threading.Condition()
        self.handles: dict[int, Any] = {slot: self._start(slot) for slot in range(len(self._nodes))}
        self._free = collections.deque(self.handles)
        try:
            ready = ray.get([h.ready.remote() for h in self.handles.values()], timeout=scale.start_timeout_s)
        except GetTimeoutError:
            self.close()
            raise ClusterError(f"{stage.name}: {len(self._nodes)} worker(s) not ready after {scale.start_timeout_s:g} s "
                               "(not enough free resources on the cluster, or a very slow model load: "
                               "scale.start_timeout_s)") from None
        except BaseException:
            self.close()
            raise
        self.load_seconds = [r["load_seconds"] for r in ready]

    def __len__(self) -> int:
        return len(self.handles)

    def _start(self, slot: int) -> Any:
        self._made += 1
        return RemoteUnitWorker.options(
            name=f"{self.stage.name}-{self.run_id}-{slot}-{self._made}", namespace=self.scale.namespace,
            num_gpus=self.scale.gpus_per_actor, num_cpus=self.scale.cpus_per_actor,
            max_restarts=self.scale.actor_restarts, max_task_retries=self.scale.task_retries,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self._nodes[slot], soft=True),
            runtime_env={"env_vars": self.env},
        ).remote(self.stage)  # by value (small: see GenerateStage.__getstate__), so a restart never misses it

    @contextlib.contextmanager
    def _lease(self) -> Iterator[int]:
        with self._cond:
            while not self._free:
                if not self.handles:
                    raise ClusterError(f"{self.stage.name}: no worker left (every one died and "
                                       f"scale.actor_replacements={self.scale.actor_replacements} are used up)")
                self._cond.wait(timeout=1.0)
            slot = self._free.popleft()
        try:
            yield slot
        finally:
            with self._cond:
                if slot in self.handles:
                    self._free.append(slot)
                self._cond.notify_all()

    def _replace(self, slot: int, dead: Any) -> None:
        with self._cond:
            if self.handles.get(slot) is not dead:
                return
            if self._replacements_left > 0:
                self._replacements_left -= 1
                self.handles[slot] = self._start(slot)
                log.warning("%s: worker %d died for good; started a new one (%d replacement(s) left)",
                            self.stage.name, slot, self._replacements_left)
            else:
                del self.handles[slot]
                log.warning("%s: worker %d died for good and no replacement is left", self.stage.name, slot)

    def run(self, unit: Any, key: str) -> Summary:
        """Run ``unit`` on a free worker, on another one if its worker dies for good."""
        failures: list[str] = []
        for attempt in range(1, self.scale.shard_attempts + 1):
            with self._lease() as slot:
                handle = self.handles[slot]
                try:
                    return result(handle.run.remote(unit, key))
                except ActorDiedError as err:
                    failures.append(f"worker died ({err.__class__.__name__})")
                    self._replace(slot, handle)
                except ActorUnavailableError as err:
                    failures.append(f"worker unreachable ({err.__class__.__name__})")
            log.warning("%s: attempt %d of %d failed: %s", self.stage.describe(unit), attempt,
                        self.scale.shard_attempts, failures[-1])
        raise ClusterError(f"{self.stage.describe(unit)}: given up after {len(failures)} attempt(s): "
                           + "; ".join(failures))

    def status(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """What every worker is doing (those that do not answer in time are left out)."""
        out = []
        for slot, handle in list(self.handles.items()):
            with contextlib.suppress(Exception):
                out.append({"slot": slot, **ray.get(handle.status.remote(), timeout=timeout)})
        return out

    def close(self) -> None:
        for handle in list(self.handles.values()):
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)


class RemoteTasks:
    """Each unit of ``stage`` as a Ray task holding ``scale.gpus_per_cell`` GPUs."""

    def __init__(self, stage: Stage, scale: ScaleConfig, env: dict[str, str]) -> None:
        self.stage = stage
        self._stage_ref = ray.put(stage)
        self._options = {"num_gpus": scale.gpus_per_cell, "num_cpus": scale.cpus_per_cell,
                         "max_retries": scale.task_retries, "retry_exceptions": False,
                         "runtime_env": {"env_vars": env}}

    def run(self, unit: Any, key: str) -> Summary:
        name = self.stage.describe(unit)
        return result(run_unit_task.options(name=name, **self._options).remote(self._stage_ref, unit, key))
