"""The supervisor that `dermflow up` starts: it restarts a crashed service of the stack.

A loop (`python -m dermflow.ops.supervisor`, a detached process with its own pid file, stopped
first by `dermflow down`) looks at each service every few seconds: SeaweedFS (when embedded),
the Prefect server (when local) and every worker. A service whose process is gone is started
again after a backoff that doubles with each crash in a row (2 s, 4 s, ... up to 5 minutes) and
is forgotten once the service has stayed up for a while. Restarts and each service's last error
(the last line of its log when it died, or why the restart failed) go to `run/supervisor.json`,
which `dermflow status` shows.

Starting and restarting services take `run/lifecycle.lock`, so `dermflow up` and the supervisor
never start the same service twice. For a reboot, `dermflow up --systemd-units DIR` writes a
systemd user unit that runs this loop (see `systemd_unit`).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dermflow.ops.stack import ManagedProcess, process_start_time

SUPERVISOR = "supervisor"
STATE_FILE = "supervisor.json"
LOCK_FILE = "lifecycle.lock"
INTERVAL = 2.0  # seconds between two looks
BASE_DELAY = 2.0  # the first restart's backoff; doubled with each crash in a row
MAX_DELAY = 300.0
STABLE_AFTER = 120.0  # up this long: its earlier crashes no longer lengthen the backoff


@dataclass
class Service:
    """What the supervisor needs of a service: is it alive, start it, its log's tail."""

    name: str
    alive: Callable[[], bool]
    start: Callable[[], object]
    log_tail: Callable[[], str] = lambda: ""


@dataclass
class ServiceRecord:
    restarts: int = 0
    last_error: str | None = None
    last_restart: float | None = None
    crashes_in_a_row: int = 0
    down_since: float | None = None
    next_try: float | None = None
    up_since: float | None = None


@dataclass
class Supervisor:
    services: list[Service]
    state_dir: Path
    clock: Callable[[], float] = time.time
    base_delay: float = BASE_DELAY
    max_delay: float = MAX_DELAY
    records: dict[str, ServiceRecord] = field(default_factory=dict)

    def __post_init__(self):
        saved = read_state(self.state_dir)
        for service in self.services:
            known = {k: v for k, v in saved.get(service.name, {}).items() if k in ServiceRecord.__dataclass_fields__}
            self.records.setdefault(service.name, ServiceRecord(**known))

    def backoff(self, crashes_in_a_row: int) -> float:
        return min(self.base_delay * 2 ** max(crashes_in_a_row - 1, 0), self.max_delay)

    def check_once(self) -> None:
        """One look at every service: restart those that are down and whose backoff is over."""
        for service in self.services:
            self._check(service, self.records[service.name])
        self.save()

    def _check(self, service: Service, record: ServiceRecord) -> None:
        now = self.clock()
        if service.alive():
            record.down_since = record.next_try = None
            record.up_since = record.up_since or now
            if record.crashes_in_a_row and now - record.up_since >= STABLE_AFTER:
                record.crashes_in_a_row = 0
            return
        if record.down_since is None:  # just found dead
            record.down_since, record.up_since = now, None
            record.crashes_in_a_row += 1
            tail = [line for line in service.log_tail().splitlines() if line.strip()]
            record.last_error = "exited" + (f"; log: {tail[-1].strip()[:300]}" if tail else "")
            record.next_try = now + self.backoff(record.crashes_in_a_row)
        if now < (record.next_try or 0):
            return
        with lifecycle_lock(self.state_dir, blocking=False) as held:
            if not held:  # `dermflow up` is starting services right now: look again later
                return
            try:
                service.start()
            except Exception as error:  # noqa: BLE001 - recorded, and tried again after a longer wait
                record.crashes_in_a_row += 1
                record.last_error = f"restart failed: {' '.join(str(error).split())[:300]}"
                record.next_try = now + self.backoff(record.crashes_in_a_row)
                return
        record.restarts += 1
        record.last_restart = self.clock()
        record.down_since = record.next_try = None
        record.up_since = self.clock()

    def save(self) -> None:
        path = self.state_dir / STATE_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({name: asdict(r) for name, r in self.records.items()}, indent=2))
        temporary.replace(path)


def read_state(state_dir: Path) -> dict[str, dict]:
    """What the supervisor recorded per service ({} before its first look)."""
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def lifecycle_lock(state_dir: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on `run/lifecycle.lock` while services are started; yields whether it
    is held (False only when not blocking and someone else holds it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def supervisor_process(state_dir: Path) -> ManagedProcess:
    return ManagedProcess(SUPERVISOR, state_dir)


def start_supervisor(state_dir: Path, env: dict[str, str] | None = None) -> bool:
    """Start the supervisor loop unless it runs; True when started now."""
    process = supervisor_process(state_dir)
    if process.pid() is not None:
        return False
    process.start([sys.executable, "-m", "dermflow.ops.supervisor"], env=env)
    return True


def _reap_children() -> None:
    """Collect the exit status of restarted services that died (else they stay zombies)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def run_forever(supervisor: Supervisor, interval: float = INTERVAL) -> None:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        _reap_children()
        try:
            supervisor.check_once()
        except Exception as error:  # noqa: BLE001 - the supervisor must outlive one bad look
            print(f"supervisor: {error!r}", file=sys.stderr, flush=True)
        time.sleep(interval)


def main() -> int:
    from dermflow.ops.lifecycle import supervised_services
    from dermflow.settings import load_settings

    settings = load_settings()
    state_dir = settings.data_dir / "run"
    # Under systemd nothing wrote the pid file: write it, so `dermflow down` can stop this loop.
    process = supervisor_process(state_dir)
    if process.pid() != os.getpid():
        state_dir.mkdir(parents=True, exist_ok=True)
        process.pid_file.write_text(f"{os.getpid()} {process_start_time(os.getpid())}\n")
    print(f"supervisor {os.getpid()}: watching {', '.join(s.name for s in supervised_services(settings))}",
          flush=True)
    run_forever(Supervisor(supervised_services(settings), state_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- systemd ---------------------------------------------------------------------------------

UNIT_NAME = "dermflow.service"


def systemd_unit(python: str, project_root: Path, env_file: Path) -> str:
    """A systemd user unit that brings the stack up at login/boot and runs the supervisor loop
    in the foreground; systemd restarts the loop if it dies (`Restart=on-failure`), and the
    loop restarts the services. `KillMode=process`: stopping or restarting the unit's loop
    leaves the services to `ExecStop` (`dermflow down`), not to a signal to the whole group."""
    cli = f"{python} -m dermflow.ops.cli"
    return f"""[Unit]
Description=dermflow stack (SeaweedFS, Prefect server, workers) under its supervisor
After=network-online.target

[Service]
Type=simple
WorkingDirectory={project_root}
Environment=DERMFLOW_PROJECT_ROOT={project_root}
Environment=DERMFLOW_ENV_FILE={env_file}
ExecStartPre={cli} up --no-supervisor
ExecStart={python} -m dermflow.ops.supervisor
ExecStop={cli} down
Restart=on-failure
RestartSec=10
TimeoutStartSec=900
KillMode=process

[Install]
WantedBy=default.target
"""


def write_systemd_units(directory: Path, python: str, project_root: Path, env_file: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    unit = directory / UNIT_NAME
    unit.write_text(systemd_unit(python, project_root, env_file))
    return [unit]
