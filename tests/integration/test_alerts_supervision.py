"""Alerts that always fire, supervision, and the core's logs in the UI (issue 15), on one real
stack (`dermflow up` on free ports) with a local webhook receiver:

- `dermflow status` shows the supervisor and that the alerts are wired;
- a worker killed with SIGKILL is back within a minute through the supervisor, and `status`
  shows the restart;
- a `dermflow.run.partial-failure` event, as a partly failed `derm` run emits it, is posted to
  the webhook by the automation `dermflow up` made;
- a `derm/retrain` run that no worker picks up goes Late (the server's late-runs service, made
  fast here) and is posted to the webhook;
- a `derm/fetch` run's logs, read through the Prefect API, hold the core's `dermflow.*` lines,
  each once; and a headless-Chromium screenshot of that run's logs page in the UI.

The tests run in their written order (`pytest.mark.in_order`): the Late test pauses the
orchestration queue and resumes it, the screenshot needs the fetch run's id. Each test finds its
own runs and alerts by their own ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.stack import PROJECT_ROOT, start_stack
from tests.integration.test_report_browser import ARTIFACTS
from tests.support.chromium import browser, chromium, save_screenshot  # noqa: F401 - fixtures, used by name
from tests.support.image_servers import rewrite_csv_host, serve_atlas, synthetic_atlas

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.in_order]

ATLAS = __import__("tests.conftest", fromlist=["ATLAS_DIR"]).ATLAS_DIR
SHOTS: dict[str, str] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, alerts):
    stack = start_stack(tmp_path_factory.mktemp("alerts"), gpu_slots=1, extra_env={
        "DERMFLOW_ALERT_WEBHOOK": alerts.url,
        # The server marks a run Late 5 s after its scheduled time, looking every 2 s (defaults
        # 15 s and 5 s).
        "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "5",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "2",
    })
    yield stack
    stack.dermflow("down", check=False, timeout=180)


def _wait_for_alert(alerts, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for body in list(alerts.received):
            if predicate(body):
                return body
        time.sleep(1)
    raise AssertionError(f"no matching alert within {timeout:.0f} s; received: {alerts.received}")


def _status(stack) -> tuple[int, dict]:
    result = stack.dermflow("status", "--json", check=False)
    return result.returncode, json.loads(result.stdout)


def _service(status: dict, name: str) -> dict:
    [row] = [row for row in status["services"] if row["service"] == name]
    return row


def test_status_shows_the_supervisor_and_wired_alerts(stack):
    code, status = _status(stack)
    assert code == 0, status
    assert _service(status, "supervisor")["healthy"]
    assert status["alerts"]["wired"] is True
    assert set(status["alerts"]["automations"]) == {"derm-retrain-failed", "derm-retrain-missing",
                                                    "derm-partial-failure"}
    text = stack.dermflow("status").stdout
    assert "alerts                 wired" in text


def test_a_killed_worker_comes_back_through_the_supervisor(stack):
    from dermflow.ops.stack import ManagedProcess

    process = ManagedProcess("worker-orchestrator", stack.data_dir / "run")
    pid = process.pid()
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # as the OOM killer would
    killed = time.monotonic()
    while time.monotonic() - killed < 60:
        new = process.pid()
        if new is not None and new != pid:
            break
        time.sleep(0.5)
    back = time.monotonic() - killed
    assert new is not None and new != pid, f"worker not back after {back:.0f} s"
    code, status = _status(stack)
    row = _service(status, "worker orchestrator")
    assert code == 0 and row["healthy"] and row["restarts"] >= 1, row
    assert row["last_error"].startswith("exited")
    assert "restarts=" in stack.dermflow("status").stdout
    print(f"worker back {back:.1f} s after SIGKILL")


PARTLY_FAILED = """
import sys
from prefect import flow
from tasks.runs import report_partial_failure

@flow(name="partly-failed")
def partly_failed(run_id: str):
    return report_partial_failure(run_id, [{"architecture": "vgg16", "error": "Crashed: killed (OOM)"}], 2)

partly_failed(sys.argv[1])
"""


def test_a_partial_failure_raises_the_alert(stack, alerts):
    run_id = "20261202-120000-partial-" + uuid.uuid4().hex[:6]
    stack.run(sys.executable, "-c", PARTLY_FAILED, run_id, timeout=300)
    alert = _wait_for_alert(alerts, lambda body: run_id in body.get("subject", ""))
    assert alert["subject"] == f"dermflow: partial failure in run {run_id}"
    assert "1 of 2 architecture(s) failed (vgg16: Crashed: killed (OOM))" in alert["body"]


async def _late_retrain(stack) -> str:
    """A derm/retrain run due a minute ago while the orchestration queue is paused."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.objects import StateType
    from prefect.states import Scheduled

    async with stack.prefect_client() as client:
        queue = await client.read_work_queue_by_name("default", work_pool_name="dermflow")
        await client.update_work_queue(queue.id, is_paused=True)
        deployment = await client.read_deployment_by_name("derm/retrain")
        run = await client.create_flow_run_from_deployment(
            deployment.id, state=Scheduled(scheduled_time=datetime.now(timezone.utc) - timedelta(seconds=60)))
        assert run.state.type == StateType.SCHEDULED
        return str(run.id)


async def _clean_up_late_run(stack, flow_run_id: str) -> str:
    async with stack.prefect_client() as client:
        state = (await client.read_flow_run(flow_run_id)).state.name
        await client.delete_flow_run(flow_run_id)
        queue = await client.read_work_queue_by_name("default", work_pool_name="dermflow")
        await client.update_work_queue(queue.id, is_paused=False)
    return state


def test_a_late_retrain_raises_the_alert(stack, alerts):
    flow_run_id = asyncio.run(_late_retrain(stack))
    try:
        started = time.monotonic()
        alert = _wait_for_alert(alerts, lambda body: body.get("subject") == "dermflow: derm/retrain Late")
        print(f"Late alert {time.monotonic() - started:.1f} s after the run was created")
    finally:
        state = asyncio.run(_clean_up_late_run(stack, flow_run_id))
    assert state == "Late"
    assert "is Late" in alert["body"]


@pytest.fixture(scope="module")
def fetch_run(stack, tmp_path_factory):
    """A derm/fetch run of a few atlas images (real ones when ../shared is there)."""
    if (ATLAS / "rows.csv").exists():
        images, rows = ATLAS / "images", ATLAS / "rows.csv"
    else:
        root = synthetic_atlas(tmp_path_factory.mktemp("synthetic"), n_labels=4, per_label=6, size=64)
        images, rows = root / "images", root / "rows.csv"
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, tmp_path_factory.mktemp("csv") / "rows.csv",
                                    limit_per_label=2)
        result = stack.prefect("deployment", "run", "derm/fetch", "-p", f"csv={csv_path}",
                               "-p", "limit_per_label=2", "--watch", timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    import re

    return re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)


async def _logs(stack, flow_run_id: str) -> dict[str, list]:
    """{flow run id: its logs} of the run and its subflow runs (the fetch is a `derm-fetch`
    subflow), read through the Prefect API."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async with stack.prefect_client() as client:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        by_run = {}
        for run_id in [flow_run_id, *(str(child.id) for child in children)]:
            logs, offset = [], 0
            while True:
                page = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                              limit=200, offset=offset)
                logs += page
                if len(page) < 200:
                    break
                offset += 200
            by_run[run_id] = logs
        return by_run


def test_the_cores_log_lines_reach_the_flow_runs_logs_once(stack, fetch_run):
    by_run = asyncio.run(_logs(stack, fetch_run))
    logs = [log for run_logs in by_run.values() for log in run_logs]
    # once per task run: shards of equal size may log the same text, each from its own task run
    core = [(log.flow_run_id, log.task_run_id, log.name, log.message) for log in logs
            if log.name.startswith("dermflow.")]
    shards = [(run, message) for run, _task_run, name, message in core
              if name == "dermflow.ingestion.fetch" and message.startswith("shard of ")]
    assert shards, f"no dermflow.ingestion.fetch line among {Counter(log.name for log in logs)}"
    assert all(count == 1 for count in Counter(core).values()), Counter(core).most_common(3)
    assert all(log.level >= 20 for log in logs if log.name.startswith("dermflow."))
    print(f"{len(core)} dermflow.* line(s), e.g. {shards[0][1]!r}")
    SHOTS["flow_run_id"] = str(shards[0][0])  # the derm-fetch subflow run that logged it


def test_a_screenshot_of_the_runs_logs_in_the_ui(stack, fetch_run, browser):  # noqa: F811
    import base64

    ui = stack.env["PREFECT_API_URL"].removesuffix("/api")
    password = base64.b64encode(stack.env["PREFECT_API_AUTH_STRING"].encode()).decode()
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{ui}/")
    browser.wait_for("Page.loadEventFired", timeout=180)  # the UI's first load is slow on a busy box
    # What the UI's login page stores (base64 of the auth string).
    browser.evaluate(f"localStorage.setItem('prefect-password', '{password}')")
    flow_run_id = SHOTS.get("flow_run_id") or fetch_run  # the subflow run that fetched
    browser.send("Page.navigate", url=f"{ui}/runs/flow-run/{flow_run_id}")
    deadline = time.monotonic() + 180
    while "shard of " not in (browser.evaluate("document.body ? document.body.innerText : ''") or ""):
        assert time.monotonic() < deadline, "the run's logs page shows no dermflow.ingestion.fetch line"
        time.sleep(1)
    browser.evaluate("""(() => {  // the core's line in view
        const hit = [...document.querySelectorAll('*')].find(e => e.children.length === 0
            && e.textContent.includes('shard of '));
        if (hit) hit.scrollIntoView({block: 'center'}); })()""")
    time.sleep(1)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "derm-run-logs.png"
    save_screenshot(browser, shot, full_page=False)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_down_stops_the_supervisor_first(stack):
    """After `down` nothing comes back: the supervisor is stopped before the services."""
    result = stack.dermflow("down", timeout=180)
    assert result.stdout.splitlines()[0] == "stopped supervisor"
    time.sleep(6)  # three of the supervisor's looks, had it survived
    code, status = _status(stack)
    assert code == 1 and not any(row["healthy"] for row in status["services"])
    stack.dermflow("up", "--no-deploy", timeout=600)  # for the fixture's own `down`
    assert Path(stack.data_dir / "run" / "supervisor.pid").exists()
