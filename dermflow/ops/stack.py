"""The embedded stack: a SeaweedFS S3 server, a Prefect server, and workers, as local processes.

Used by `dermflow up|down|status` (and so `make up`/`make down`) and by the integration tests.
Each service is a detached process whose pid and log live under `Settings.data_dir`, so `up`
is idempotent (a healthy service is left alone) and `down` can stop what an earlier shell
started. This module never imports Prefect: servers and workers are started as commands.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dermflow.errors import DermflowError
from dermflow.ops.seaweed_security import write_security_config


class StackError(DermflowError, RuntimeError):
    """A service could not start, or is not answering."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port_block(count: int, start: int = 20000, stop: int = 40000, step: int = 10) -> int:
    """A base port such that base..base+count-1 and their +10000 gRPC twins are all free."""
    import random

    candidates = [base for base in range(start, stop, step) if base + 10000 + count <= 65535]
    random.shuffle(candidates)
    for base in candidates:
        ports = [base + i for i in range(count)] + [base + 10000 + i for i in range(count)]
        if all(port_is_free(p) for p in ports):
            return base
    raise StackError("no free block of ports found")


def venv_bin(name: str) -> str:
    """An executable next to the running interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found: install the project (pip install -e .) into the venv")
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return True


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None.

    With the pid it names one process for good: a pid reused by another process has another
    start time."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces and parentheses: split after the last ")".
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


SERVICE_COMMANDS = ("weed", "prefect")


def _runs_a_service_command(pid: int) -> bool:
    """Whether the process's command line runs `weed` or `prefect` (a script's path counts)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name in SERVICE_COMMANDS for arg in argv[:3] if arg)


@dataclass
class ManagedProcess:
    """A detached service process tracked through a pid file of `PID START_TIME`.

    A pid file is trusted only while its pid's start time still matches: a stale file whose pid
    now belongs to an unrelated process (after a reboot, or a crash and pid reuse) is ignored,
    never signalled. A file with no start time (written by an older dermflow) is trusted only
    when its process runs one of dermflow's service commands (`weed`, `prefect`), so that `down`
    still stops a stack started before the upgrade.
    """

    name: str
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of the process this file recorded, while that very process is alive."""
        try:
            fields = self.pid_file.read_text().split()
            pid = int(fields[0])
        except (OSError, ValueError, IndexError):
            return None
        if not _pid_alive(pid):
            return None
        if len(fields) == 1:
            return pid if _runs_a_service_command(pid) else None
        return pid if process_start_time(pid) == fields[1] else None

    def start(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # survives the shell that ran `make up`; killed as a group
        )
        log.close()
        self.pid_file.write_text(f"{process.pid} {process_start_time(process.pid)}\n")
        self._popen = process
        return process.pid

    def stop(self, timeout: float = 20.0) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() == pid:
            getattr(self, "_popen", None) and self._popen.poll()
            time.sleep(0.2)
        if self.pid() == pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        getattr(self, "_popen", None) and self._popen.poll()
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class SeaweedServer:
    """`weed server -s3` on 127.0.0.1 with access keys enforced and data under `data_dir`.

    Ports: S3 on `s3_port`; master, volume and filer on the next three ports; their gRPC
    ports are SeaweedFS's default (+10000). Iceberg and Lance endpoints are disabled.

    Only the S3 port serves data, and only with the keys: the filer's and the master's HTTP
    APIs are off (`-filer.disableHttp`, `-disableHttp`; S3 reaches them over gRPC), and the
    volume server, whose HTTP port S3 needs, serves nothing without a JWT signed with the
    random keys of a `security.toml` written at each start (SeaweedFS reads it from its working
    directory). Anonymous telemetry is off.
    """

    data_dir: Path
    s3_port: int
    access_key: str
    secret_key: str
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def ports(self) -> list[int]:
        base = [self.s3_port + i for i in range(4)]
        return base + [p + 10000 for p in base]

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess("seaweedfs", self.data_dir / "run")

    def argv(self) -> list[str]:
        storage = self.data_dir / "seaweedfs"
        storage.mkdir(parents=True, exist_ok=True)
        argv = [
            venv_bin("weed"),
            "server",
            f"-dir={storage}",
            "-ip=127.0.0.1",  # without it the volume server advertises another address
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.s3_port + 1}",
            f"-volume.port={self.s3_port + 2}",
            f"-filer.port={self.s3_port + 3}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Small volumes, many allowed: each bucket takes several volumes, and "auto"
            # (-volume.max=0 at 1 GB each) runs out after about ten buckets on a small disk.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=2000",
            "-master.telemetry=false",
            "-filer.disableHttp",  # the filer's HTTP API would serve every bucket without keys
            "-disableHttp",  # the master's HTTP API (assign, lookup); S3 uses gRPC
            f"-filer.localSocket={self.security_dir / 'filer.sock'}",  # not in a shared /tmp
        ]
        return argv

    @property
    def security_dir(self) -> Path:
        """SeaweedFS's working directory: its `security.toml` (owner-only) and local socket."""
        return self.data_dir / "run" / "seaweedfs-security"

    def write_security_config(self) -> Path:
        """SeaweedFS's `security.toml` in `security_dir`, with fresh keys and certificates."""
        return write_security_config(self.security_dir)

    def start(self, timeout: float = 60.0) -> None:
        if self.process.pid() is not None:
            self.wait_ready(timeout)
            return
        busy = [p for p in self.ports if not port_is_free(p)]
        if busy:
            raise StackError(
                f"SeaweedFS cannot start: port(s) {busy} already in use on 127.0.0.1 "
                f"(set DERMFLOW_S3_PORT to another port, or stop what holds them)"
            )
        self.write_security_config()
        self.process.start(
            self.argv(),
            env={"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key},
            cwd=self.security_dir,
        )
        self.wait_ready(timeout)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=2, read_timeout=10),
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Ready means a real write and read succeed (the volume server has registered)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        probe_bucket = "dermflow-health"
        while time.monotonic() < deadline:
            if self.process.pid() is None and getattr(self.process, "_popen", None) is not None:
                raise StackError(f"SeaweedFS exited at start:\n{self.process.log_tail()}")
            try:
                client = self.client()
                for bucket in [probe_bucket, *self.buckets]:
                    try:
                        client.head_bucket(Bucket=bucket)
                    except Exception:  # noqa: BLE001 - create it below
                        client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=probe_bucket, Key="probe", Body=b"ok")
                if client.get_object(Bucket=probe_bucket, Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                last_error = error
            time.sleep(0.5)
        raise StackError(
            f"SeaweedFS at {self.endpoint_url} not answering after {timeout:.0f}s: {last_error}\n"
            f"log ({self.process.log_file}):\n{self.process.log_tail()}"
        )

    def healthy(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop(self) -> bool:
        return self.process.stop(timeout=30)


def wait_http_ok(url: str, timeout: float, what: str, log: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = error
        if log is not None and log.pid() is None and getattr(log, "_popen", None) is not None:
            raise StackError(f"{what} exited at start:\n{log.log_tail()}")
        time.sleep(0.5)
    tail = f"\nlog ({log.log_file}):\n{log.log_tail()}" if log else ""
    raise StackError(f"{what} at {url} not answering after {timeout:.0f}s: {last}{tail}")


# --- Prefect server and workers (as commands; the Prefect client side lives in cli.py) -------

def is_local_url(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def url_port(url: str, default: int) -> int:
    from urllib.parse import urlparse

    return urlparse(url).port or default


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


@dataclass
class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its SQLite database under `data_dir`.

    A `PREFECT_API_DATABASE_CONNECTION_URL` in the environment (Postgres) is used instead.
    Hardened (`security_env`): basic auth with `auth_string` when given, CSRF protection on,
    CORS only for the UI's own origin, and concurrency leases kept on disk (under the server's
    PREFECT_HOME, `data_dir/prefect`) so a restart does not forget who holds a `gpu` slot.
    """

    data_dir: Path
    port: int = 4200
    auth_string: str | None = None

    @property
    def ui_origins(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"]

    @property
    def home(self) -> Path:
        """The server's PREFECT_HOME: where the filesystem lease storage writes its leases."""
        return self.data_dir / "prefect"

    def security_env(self) -> dict[str, str]:
        env = {
            "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
            "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ",".join(self.ui_origins),
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        }
        if self.auth_string:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_string
        return env

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess("prefect-server", self.data_dir / "run")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 120.0) -> None:
        if self.healthy():
            return
        if self.process.pid() is None and not port_is_free(self.port):
            raise StackError(
                f"Prefect server cannot start: port {self.port} is in use on 127.0.0.1 by "
                f"something that does not answer {self.api_url}/health "
                f"(set DERMFLOW_PREFECT_PORT and PREFECT_API_URL to another port, or stop it)"
            )
        if self.process.pid() is None:
            database = self.data_dir / "prefect" / "prefect.db"
            database.parent.mkdir(parents=True, exist_ok=True)
            env = {
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_API_URL": self.api_url,
                "PREFECT_API_URL": "",
                "PREFECT_HOME": str(self.home),
                **self.security_env(),
            }
            if not os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
                env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{database}"
            self.process.start(
                [venv_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
            )
        wait_http_ok(f"{self.api_url}/health", timeout, "Prefect server", self.process)

    def stop(self) -> bool:
        return self.process.stop(timeout=30)


@dataclass
class Worker:
    """A `prefect worker start` process polling some queues of a work pool."""

    name: str
    pool: str
    queues: list[str]
    state_dir: Path
    limit: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(f"worker-{self.name}", self.state_dir)

    def start(self, api_url: str, cwd: Path, auth_string: str | None = None) -> bool:
        """Start unless already running; True when started now. `auth_string`: the server's
        basic auth, which the worker and the flow runs it starts use."""
        if self.process.pid() is not None:
            return False
        argv = [venv_bin("prefect"), "worker", "start", "--pool", self.pool, "--name", self.name,
                "--type", "process"]
        for queue in self.queues:
            argv += ["--work-queue", queue]
        if self.limit:
            argv += ["--limit", str(self.limit)]
        env = {**self.env, "PREFECT_API_URL": api_url, "PREFECT_LOGGING_EXTRA_LOGGERS": extra_loggers()}
        # Prefect's process worker runs each flow run in a fresh temporary folder, so the flow run
        # is told where its `.env` and cache are: the worker's folder, unless the user chose one.
        env.setdefault("DERMFLOW_PROJECT_ROOT", os.environ.get("DERMFLOW_PROJECT_ROOT") or str(cwd))
        if auth_string:
            env["PREFECT_API_AUTH_STRING"] = auth_string
        self.process.start(argv, env=env, cwd=cwd)
        return True

    def stop(self) -> bool:
        return self.process.stop(timeout=30)


def extra_loggers() -> str:
    """PREFECT_LOGGING_EXTRA_LOGGERS for workers and their flow runs: this shell's, plus the
    core's `dermflow` loggers, whose lines then reach the run's logs in the UI."""
    names = [n.strip() for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n.strip()]
    return ",".join(dict.fromkeys([*names, "dermflow"]))


def detected_gpus() -> int:
    """GPUs visible through nvidia-smi (0 when there is none or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        output = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in output.splitlines() if line.startswith("GPU "))
