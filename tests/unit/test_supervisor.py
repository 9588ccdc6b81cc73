"""The supervisor loop (issue 15): a dead service is started again after a backoff that doubles
with each crash in a row; its restarts and last error are recorded for `dermflow status`; it
leaves services alone while `dermflow up` holds the lifecycle lock; and the systemd unit."""

from __future__ import annotations

import pytest

from dermflow.ops.supervisor import (
    STABLE_AFTER,
    Service,
    Supervisor,
    lifecycle_lock,
    read_state,
    systemd_unit,
    write_systemd_units,
)

pytestmark = pytest.mark.unit


class FakeService:
    def __init__(self, name: str, log: str = ""):
        self.name, self.up, self.starts, self.log, self.fail_with = name, True, 0, log, None

    def start(self):
        if self.fail_with:
            raise self.fail_with
        self.starts += 1
        self.up = True

    def service(self) -> Service:
        return Service(self.name, lambda: self.up, self.start, lambda: self.log)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _supervisor(tmp_path, *fakes, clock=None):
    return Supervisor([f.service() for f in fakes], tmp_path, clock=clock or Clock(), base_delay=2, max_delay=60)


def test_a_dead_service_is_restarted_after_the_backoff_and_recorded(tmp_path):
    worker = FakeService("worker-orchestrator", log="started\nKilled by signal 9\n\n")
    clock = Clock()
    supervisor = _supervisor(tmp_path, worker, clock=clock)
    supervisor.check_once()
    assert worker.starts == 0 and read_state(tmp_path)["worker-orchestrator"]["restarts"] == 0
    worker.up = False
    supervisor.check_once()  # found dead: waits the backoff first
    assert worker.starts == 0
    clock.now += 2.0
    supervisor.check_once()
    assert worker.starts == 1 and worker.up
    state = read_state(tmp_path)["worker-orchestrator"]
    assert state["restarts"] == 1 and state["last_error"] == "exited; log: Killed by signal 9"
    assert state["last_restart"] == clock.now


def test_crashes_in_a_row_double_the_backoff_until_the_service_stays_up(tmp_path):
    server = FakeService("prefect-server")
    clock = Clock()
    supervisor = _supervisor(tmp_path, server, clock=clock)
    waits = []
    for _ in range(4):
        server.up = False
        supervisor.check_once()
        found = clock.now
        while not server.up:
            clock.now += 0.5
            supervisor.check_once()
        waits.append(clock.now - found)
    assert waits == [2.0, 4.0, 8.0, 16.0]
    clock.now += STABLE_AFTER
    supervisor.check_once()  # up long enough: the next crash starts from the first backoff again
    server.up = False
    supervisor.check_once()
    clock.now += 2.0
    supervisor.check_once()
    assert server.up and read_state(tmp_path)["prefect-server"]["restarts"] == 5


def test_a_failed_restart_is_recorded_and_tried_again_later(tmp_path):
    seaweed = FakeService("seaweedfs")
    clock = Clock()
    supervisor = _supervisor(tmp_path, seaweed, clock=clock)
    seaweed.up, seaweed.fail_with = False, RuntimeError("port 8333 already in use")
    supervisor.check_once()
    clock.now += 2.0
    supervisor.check_once()
    state = read_state(tmp_path)["seaweedfs"]
    assert state["restarts"] == 0 and state["last_error"] == "restart failed: port 8333 already in use"
    seaweed.fail_with = None
    clock.now += 2.0
    supervisor.check_once()
    assert not seaweed.up  # the backoff grew to 4 s
    clock.now += 2.0
    supervisor.check_once()
    assert seaweed.up and read_state(tmp_path)["seaweedfs"]["restarts"] == 1


def test_nothing_is_restarted_while_up_holds_the_lifecycle_lock(tmp_path):
    worker = FakeService("worker-trainer-0")
    clock = Clock()
    supervisor = _supervisor(tmp_path, worker, clock=clock)
    worker.up = False
    supervisor.check_once()
    clock.now += 10
    with lifecycle_lock(tmp_path):
        supervisor.check_once()
        assert worker.starts == 0
    supervisor.check_once()
    assert worker.starts == 1


def test_the_records_survive_a_restart_of_the_supervisor(tmp_path):
    worker = FakeService("worker-orchestrator")
    clock = Clock()
    supervisor = _supervisor(tmp_path, worker, clock=clock)
    worker.up = False
    supervisor.check_once()
    clock.now += 2
    supervisor.check_once()
    again = _supervisor(tmp_path, worker, clock=clock)
    assert again.records["worker-orchestrator"].restarts == 1


def test_the_systemd_unit_restarts_the_supervisor_on_failure(tmp_path):
    unit = systemd_unit("/venv/bin/python", tmp_path / "project", tmp_path / "project" / ".env")
    assert "Restart=on-failure" in unit and "ExecStart=/venv/bin/python -m dermflow.ops.supervisor" in unit
    assert "ExecStartPre=/venv/bin/python -m dermflow.ops.cli up --no-supervisor" in unit
    assert f"DERMFLOW_ENV_FILE={tmp_path / 'project' / '.env'}" in unit and "[Install]" in unit
    written = write_systemd_units(tmp_path / "units", "/venv/bin/python", tmp_path, tmp_path / ".env")
    assert [p.name for p in written] == ["dermflow.service"] and written[0].read_text().startswith("[Unit]")


def test_up_with_systemd_units_only_writes_the_unit(tmp_path, monkeypatch, capsys):
    from dermflow.ops import cli, lifecycle

    monkeypatch.setattr(lifecycle, "_settings_with_env_file",
                        lambda: pytest.fail("nothing is started or written but the unit"))
    assert cli.main(["up", "--systemd-units", str(tmp_path / "units")]) == 0
    assert (tmp_path / "units" / "dermflow.service").exists()
    assert "systemctl --user" in capsys.readouterr().out
