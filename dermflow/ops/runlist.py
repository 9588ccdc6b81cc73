"""`dermflow runs`: the recent runs, one line each — id, flow run name, Prefect state, mode,
best architecture, its test weighted F1, champion — from the bucket, with each run's state
from the Prefect API when it answers (the column says `?` when it does not)."""

from __future__ import annotations

import json

from dermflow.ops.schedule import prefect_client


def flow_run_states(settings, names: list[str]) -> dict[str, str] | None:
    """{flow run name: state name} of the `derm` flow runs with these names; None when the
    Prefect API does not answer."""
    import httpx
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName

    if not names:
        return {}
    try:
        with prefect_client(settings, timeout=5) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["derm"])),
                                         flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
    except (httpx.HTTPError, OSError, RuntimeError):
        return None
    return {run.name: run.state.name for run in runs if run.state is not None}


def with_states(summaries: list[dict], states: dict[str, str] | None) -> list[dict]:
    """Each summary with its `state` (None when Prefect does not answer or has no such run)."""
    return [{**summary, "state": (states or {}).get(summary["flow_run_name"])} for summary in summaries]


def render(rows: list[dict], prefect_reachable: bool) -> str:
    header = f"{'run id':40} {'flow run':22} {'state':11} {'mode':8} {'best':18} {'w-F1':>6}  champion"
    lines = [header]
    for row in rows:
        state = row["state"] or ("running?" if row["in_progress"] else "?" if not prefect_reachable else "-")
        f1 = f"{row['weighted_f1']:.4f}" if row["weighted_f1"] is not None else "-"
        lines.append(f"{row['run_id']:40} {row['flow_run_name']:22} {state:11} {row['mode'] or '-':8} "
                     f"{row['best_architecture'] or '-':18} {f1:>6}  {','.join(row['champion']) or ''}")
    if not prefect_reachable:
        lines.append("(Prefect API not reachable: state column unknown)")
    return "\n".join(lines)


def cmd_runs(args) -> int:
    from dermflow.registry.summary import run_summaries
    from dermflow.settings import get_settings
    from dermflow.storage import ObjectStore

    settings = get_settings()
    summaries = run_summaries(ObjectStore.from_settings(settings), limit=args.limit or None)
    states = flow_run_states(settings, [s["flow_run_name"] for s in summaries])
    rows = with_states(summaries, states)
    if args.json:
        print(json.dumps({"prefect_reachable": states is not None, "runs": rows}, indent=2))
    else:
        print(render(rows, states is not None))
    return 0


def add_parser(sub) -> None:
    runs = sub.add_parser("runs", help="recent runs: state, mode, best architecture, weighted F1, champion")
    runs.add_argument("--limit", type=int, default=20, help="newest N runs (0: all)")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)
