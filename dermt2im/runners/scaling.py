"""Where a stage's units run: in this process, or on a Ray cluster (``scale.ray_address``).

``scaled(stage, scale)`` is what the CLI and the flows call around a stage that may scale out
(generate, validate). Without ``scale.ray_address`` it hands the stage back untouched and nothing
imports Ray; with it, ``dermt2im.runners.ray_runner.on_ray`` decides the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from dermt2im.core.runtime import ScaleConfig
from dermt2im.stage import Stage


@dataclass(frozen=True)
class Placed:
    """The stage to run and how many of its units may run at once."""

    stage: Stage
    concurrency: int = 1
    on_ray: bool = False  # its units' ``run`` executes on the Ray cluster


@contextlib.contextmanager
def scaled(stage: Stage, scale: ScaleConfig | None) -> Iterator[Placed]:
    if scale is None or scale.ray_address is None:
        yield Placed(stage)
        return
    from dermt2im.runners.ray_runner import on_ray

    with on_ray(stage, scale) as placed:
        yield placed
