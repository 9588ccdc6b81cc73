"""`dermflow schedule`: the weekly `derm/retrain` — whether it is on, when, and which saved run
configuration it retrains with — and keeping what the user set across `dermflow up`.

A retrain takes its parameters from a saved configuration (`dermflow.registry.configs`): by
default the champion's run's; after `schedule set`, a named one (`config/<name>.json`), whose
parameters are also written into the deployment's parameters, so the UI's deployment page shows
them. The schedule starts paused (`active: false` in `deployments/prefect.yaml`) and only
`schedule resume` (or the UI's toggle) turns it on. `prefect deploy` recreates a deployment's
schedules and parameters from the YAML, so `dermflow up` snapshots them before and restores
them after (`snapshot_retrain` / `restore_retrain`).

The functions take a synchronous Prefect client, so unit tests pass a fake one.
"""

from __future__ import annotations

import json
from typing import Any

from dermflow.config import RUN_DEFAULTS
from dermflow.errors import DermflowError
from dermflow.registry.configs import (
    RUN_OWN_PARAMETERS,
    list_named_configs,
    read_named_config,
    resolve_parameters,
    run_parameters,
    save_named_config,
    saved_config_for,
)
from dermflow.storage import ObjectStore

RETRAIN = "derm/retrain"
DEFAULT_CONFIG_NAME = "retrain"


class ScheduleError(DermflowError):
    """A schedule command cannot do what was asked (permanent; the message says why)."""


def prefect_client(settings, timeout: float = 15.0):
    """A synchronous client of the stack's Prefect API (`PREFECT_API_URL` and its auth from the
    settings), never an ephemeral in-process server."""
    from prefect.client.orchestration import SyncPrefectClient

    auth = settings.prefect_api_auth_string
    return SyncPrefectClient(settings.prefect_api_url, auth_string=auth.get_secret_value() if auth else None,
                             httpx_settings={"timeout": timeout})


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as `prefect deployment run -p` reads them: JSON when the value parses
    (`3`, `true`, `null`, `["vgg16"]`), else the string."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ScheduleError(f"-p {pair!r}: expected KEY=VALUE, e.g. -p image_size=128")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides


def _deployment(client):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(RETRAIN)
    except ObjectNotFound as error:
        raise ScheduleError(f"no deployment {RETRAIN}: run `dermflow up` (make up) to register it") from error


def next_parameters(store: ObjectStore, deployment_parameters: dict) -> tuple[dict, str]:
    """The flat parameters the next scheduled retrain will use, and where they come from; the
    same rule as the flow's (`resolve_parameters` with the deployment's parameters as given)."""
    given = {**RUN_DEFAULTS, **deployment_parameters, "mode": "retrain"}
    saved = saved_config_for(store, "retrain", given.get("config"))
    parameters = resolve_parameters(given, saved["parameters"] if saved else None, passed=list(deployment_parameters))
    source = saved["source"] if saved else "the defaults (no champion yet)"
    return parameters, source


def schedule_state(client, store: ObjectStore) -> dict:
    """Whether the retrain will run (deployment not paused and a schedule active), its
    schedules, and the parameters of its next run."""
    deployment = _deployment(client)
    schedules = [{"id": str(s.id), "active": bool(s.active), **_describe_schedule(s.schedule)}
                 for s in client.read_deployment_schedules(deployment.id)]
    parameters, source = next_parameters(store, dict(deployment.parameters or {}))
    active = not deployment.paused and any(s["active"] for s in schedules)
    return {"deployment": RETRAIN, "active": active, "deployment_paused": bool(deployment.paused),
            "schedules": schedules, "config": (deployment.parameters or {}).get("config"),
            "source": source, "parameters": parameters}


def _describe_schedule(schedule) -> dict:
    for field in ("cron", "interval", "rrule"):
        value = getattr(schedule, field, None)
        if value is not None:
            return {field: str(value), "timezone": getattr(schedule, "timezone", None)}
    return {"schedule": str(schedule)}


def set_active(client, active: bool) -> dict:
    """Turn every schedule of the retrain on or off; resuming also un-pauses the deployment
    (a paused deployment schedules nothing)."""
    deployment = _deployment(client)
    schedules = client.read_deployment_schedules(deployment.id)
    if not schedules:
        raise ScheduleError(f"{RETRAIN} has no schedule; deployments/prefect.yaml declares it, run `dermflow up`")
    for schedule in schedules:
        if bool(schedule.active) != active:
            client.update_deployment_schedule(deployment.id, schedule.id, active=active)
    if active and deployment.paused:
        client.resume_deployment(deployment.id)
    from dermflow.ops.alerts import follow_schedule

    follow_schedule(client, active)  # the missing-retrain alert watches only a schedule that is on
    return {"deployment": RETRAIN, "active": active, "schedules": len(schedules)}


def set_config(client, store: ObjectStore, name: str | None = None, *, from_run: str | None = None,
               champion: bool = False, overrides: dict[str, Any] | None = None) -> dict:
    """Choose what the retrain trains with.

    `champion` (without overrides): the champion's run's configuration, as it is when each
    retrain starts. Otherwise a named configuration `name` (default `retrain`) is stored: the
    parameters of run `from_run` (a run id or flow run name), else those of the configuration
    `name` when it exists, else those the next retrain would use now; `overrides` on top. The
    deployment's parameters become exactly these."""
    from prefect.client.schemas.actions import DeploymentUpdate

    overrides = dict(overrides or {})
    own = sorted(set(overrides) & set(RUN_OWN_PARAMETERS))
    if own:
        raise ScheduleError(f"-p {', '.join(own)}: the retrain's own parameters cannot be set here")
    if champion and (from_run or name):
        raise ScheduleError("--champion takes no NAME or --from-run (the champion's run is the source)")
    deployment = _deployment(client)
    if champion and not overrides:
        client.update_deployment(deployment.id, DeploymentUpdate(parameters={"mode": "retrain", "config": None}))
        return schedule_state(client, store)
    if from_run:
        from dermflow.registry.runs import resolve_run_id

        run_id = resolve_run_id(store, from_run)
        base, source = run_parameters(store, run_id), f"run {run_id}"
    elif name and name in list_named_configs(store):  # choose a stored one (and change it with -p)
        stored = read_named_config(store, name)
        base, source = stored["parameters"], stored.get("source") or f"config {name}"
    else:
        current = {} if champion else dict(deployment.parameters or {})
        base, source = next_parameters(store, current)
    base = {k: v for k, v in base.items() if k not in RUN_OWN_PARAMETERS}
    name = name or DEFAULT_CONFIG_NAME
    record = save_named_config(store, name, {**base, **overrides},
                               source=source + (f" with {sorted(overrides)}" if overrides else ""))
    client.update_deployment(deployment.id, DeploymentUpdate(
        parameters={"mode": "retrain", "config": name, **record["parameters"]}))
    return schedule_state(client, store)


# --- across `dermflow up` ----------------------------------------------------------------------
def snapshot_retrain(client) -> dict | None:
    """What `prefect deploy` would reset: the retrain's parameters and its schedules' `active`
    (None when it is not registered yet: the YAML's values then hold, paused)."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(RETRAIN)
    except ObjectNotFound:
        return None
    return {"parameters": dict(deployment.parameters or {}),
            "active": [bool(s.active) for s in client.read_deployment_schedules(deployment.id)]}


def restore_retrain(client, snapshot: dict | None) -> None:
    """Put back what `snapshot_retrain` saw: a schedule the user resumed stays on, one paused
    stays off, and the parameters `schedule set` chose stay."""
    from prefect.client.schemas.actions import DeploymentUpdate

    if snapshot is None:
        return
    deployment = client.read_deployment_by_name(RETRAIN)
    schedules = client.read_deployment_schedules(deployment.id)
    for schedule, was_active in zip(schedules, snapshot["active"]):
        if bool(schedule.active) != was_active:
            client.update_deployment_schedule(deployment.id, schedule.id, active=was_active)
    if dict(deployment.parameters or {}) != snapshot["parameters"]:
        client.update_deployment(deployment.id, DeploymentUpdate(parameters=snapshot["parameters"]))


# --- the command -------------------------------------------------------------------------------
def render_state(state: dict) -> str:
    lines = [f"{state['deployment']}: {'ACTIVE' if state['active'] else 'PAUSED'}"
             + ("  (deployment paused)" if state["deployment_paused"] else "")]
    for schedule in state["schedules"]:
        when = schedule.get("cron") or schedule.get("interval") or schedule.get("rrule") or schedule.get("schedule")
        lines.append(f"  schedule {when} {schedule.get('timezone') or ''} {'on' if schedule['active'] else 'off'}")
    lines.append(f"next run's parameters (from {state['source']}):")
    lines += [f"  {name:26} {json.dumps(value)}" for name, value in state["parameters"].items()]
    if not state["active"]:
        lines.append("turn it on with: dermflow schedule resume")
    return "\n".join(lines)


def cmd_schedule(args) -> int:
    import httpx

    from dermflow.settings import get_settings

    settings = get_settings()
    try:
        return _run_action(args, ObjectStore.from_settings(settings), settings)
    except httpx.TransportError as error:
        raise ScheduleError(f"the Prefect API at {settings.prefect_api_url} does not answer ({error}); "
                            "start the stack with `dermflow up`") from error


def _run_action(args, store: ObjectStore, settings) -> int:
    with prefect_client(settings) as client:
        if args.action == "show":
            state = schedule_state(client, store)
        elif args.action in ("pause", "resume"):
            set_active(client, args.action == "resume")
            state = schedule_state(client, store)
        else:
            state = set_config(client, store, args.name, from_run=args.from_run, champion=args.champion,
                               overrides=parse_overrides(args.param or []))
    print(json.dumps(state, indent=2, default=str) if args.json else render_state(state))
    return 0


def add_parser(sub) -> None:
    """`dermflow schedule show|set|pause|resume`."""
    schedule = sub.add_parser("schedule", help="the weekly derm/retrain: show, set its configuration, pause, resume")
    actions = schedule.add_subparsers(dest="action", required=True)
    for action, text in (("show", "on or off, when, and the parameters of the next retrain"),
                         ("pause", "turn the weekly retrain off"), ("resume", "turn the weekly retrain on")):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("--json", action="store_true")
    chooser = actions.add_parser("set", help="choose the retrain's configuration (stored as config/<NAME>.json)")
    chooser.add_argument("name", nargs="?", help=f"the configuration's name (default: {DEFAULT_CONFIG_NAME})")
    chooser.add_argument("--from-run", metavar="RUN", help="start from this run's parameters (run id or flow run name)")
    chooser.add_argument("--champion", action="store_true",
                         help="without -p: use the champion's run's configuration at each retrain (the default)")
    chooser.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="a parameter to change")
    chooser.add_argument("--json", action="store_true")
    schedule.set_defaults(func=cmd_schedule)
