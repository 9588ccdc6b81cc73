"""`dermflow status` (issue 15): each service's restarts and last error as the supervisor
recorded them, the supervisor itself, and whether alerts are wired (unknown without the API)."""

from __future__ import annotations

import json

import pytest

from dermflow.ops.stack import free_port_block
from dermflow.settings import Settings

pytestmark = pytest.mark.unit


def _settings(tmp_path) -> Settings:
    port = free_port_block(1, start=41000, stop=49000)
    return Settings(data_dir=tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{port}/api", gpu_slots=1,
                    AWS_ENDPOINT_URL="https://s3.example.org")


def test_status_shows_the_supervisors_records_and_what_is_down(tmp_path, capsys):
    from dermflow.ops.status import print_status, stack_status

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "supervisor.json").write_text(json.dumps({"worker-orchestrator": {
        "restarts": 2, "last_error": "exited; log: Killed", "last_restart": 1_780_000_000.0}}))
    status = stack_status(_settings(tmp_path))
    rows = {row["service"]: row for row in status["services"]}
    assert set(rows) == {"Prefect server", "worker orchestrator", "worker trainer-0", "supervisor"}
    assert not any(row["healthy"] for row in rows.values())
    assert rows["worker orchestrator"]["restarts"] == 2
    assert rows["worker orchestrator"]["last_error"] == "exited; log: Killed"
    assert rows["worker trainer-0"]["restarts"] == 0 and rows["worker trainer-0"]["last_error"] is None
    assert status["alerts"] == {"wired": None, "why": "the Prefect API is not answering"}
    print_status(status)
    out = capsys.readouterr().out
    assert "restarts=2" in out and "last error: exited; log: Killed" in out
    assert "alerts                 unknown: the Prefect API is not answering" in out
    print_status(status, as_json=True)
    assert json.loads(capsys.readouterr().out) == status


def test_unwired_alerts_say_how_to_wire_them(tmp_path, monkeypatch):
    from dermflow.ops import alerts, status

    monkeypatch.setattr(alerts, "alerts_status", lambda: {"wired": False, "automations": {}})
    shown = status._alerts(_settings(tmp_path), server_up=True)
    assert shown["wired"] is False
    assert shown["why"] == "DERMFLOW_ALERT_WEBHOOK is not set; set it in .env and rerun `dermflow up`"
