"""Prefect's share of the factory's wall time, and the cached re-run ratio.

Runs the same factory three ways on fresh workdirs:
  plain       the domain functions called directly, in order (no orchestration)
  prefect     the factory flow (first run: every task computes)
  cached      the factory flow again with nothing changed (every compute task served from cache)
and prints the wall times, the orchestration overhead (flow wall time minus the time spent inside
task bodies, from Prefect's own task-run records) and the ratios.

    python bench/overhead.py                     # the tiny preset (the machinery on random weights)
    python bench/overhead.py --config smoke      # the smoke demo (the miniature model)
    python bench/overhead.py --set train.max_steps=10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _isolate(tmp: Path) -> None:
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp / "prefect" / "storage")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_plain(workdir: Path, config: str, overrides: list[str]) -> None:
    """The factory's stages (``dermt2im.pipelines.factory``), run one unit after the other without
    Prefect, in the flow's order."""
    from dermt2im import pipelines
    from dermt2im.core.workdir import open_workdir
    from dermt2im.runners.sequential import run_pipeline

    w, cfg = open_workdir(workdir, config, overrides)
    run_pipeline(pipelines.factory(w, cfg))


def task_seconds(flow_state) -> float:
    """Seconds spent inside task bodies of the flow run and its subflows (subflow wrappers excluded)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    root = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        ids, frontier, wrappers = {root}, [root], set()
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            wrappers |= {c.parent_task_run_id for c in children if c.parent_task_run_id}
            frontier = [c.id for c in children if c.id not in ids]
            ids.update(frontier)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids))))
    return sum(r.total_run_time.total_seconds() for r in runs if r.id not in wrappers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dermt2im-overhead-"))
    _isolate(tmp)

    t = time.perf_counter()
    run_plain(tmp / "plain", args.config, args.overrides)
    plain = time.perf_counter() - t

    from prefect import flow

    from dermt2im.flows.factory import factory

    @flow
    def start_server() -> None:
        """The temporary local server starts on first use; timed apart from the factory."""

    t = time.perf_counter()
    start_server()
    server = time.perf_counter() - t

    t = time.perf_counter()
    first = factory(str(tmp / "orchestrated"), config=args.config, overrides=args.overrides, return_state=True)
    prefect_wall = time.perf_counter() - t
    inside_tasks = task_seconds(first)

    t = time.perf_counter()
    factory(str(tmp / "orchestrated"), return_state=True)
    cached = time.perf_counter() - t

    overhead = prefect_wall - inside_tasks
    print(f"factory, preset {args.config!r} {args.overrides or ''}")
    print(f"  temporary Prefect server start        {server:8.1f} s (once per process, not counted below)")
    print(f"  plain function calls                  {plain:8.1f} s")
    print(f"  Prefect flow, first run               {prefect_wall:8.1f} s")
    print(f"    inside task bodies                  {inside_tasks:8.1f} s")
    print(f"    orchestration (flow - tasks)        {overhead:8.1f} s  = {overhead / prefect_wall:6.1%} of the flow's wall time")
    print(f"  Prefect flow, cached re-run           {cached:8.1f} s")
    print(f"ratio flow / plain                      {prefect_wall / plain:8.2f}x")
    print(f"ratio cached re-run / first run         {cached / prefect_wall:8.2f}x")


if __name__ == "__main__":
    main()
