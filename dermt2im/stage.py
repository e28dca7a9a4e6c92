"""The Stage protocol: one shape for every stage of the factory.

A stage's work is split into *units*: one dataset for ingest and preprocess, one LoRA run for train,
one shard for generate, one (model, regime, seed) cell for validate. For each unit a stage says:

``key(unit)``
    The content key of everything the unit's output depends on (``dermt2im.core.identity``: the
    inputs' content, the stage's spec, its code identity, where its output goes).
``finished(unit, key)``
    The summary of the unit's output when that output exists and was made for ``key``, else None.
    Together with ``key`` this is the only place where a stage's work is judged stale, and runners
    use these keys and no others (``dermt2im.runners.core``).
``run(unit, key)``
    Make the output, record it as made for ``key``, and return its summary: a small JSON-able dict
    (paths, counts, digests; never tensors or pipelines).
``describe(unit)``
    What the unit does, in words ("render shard 3"), for log lines and task-run names.

``units()`` may first prepare what the units depend on (generate makes or extends its plan);
``close(results)`` runs once after every unit (fold manifest parts in, write the reports) and
returns the stage's summary. ``StageClass.of(workdir, cfg, **choices)`` builds a stage from a
workdir and its factory config; ``dermt2im.pipelines`` does so, once per stage, for every pipeline.

The stages know nothing of how they are run. The runner core (``dermt2im.runners.core``) asks
every unit's key and ``finished``, runs the rest and closes the stage, for the CLI
(``dermt2im.runners.sequential``) and the Prefect adapter (``dermt2im.tasks.stage``) alike; either
may hand ``run`` to a Ray cluster (``dermt2im.runners.ray_runner``: long-lived workers for a stage
with a ``warm()`` method, such as generate's renderers, one task per unit otherwise), and
``dermt2im.runners.partition`` gives a batch job its static share of the units. A unit whose output
is up to date is never made again, and a unit re-run after a crash is idempotent.

Stages whose output carries no key of its own record it in a *stamp* (``Stamps``): a small JSON
file per unit under ``W/.stamps/<stage>/``, written after the unit's output. Stamps are data, never
code: a planted stamp can at worst make a stage skip work, never run anything.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from dermt2im.core.fileio import atomic_write_text

Summary = dict[str, Any]
U = TypeVar("U")


@runtime_checkable
class Stage(Protocol[U]):
    """See the module docstring."""

    name: str

    def units(self) -> Sequence[U]: ...

    def describe(self, unit: U) -> str: ...

    def key(self, unit: U) -> str: ...

    def finished(self, unit: U, key: str) -> Summary | None: ...

    def run(self, unit: U, key: str) -> Summary: ...

    def close(self, results: Sequence[Summary]) -> Summary: ...


@dataclass(frozen=True)
class Stamps:
    """The key each unit's output was last made for, with its summary: ``<root>/<stage>/<unit>.json``."""

    root: Path
    stage: str

    def _path(self, unit_id: str) -> Path:
        return Path(self.root) / self.stage / (re.sub(r"[^A-Za-z0-9._=-]", "_", unit_id) + ".json")

    def read(self, unit_id: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._path(unit_id).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("summary"), dict) else None

    def matching(self, unit_id: str, key: str) -> Summary | None:
        """The stored summary when the unit's output was made for ``key``, else None."""
        record = self.read(unit_id)
        return record["summary"] if record is not None and record.get("key") == key else None

    def write(self, unit_id: str, key: str, summary: Summary) -> None:
        record = {"key": key, "summary": summary, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(self._path(unit_id), json.dumps(record, indent=1, sort_keys=True, default=str))

    def clear(self, unit_id: str) -> None:
        self._path(unit_id).unlink(missing_ok=True)
