"""Where a benchmarked `derm` flow run's wall time went, read back from the Prefect API.

`bench_fetch.py` times the `derm` flow in mode fetch from its start to its end. Part of that
time is the images (the shards), part is the flow's own fixed work (config, ingest, plan,
manifest), and part is Prefect waiting: for the server to create the `derm-fetch` subflow run
(the temporary server on SQLite answers 503 when busy and the client retries after about 2 s),
and for a sync flow run's heartbeat thread at its exit (it sleeps in 1-second steps; it shows in
the stretch after the subflow). Issue 18's targets are judged against these stretches, so each
flow side prints them.

`stretches` is pure (run records in, seconds out); `read_stretches` queries the API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

SHARD_TASKS = ("fetch-shard", "import-shard")


@dataclass(frozen=True)
class Span:
    """A run's name and its start and end (from the API's start_time and end_time)."""

    name: str
    start: datetime
    end: datetime


def stretches(parent: Span, subflow: Span, parent_tasks: list[Span], subflow_tasks: list[Span]) -> dict[str, float]:
    """Seconds of each stretch of a `derm` run whose fetch ran as `subflow`:
    - `before_subflow`: the parent's start to the end of its last task before the subflow;
    - `subflow_wait`: from there to the subflow's start (Prefect creating the subflow run);
    - `subflow_work`: the subflow's start to its last task's end, with `shards` (first shard's
      start to last shard's end) and `shard_count` inside it;
    - `subflow_exit`: the subflow's last task's end to its final state (its closing logs and
      artifacts);
    - `after_subflow`: that final state to the parent's end: the subflow's heartbeat thread is
      joined after its final state is set, then the parent's closing tasks run.
    """
    before = [task for task in parent_tasks if task.end <= subflow.start]
    shards = [task for task in subflow_tasks if task.name.startswith(SHARD_TASKS)]
    if not subflow_tasks or not shards:
        raise ValueError(f"subflow {subflow.name!r} has no task runs of {SHARD_TASKS}")
    ready = max((task.end for task in before), default=parent.start)
    last_task_end = max(task.end for task in subflow_tasks)
    return {
        "before_subflow": _seconds(parent.start, ready),
        "subflow_wait": _seconds(ready, subflow.start),
        "subflow_work": _seconds(subflow.start, last_task_end),
        "shards": _seconds(min(task.start for task in shards), max(task.end for task in shards)),
        "shard_count": len(shards),
        "subflow_exit": _seconds(last_task_end, subflow.end),
        "after_subflow": _seconds(subflow.end, parent.end),
        "total": _seconds(parent.start, parent.end),
    }


def _seconds(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds(), 3)


def describe(stretch: dict[str, float], images: int) -> str:
    """One line for the benchmark's output."""
    rate = images / stretch["shards"] if stretch["shards"] > 0 else float("nan")
    return (f"  where the flow's {stretch['total']:.2f} s went: before the subflow {stretch['before_subflow']:.2f} s, "
            f"waiting for the subflow run {stretch['subflow_wait']:.2f} s, subflow work {stretch['subflow_work']:.2f} s "
            f"(of which {stretch['shard_count']} shards {stretch['shards']:.2f} s, {rate:.1f} images/s), "
            f"subflow exit {stretch['subflow_exit']:.2f} s, after the subflow {stretch['after_subflow']:.2f} s")


def read_stretches(started_after: datetime, subflow_name: str = "derm-fetch", wait_s: float = 10.0) -> dict[str, float]:
    """`stretches` of the newest top-level flow run that started after `started_after` (the
    run the benchmark just timed), from the current Prefect API. Task runs reach the API as
    events, so their end times are waited for (up to `wait_s`)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        parents = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started_after),
                                          parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not parents:
            raise LookupError(f"no flow run started after {started_after}")
        parent = parents[0]
        children = [run for run in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
            if _flow_name(client, run) == subflow_name]
        if len(children) != 1:
            raise LookupError(f"flow run {parent.name!r} has {len(children)} {subflow_name!r} subflow runs, not 1")
        deadline = time.monotonic() + wait_s
        while True:
            parent_tasks, subflow_tasks = _task_spans(client, parent.id), _task_spans(client, children[0].id)
            if (parent_tasks is not None and subflow_tasks is not None) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if parent_tasks is None or subflow_tasks is None:
            raise LookupError(f"task runs of {parent.name!r} still unfinished after {wait_s} s")
        return stretches(_span(parent), _span(children[0]), parent_tasks, subflow_tasks)


def _flow_name(client, run) -> str:
    return client.read_flow(run.flow_id).name


def _span(run) -> Span:
    if run.start_time is None or run.end_time is None:
        raise LookupError(f"run {run.name!r} has not both a start and an end time")
    return Span(run.name, run.start_time, run.end_time)


def _task_spans(client, flow_run_id) -> list[Span] | None:
    """The flow run's task runs as spans; None while any of them has no end time yet."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    if any(run.start_time is None or run.end_time is None for run in runs):
        return None
    return [Span(run.name, run.start_time, run.end_time) for run in runs]
