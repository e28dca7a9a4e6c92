"""Reading back what Prefect recorded, for cache and flow tests."""

from __future__ import annotations

from collections import defaultdict


def task_states(flow_state, timeout: float = 30.0) -> dict[str, list[str]]:
    """Stage (its ``stage:`` tag, e.g. ``validate`` or ``validate-close``) or task name -> state names (e.g.
    Completed, Cached) for every task run of a flow run and its subflows.

    Prefect 3 records task-run states asynchronously (through events), so this polls until every
    task run has a final state."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        states = _task_states_once(flow_state)
        pending = [s for names in states.values() for s in names if s in ("?", "Pending", "Running", "Scheduled")]
        if not pending or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def task_runs(flow_state) -> list:
    """Every task run of a flow run and its subflows (Prefect's TaskRun objects), leaving out the
    task runs that stand for a subflow in its parent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    root = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_ids, frontier = {root}, [root]
        while frontier:  # subflows are flow runs whose parent task run belongs to a known flow run
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [c.id for c in children if c.id not in flow_ids]
            flow_ids.update(frontier)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_ids))))
    return [r for r in runs if r.state is None or r.state.state_details.child_flow_run_id is None]


def _task_states_once(flow_state) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in task_runs(flow_state):
        stages = [tag.split(":", 1)[1] for tag in r.tags if tag.startswith("stage:")]
        out[stages[0] if stages else r.name.rsplit("-", 1)[0]].append(r.state.name if r.state else "?")
    return dict(out)


def subflow_graph(flow_state) -> dict[str, list[str]]:
    """What the Prefect UI's run graph draws for a flow run: node label ("flow / flow-run name") ->
    labels of the nodes it has an edge from (the server's /flow_runs/{id}/graph-v2)."""
    from prefect.client.orchestration import get_client

    root = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        graph = client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": root}).json()
    labels = {node_id: node["label"] for node_id, node in graph["nodes"]}
    return {node["label"]: sorted({labels[p["id"]] for p in node["parents"] if p["id"] in labels})
            for _, node in graph["nodes"]}


def task_run_names(flow_state) -> set[str]:
    """Names of every task run of a flow run and its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    root = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        ids, frontier = {root}, [root]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children if c.id not in ids]
            ids.update(frontier)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids))))
    return {r.name for r in runs}
