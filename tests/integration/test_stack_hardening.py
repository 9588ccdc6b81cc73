"""The Prefect side of the stack under attack and faults (issue 14, findings 2 and 16).

One real stack (`dermflow up` on free ports): its Prefect server refuses callers without the
auth string, gives no CORS grant to other origins and wants a CSRF token for changes, while the
CLI and workers work with the auth string; the alert webhook URL is kept secret; a `gpu` slot
whose holder was SIGKILLed comes back across a server restart; and a training SIGKILLed after a
checkpoint is recovered from it. Each test finds its own objects and leaves the stack up, so
their order does not matter (a slot a killed holder kept is back within the lease, 60 s here).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import PROJECT_ROOT, start_stack

pytestmark = pytest.mark.integration

LEASE_SECONDS = 60  # the shortest lease Prefect accepts
REPOSSESSOR_SECONDS = 15  # the server's repossessor loop (Prefect's default)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, alerts):
    stack = start_stack(tmp_path_factory.mktemp("hardened"), gpu_slots=1, extra_env={
        "DERMFLOW_ALERT_WEBHOOK": alerts.url + "?token=webhook-secret-123",
        "DERMFLOW_GPU_LEASE_SECONDS": str(LEASE_SECONDS),
    })
    yield stack
    stack.dermflow("down", check=False, timeout=120)


def _api(stack) -> str:
    return stack.env["PREFECT_API_URL"]


def _basic(auth_string: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def _ui_origin(stack) -> str:
    return _api(stack).removesuffix("/api")


# --- finding 2: the API's doors --------------------------------------------------------------

def test_the_api_refuses_callers_without_the_auth_string(stack):
    assert httpx.get(f"{_api(stack)}/deployments/name/derm/full").status_code == 401
    assert httpx.get(f"{_api(stack)}/deployments/name/derm/full", headers=_basic("dermflow:guess")).status_code == 401
    # derm/full cannot be started anonymously, even with a CSRF token (refused by whichever
    # guard comes first: 403 without a CSRF token, 401 without the auth string)
    deployment = f"{_api(stack)}/deployments/00000000-0000-0000-0000-000000000000/create_flow_run"
    assert httpx.post(deployment, json={}).status_code in (401, 403)
    token = httpx.get(f"{_api(stack)}/csrf-token", params={"client": "anonymous"})
    assert token.status_code == 401
    assert httpx.post(f"{_api(stack)}/flow_runs/filter", json={}, headers={
        "Prefect-Csrf-Token": "forged", "Prefect-Csrf-Client": "anonymous"}).status_code in (401, 403)
    assert httpx.get(f"{_api(stack)}/health").status_code == 200  # probes stay open


def test_other_origins_get_no_cors_grant(stack):
    auth = _basic(stack.env["PREFECT_API_AUTH_STRING"])
    url = f"{_api(stack)}/flow_runs/filter"
    preflight = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "content-type"})
    assert preflight.headers.get("access-control-allow-origin") in (None, ""), preflight.headers
    simple = httpx.get(f"{_api(stack)}/deployments/name/derm/full", headers={**auth, "Origin": "http://evil.example"})
    assert simple.headers.get("access-control-allow-origin") in (None, "")
    own = httpx.options(url, headers={"Origin": _ui_origin(stack), "Access-Control-Request-Method": "POST"})
    assert own.headers.get("access-control-allow-origin") == _ui_origin(stack)


def test_changes_need_a_csrf_token(stack):
    auth = _basic(stack.env["PREFECT_API_AUTH_STRING"])
    url = f"{_api(stack)}/flow_runs/filter"
    refused = httpx.post(url, json={"limit": 1}, headers=auth)
    assert refused.status_code == 403 and "CSRF" in refused.text
    token = httpx.get(f"{_api(stack)}/csrf-token", params={"client": "test-client"}, headers=auth)
    assert token.status_code == 200, token.text
    accepted = httpx.post(url, json={"limit": 1}, headers={
        **auth, "Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": "test-client"})
    assert accepted.status_code == 200, accepted.text


def test_cli_and_workers_work_with_the_auth_string(stack):
    listed = stack.prefect("deployment", "ls")
    assert "derm/full" in listed.stdout.replace("\n", "") or "full" in listed.stdout
    assert stack.dermflow("status").returncode == 0

    async def workers():
        async with stack.prefect_client() as client:
            return await client.read_workers_for_work_pool("dermflow")

    deadline = time.monotonic() + 60
    while True:
        online = {worker.name for worker in asyncio.run(workers()) if worker.status.value == "ONLINE"}
        if {"orchestrator", "trainer-0"} <= online or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert {"orchestrator", "trainer-0"} <= online, online


def test_the_alert_webhook_is_a_secret_and_never_printed(stack, alerts):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    secret_url = stack.env["DERMFLOW_ALERT_WEBHOOK"]
    out = stack.dermflow("up", timeout=600)
    assert "webhook-secret-123" not in out.stdout + out.stderr

    async def document(include_secrets: bool):
        async with stack.prefect_client() as client:
            return await client.read_block_document_by_name(
                "dermflow-alerts", block_type_slug="custom-webhook", include_secrets=include_secrets)

    shown = asyncio.run(document(False))
    assert "webhook-secret-123" not in repr(shown.data)
    # The block still posts to the real URL (what the automation does on a failed retrain).
    block = CustomWebhookNotificationBlock.model_validate(asyncio.run(document(True)).data)
    block.notify("body", "subject")
    assert alerts.received and alerts.received[-1]["subject"] == "subject"
    assert secret_url.startswith(alerts.url)


# --- finding 16a: a dead holder's `gpu` slot comes back, across a server restart -------------

HOLDER = """
import sys, time
from prefect.concurrency.sync import concurrency
from dermflow.settings import load_settings
with concurrency("gpu", occupy=1, lease_duration=load_settings().gpu_lease_seconds,
                 timeout_seconds=float(sys.argv[1])):
    print("acquired", flush=True)
    time.sleep(3600)
"""


def _holder(stack, timeout: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(timeout)], env=stack.env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_acquired(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    if line.strip() != "acquired":
        process.kill()
        raise AssertionError(f"holder did not acquire the slot: {line!r} {process.stderr.read()[-3000:]}")


def _active_slots(stack) -> int:
    async def read():
        async with stack.prefect_client() as client:
            return (await client.read_global_concurrency_limit_by_name("gpu")).active_slots

    return asyncio.run(read())


def test_a_killed_holders_gpu_slot_comes_back_across_a_server_restart(stack):
    from dermflow.ops.stack import PrefectServer

    first = _holder(stack, timeout=60)
    _wait_acquired(first)
    assert _active_slots(stack) == 1
    os.killpg(first.pid, signal.SIGKILL)  # as the OOM killer would
    first.wait()
    killed = time.monotonic()
    port = int(_api(stack).rsplit(":", 1)[1].split("/")[0])
    assert PrefectServer(stack.data_dir, port).stop()
    stack.dermflow("up", "--no-deploy", timeout=300)
    bound = LEASE_SECONDS + 2 * REPOSSESSOR_SECONDS + 30
    second = _holder(stack, timeout=bound)
    try:
        _wait_acquired(second)
        waited = time.monotonic() - killed
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
    assert waited < bound, waited
    print(f"slot back {waited:.0f} s after the kill (lease {LEASE_SECONDS} s, server restarted)")


# --- finding 16b: a training killed after a checkpoint is recovered from it -----------------

def _flow_run_pid(flow_run_id: str) -> int | None:
    """The pid of the process running that flow run (its environment names the run)."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    return None


def _training_runs(stack, name_prefix: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def read():
        async with stack.prefect_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=name_prefix)))

    return asyncio.run(read())


def _parent(stack, parent_id: str):
    async def read():
        async with stack.prefect_client() as client:
            return await client.read_flow_run(parent_id)

    return asyncio.run(read())


@pytest.fixture
def small_csv(tmp_path):
    from dermflow.ops.mirror import rewrite_csv_host, serve_atlas
    from tests.support.image_servers import synthetic_atlas

    root = synthetic_atlas(tmp_path / "atlas", n_labels=3, per_label=20, size=64, seed=1614)
    with serve_atlas(root / "images", root / "rows.csv") as server:
        yield rewrite_csv_host(root / "rows.csv", server.base_url, tmp_path / "rows.csv")


@pytest.mark.slow
def test_a_training_killed_after_a_checkpoint_resumes_and_the_run_completes(stack, small_csv):
    import re

    from dermflow.runs import make_run_id

    started = stack.prefect("deployment", "run", "derm/full", "-p", f"csv={small_csv}", "-p", "image_size=32",
                            "-p", "epochs=8", "-p", "batch_size=16", "-p", 'architectures=["baseline_cnn"]',
                            "-p", "weights=none")
    parent_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    store = stack.store()
    deadline = time.monotonic() + 600
    while (name := _parent(stack, parent_id).name) is None and time.monotonic() < deadline:
        time.sleep(1)
    slug = make_run_id(name).split("-", 2)[2]
    state_key, epoch_at_kill = None, 0
    while time.monotonic() < deadline and epoch_at_kill < 2:
        keys = [k for k in store.iter_keys("runs/") if k.endswith("/checkpoints/baseline_cnn/state.json")
                and k.split("/")[1].endswith("-" + slug)]
        if keys:
            state_key = keys[0]
            epoch_at_kill = store.get_json(state_key).get("epoch", 0)
        time.sleep(0.3)
    assert epoch_at_kill >= 2, f"no second checkpoint: {_parent(stack, parent_id).state}"
    run_id = state_key.split("/")[1]
    [child] = [r for r in _training_runs(stack, f"{run_id}-baseline_cnn") if r.state and r.state.is_running()]
    pid = _flow_run_pid(str(child.id))
    assert pid, "the training's process was not found"
    os.kill(pid, signal.SIGKILL)
    epoch_at_kill = store.get_json(state_key)["epoch"]

    while time.monotonic() < deadline and not (state := _parent(stack, parent_id).state).is_final():
        time.sleep(3)
    assert state.is_completed(), f"{state.name}: {state.message}"
    states = sorted(r.state.name for r in _training_runs(stack, f"{run_id}-baseline_cnn"))
    assert states == ["Completed", "Crashed"], states
    summary = store.get_json(state_key)["summary"]
    assert summary["resumed_from_epoch"] >= epoch_at_kill  # the epochs before the kill were kept
    history = store.get_json(state_key)["history"]["epoch"]
    assert history == sorted(set(history)), history  # no epoch trained twice
