"""Separate "hosts" on one machine for the multi-host test: Linux network namespaces on a
bridge, each process also in its own mount and UTS namespace.

A `Lan` is a bridge with an address of its own (the test process, and the image server it runs,
live there) and one network namespace per `Host`, joined by a veth pair. A `Host` has its own
address, hostname, working directory and HOME, and its own venv with dermflow installed from a
wheel (not editable). Every process of a host runs under `unshare -m -u`, where `/work` (the
checkout, the shared data) and `/tmp` (the other hosts' folders) are empty tmpfs mounts and only
the host's own folder is mounted back; the dependencies are the project venv's site-packages,
bind-mounted read-only into the host's folder and named by a `.pth` line (so its editable
dermflow finder is never activated).

Needs root and `ip netns`; `Lan.available()` says why not otherwise. Everything is removed by
`Lan.close()`; traffic goes only to addresses the Lan made.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

# The mount namespace of a host process: hide /work, /tmp and the checkout (wherever CI clones
# it), mount back the host's folder.
_ENTER = r"""
set -e
mount --make-rprivate /
mount --bind -o ro "$DF_DEPS" "$DF_ROOT/deps"
mount --rbind "$DF_ROOT" /mnt
mount -t tmpfs tmpfs /work
mount -t tmpfs tmpfs /tmp
mkdir -p "$DF_CHECKOUT" && mount -t tmpfs tmpfs "$DF_CHECKOUT"
mkdir -p "$DF_ROOT"
mount --move /mnt "$DF_ROOT"
hostname "$DF_HOSTNAME"
cd "$DF_CWD"
exec "$@"
"""


CHECKOUT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def _deps_dir() -> Path:
    """The site-packages whose packages every host uses (the project venv's)."""
    return Path(sysconfig.get_paths()["purelib"])


@dataclass
class Host:
    name: str
    netns: str
    address: str
    root: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def python(self) -> str:
        return str(self.root / "venv" / "bin" / "python")

    @property
    def site_packages(self) -> Path:
        return self.root / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def base_env(self) -> dict[str, str]:
        """A clean environment: nothing of the test process's (no PYTHONPATH, no .env)."""
        return {"PATH": f"{self.root / 'venv' / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.home),
                "LANG": "C.UTF-8", "PREFECT_HOME": str(self.home / ".prefect"),
                "DERMFLOW_PROJECT_ROOT": str(self.work), "DERMFLOW_ENV_FILE": str(self.work / ".env"),
                "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                "DF_ROOT": str(self.root), "DF_DEPS": str(_deps_dir()), "DF_HOSTNAME": self.name,
                "DF_CHECKOUT": str(CHECKOUT)}

    def _argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--", "/bin/sh", "-c", _ENTER,
                "sh", *argv]

    def spawn(self, argv: list[str], log: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start a long-running process on this host; its output goes to `root/logs/<log>.log`."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        environment = {**self.base_env(), **(env or {}), "DF_CWD": str(cwd or self.work)}
        handle = open(logs / f"{log}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(self._argv(argv), env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        process.log_path = logs / f"{log}.log"  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def run(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        environment = {**self.base_env(), **(env or {}), "DF_CWD": str(cwd or self.work)}
        return subprocess.run(self._argv(argv), env=environment, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        end = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self.processes.clear()


class Lan:
    """A bridge, its address (this process's side) and the hosts on it."""

    def __init__(self, base: Path):
        token = secrets.token_hex(2)
        self.token = token
        self.bridge = f"dfbr{token}"
        octet = 100 + int(token, 16) % 150
        self.prefix = f"10.231.{octet}."
        self.address = self.prefix + "254"  # the test process and the image server
        self.base = base
        self.hosts: list[Host] = []
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "unshare", "mount"):
            if shutil.which(tool) is None:
                return f"`{tool}` is not installed"
        probe = f"dfprobe{secrets.token_hex(2)}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
        return None

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        netns, outside, inside = f"df{self.token}-{name}", f"dfv{self.token}{index}", f"dfi{self.token}{index}"
        host = Host(name, netns, self.prefix + str(index), self.base / name)
        for folder in ("deps", "home", "work", "logs"):
            (host.root / folder).mkdir(parents=True, exist_ok=True)
        _run("ip", "netns", "add", netns)
        self.hosts.append(host)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", netns)
        _run("ip", "link", "set", outside, "master", self.bridge)
        _run("ip", "link", "set", outside, "up")
        _run("ip", "-n", netns, "addr", "add", f"{host.address}/24", "dev", inside)
        _run("ip", "-n", netns, "link", "set", inside, "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        return host

    def install(self, host: Host, wheel: Path) -> None:
        """A venv of the host's own with the wheel installed (not editable); the dependencies
        come from the read-only `deps` mount, named by a `.pth` line."""
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(host.root / "venv")],
                       check=True, timeout=120)
        (host.site_packages / "dermflow-deps.pth").write_text(str(host.root / "deps") + "\n")
        shutil.copy(wheel, host.root / wheel.name)
        result = host.run([host.python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--ignore-installed", "--no-warn-script-location", str(host.root / wheel.name)])
        if result.returncode != 0:
            raise RuntimeError(f"installing dermflow on {host.name} failed:\n{result.stdout}\n{result.stderr}")

    def close(self) -> None:
        for host in self.hosts:
            host.stop()
        for host in self.hosts:
            subprocess.run(["ip", "netns", "delete", host.netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)


def build_wheel(project_root: Path, out: Path) -> Path:
    """A wheel of the project, built from a copy of its sources (nothing written into the checkout)."""
    source = out / "src"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(project_root / name, source / name if source.exists() else _mkdir(source) / name)
    for package in ("dermflow", "tasks", "flows"):
        shutil.copytree(project_root / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, timeout=300)
    return next(out.glob("dermflow-*.whl"))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
