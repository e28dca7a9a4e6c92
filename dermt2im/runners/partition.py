"""A static share of a stage's units, for batch schedulers without Ray (Slurm job arrays,
Kubernetes indexed Jobs, N runs of a Prefect deployment).

``Partition(stage, index, count)`` is the stage restricted to the units whose number modulo
``count`` is ``index``: the ``count`` partitions hold every unit exactly once, and a unit keeps its
partition when the plan grows (shard numbers never change, ``dermt2im.generate.plan``). Nothing is
claimed or shared between the partitions: a partition whose job died is simply run again (its
finished units are skipped), which is what a batch scheduler's retry does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dermt2im.core.errors import DermT2imError
from dermt2im.stage import Stage, Summary


class PartitionError(DermT2imError, ValueError):
    pass


def check_partition(index: int, count: int) -> None:
    if count < 1:
        raise PartitionError(f"num_shards must be at least 1, got {count}")
    if not 0 <= index < count:
        raise PartitionError(f"shard_index {index} is not in 0..{count - 1}: it counts from 0 and stays below "
                             f"num_shards ({count})")


class Partition:
    """``stage`` with only the units ``u`` where ``int(u) % count == index``."""

    def __init__(self, stage: Stage, index: int, count: int) -> None:
        check_partition(index, count)
        self.stage, self.index, self.count = stage, index, count
        self.name = stage.name
        self.tags = getattr(stage, "tags", ())  # a partition is a runner's choice, not a placement on Ray

    def units(self) -> list[Any]:
        return [u for u in self.stage.units() if int(u) % self.count == self.index]

    def describe(self, unit: Any) -> str:
        return self.stage.describe(unit)

    def key(self, unit: Any) -> str:
        return self.stage.key(unit)

    def finished(self, unit: Any, key: str) -> Summary | None:
        return self.stage.finished(unit, key)

    def run(self, unit: Any, key: str) -> Summary:
        return self.stage.run(unit, key)

    def close(self, results: Sequence[Summary]) -> Summary:
        return self.stage.close(results)
