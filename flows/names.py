"""Flow run names that say what a run does and where: "train LoRA in demo" rather than Prefect's
random "witty-fox" (the workdir's folder name; its full path is among the run's parameters)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath


def in_workdir(what: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<what> in <workdir folder>``."""

    def name() -> str:
        from prefect.runtime import flow_run

        workdir = str(flow_run.parameters.get("workdir") or "")
        return f"{what} in {PurePath(workdir).name or workdir}" if workdir else what

    return name
