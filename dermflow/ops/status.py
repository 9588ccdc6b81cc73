"""`dermflow status`: each service of the stack (up or down, its pid, the supervisor's restarts
and its last error; for each worker the Keras backend and the devices it sees) and whether the
alerts are wired."""

from __future__ import annotations

import json
import os
import time

from dermflow.settings import Settings


def _service_rows(settings: Settings) -> list[dict]:
    from dermflow.ops import lifecycle
    from dermflow.ops.supervisor import supervisor_process

    rows = []
    if lifecycle._embedded_s3(settings):
        seaweed = lifecycle._seaweed(settings)
        rows.append({"service": "SeaweedFS", "key": "seaweedfs", "address": settings.aws_endpoint_url,
                     "pid": seaweed.process.pid(), "healthy": seaweed.healthy()})
    server = lifecycle._prefect_server(settings)
    if server is not None:
        rows.append({"service": "Prefect server", "key": "prefect-server", "address": settings.prefect_api_url,
                     "pid": server.process.pid(), "healthy": server.healthy()})
    for worker in lifecycle._workers(settings):
        pid = worker.process.pid()
        rows.append({"service": f"worker {worker.name}", "key": f"worker-{worker.name}",
                     "address": ",".join(worker.queues), "pid": pid, "healthy": pid is not None,
                     **worker_devices(settings, worker)})
    pid = supervisor_process(settings.data_dir / "run").pid()
    rows.append({"service": "supervisor", "key": "supervisor", "address": "restarts crashed services",
                 "pid": pid, "healthy": pid is not None})
    return rows


def worker_devices(settings: Settings, worker) -> dict:
    """The backend and devices of a worker's flow runs: for a trainer, what its last training
    saw (its heartbeat), else what `dermflow up` gives it; the orchestrator sees no GPU."""
    from dermflow.modeling.devices import heartbeat_path, read_heartbeat

    env = worker.env
    slot = env.get("DERMFLOW_TRAINER_SLOT")
    seen = read_heartbeat(heartbeat_path(settings.data_dir, slot)) if slot is not None else None
    if seen:
        return {"backend": seen.get("backend"), "devices": seen.get("devices") or [],
                "seen": "seen by its last training" + (": CPU fallback" if seen.get("expect_gpu") and
                                                       not seen.get("accelerator") else "")}
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = [f"gpu {index}" for index in visible.split(",")] if visible else ["cpu"]
    backend = env.get("KERAS_BACKEND") or os.environ.get("KERAS_BACKEND") or "tensorflow"
    return {"backend": backend, "devices": gpus, "seen": "as started; no training yet"}


def _alerts(settings: Settings, server_up: bool) -> dict:
    from dermflow.ops.alerts import alerts_status

    if not server_up:
        return {"wired": None, "why": "the Prefect API is not answering"}
    try:
        alerts = alerts_status()
    except Exception as error:  # noqa: BLE001 - status reports, it does not fail on this
        return {"wired": None, "why": f"could not read the automations: {' '.join(str(error).split())[:200]}"}
    if not alerts["wired"]:
        alerts["why"] = ("DERMFLOW_ALERT_WEBHOOK is not set" if not settings.alert_webhook else
                         "the automations are missing or disabled") + "; set it in .env and rerun `dermflow up`"
    return alerts


def stack_status(settings: Settings) -> dict:
    """{"services": [{service, key, address, pid, healthy, restarts, last_error, last_restart}],
    "alerts": {"wired": bool | None, ...}}."""
    from dermflow.ops.supervisor import read_state

    records = read_state(settings.data_dir / "run")
    rows = _service_rows(settings)
    for row in rows:
        record = records.get(row.pop("key"), {})
        row.update(restarts=record.get("restarts", 0), last_error=record.get("last_error"),
                   last_restart=record.get("last_restart"))
    server_up = all(row["healthy"] for row in rows if row["service"] == "Prefect server")
    return {"services": rows, "alerts": _alerts(settings, server_up)}


def print_status(status: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    for row in status["services"]:
        restarted = ""
        if row["restarts"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["last_restart"] or 0))
            restarted = f"  restarts={row['restarts']} (last {when})"
        print(f"{row['service']:22} {'up' if row['healthy'] else 'DOWN':5} pid={row['pid'] or '-':<8} "
              f"{row['address']}{_devices_shown(row)}{restarted}")
        if row["last_error"]:
            print(f"{'':22} last error: {row['last_error']}")
    alerts = status["alerts"]
    if alerts["wired"]:
        print(f"alerts                 wired ({', '.join(alerts['automations'])} -> DERMFLOW_ALERT_WEBHOOK)")
    elif alerts["wired"] is None:
        print(f"alerts                 unknown: {alerts['why']}")
    else:
        print(f"alerts                 NOT wired: {alerts['why']}")


def _devices_shown(row: dict) -> str:
    if "backend" not in row:
        return ""
    return f"  {row['backend']} on {', '.join(row['devices'])} ({row['seen']})"
