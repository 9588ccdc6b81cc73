"""`dermflow down` signals only the processes `up` started (issue 14, finding 13).

A pid file records the pid and the process's start time; a stale file whose pid now belongs to
an unrelated process must leave that process alone.
"""

import os
import subprocess
import sys
import time

import pytest

from dermflow.ops.stack import ManagedProcess

pytestmark = pytest.mark.integration

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def bystander():
    """An unrelated live process, leader of its own process group (as a killpg target would be)."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def _down(data_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "DERMFLOW_"))}
    env.update({"DERMFLOW_DATA_DIR": str(data_dir), "DERMFLOW_ENV_FILE": str(data_dir / ".env"),
                "DERMFLOW_S3_PORT": "18333", "AWS_ENDPOINT_URL": "http://127.0.0.1:18333",
                "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                "PREFECT_API_URL": "http://127.0.0.1:14200/api", "DERMFLOW_GPU_SLOTS": "1"})
    return subprocess.run([sys.executable, "-m", "dermflow.ops.cli", "down"], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("content", ["{pid}\n", "{pid} {other_start}\n"], ids=["pid-only", "pid-reused"])
def test_down_leaves_an_unrelated_process_of_a_stale_pid_file_alive(tmp_path, bystander, content):
    run = tmp_path / "run"
    run.mkdir()
    with open(f"/proc/{bystander.pid}/stat") as stat:
        started = int(stat.read().rsplit(")", 1)[1].split()[19])
    text = content.format(pid=bystander.pid, other_start=started - 100)
    for name in ("seaweedfs", "prefect-server", "worker-orchestrator", "worker-trainer-0", "worker-trainer-7"):
        (run / f"{name}.pid").write_text(text)
    result = _down(tmp_path)
    assert result.returncode == 0, result.stderr
    time.sleep(0.5)
    assert bystander.poll() is None, f"down killed an unrelated process: {result.stdout}"
    assert "stopped" not in result.stdout
    assert list(run.glob("*.pid")) == []  # stale files are cleared


def test_a_managed_process_is_stopped_by_its_own_pid_file(tmp_path):
    from dermflow.ops.stack import process_start_time

    process = ManagedProcess("sleeper", tmp_path)
    pid = process.start(["sleep", "300"])
    assert process.pid() == pid
    assert process.pid_file.read_text().split() == [str(pid), process_start_time(pid)]
    assert ManagedProcess("sleeper", tmp_path).stop(timeout=10)
    assert process.pid() is None and not process.pid_file.exists()
    process._popen.wait(timeout=10)


def test_a_pid_only_file_of_an_older_dermflow_still_stops_its_service(tmp_path):
    """A pid file without a start time is trusted when its process runs `prefect` or `weed`."""
    service = subprocess.Popen(["bash", "-c", "exec -a prefect sleep 300"], start_new_session=True)
    try:
        (tmp_path / "prefect-server.pid").write_text(f"{service.pid}\n")
        time.sleep(0.3)  # the exec has happened
        assert ManagedProcess("prefect-server", tmp_path).stop(timeout=10)
        assert service.wait(timeout=10) is not None
    finally:
        service.kill()
        service.wait()
