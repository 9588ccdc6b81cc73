"""Which extras a host installs, which backend its trainers use, and the environment of every
process `dermflow up` starts (issue 16), without a GPU: a fake `nvidia-smi` on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermflow.ops import gpu_env

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _fake_nvidia_smi(directory: Path, output: str, exit_code: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    lines = "".join(f"echo '{line}'\n" for line in output.splitlines())  # echo: a shell builtin
    script.write_text(f"#!/bin/sh\n{lines}exit {exit_code}\n")
    script.chmod(0o755)
    return directory


TWO_GPUS = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-a)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-b)"


def test_the_gpus_nvidia_smi_lists_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path / 'bin', TWO_GPUS)}{os.pathsep}{os.environ['PATH']}")
    assert [name.split(":")[0] for name in gpu_env.gpu_names()] == ["GPU 0", "GPU 1"]
    assert gpu_env.gpu_host(machine="x86_64", system="Linux")
    assert not gpu_env.gpu_host(machine="aarch64", system="Linux")  # no CUDA wheels of the extra there
    assert not gpu_env.gpu_host(machine="x86_64", system="Darwin")


def test_a_failing_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    """A driver mismatch: nvidia-smi exits non-zero (and may still print something)."""
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", "Failed to initialize NVML: Driver/library version mismatch\nGPU 0: x", 9)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert gpu_env.gpu_names() == []
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_env.gpu_names() == []


@pytest.mark.parametrize(("listing", "extras"), [(TWO_GPUS, "dev,gpu"), ("", "dev"), (None, "dev")])
def test_make_installs_the_gpu_extra_only_where_nvidia_smi_lists_a_gpu(tmp_path, listing, extras):
    """What the Makefile runs (`python -m dermflow.ops.gpu_env extras`), with only the fake
    nvidia-smi (or none) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if listing is not None:
        _fake_nvidia_smi(bin_dir, listing)
    result = subprocess.run([sys.executable, "-m", "dermflow.ops.gpu_env", "extras"], capture_output=True,
                            text=True, cwd=ROOT, env={"PATH": str(bin_dir), "PYTHONPATH": str(ROOT)}, check=True)
    expected = extras if os.uname().machine == "x86_64" and sys.platform == "linux" else "dev"
    assert result.stdout.strip() == expected


def test_the_makefile_passes_the_gpu_constraints_with_the_gpu_extra(tmp_path):
    # -B: what make would run to install, even where the venv is installed already
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", TWO_GPUS)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    dry = subprocess.run(["make", "-n", "-B", "venv", f"PYTHON={sys.executable}", "EXTRAS=dev,gpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "-c constraints.txt -c constraints-gpu.txt -e '.[dev,gpu]'" in dry
    cpu = subprocess.run(["make", "-n", "-B", "venv", f"PYTHON={sys.executable}", "EXTRAS=dev"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "-e '.[dev]'" in cpu and "constraints-gpu.txt -e" not in cpu


def test_the_trainers_backend_is_jax_with_the_gpu_extra_and_tensorflow_without():
    assert gpu_env.trainer_backend(True, {}) == "jax"
    assert gpu_env.trainer_backend(False, {}) == "tensorflow"
    assert gpu_env.trainer_backend(True, {"KERAS_BACKEND": "tensorflow"}) == "tensorflow"  # the user's choice


def test_no_gpu_gives_one_cpu_trainer_that_expects_none():
    [env] = gpu_env.trainer_envs(0, 1, "tensorflow")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["DERMFLOW_EXPECT_GPU"] == "0"
    assert env["KERAS_BACKEND"] == "tensorflow" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in env


def test_one_gpu_one_trainer_pinned_to_it():
    [env] = gpu_env.trainer_envs(1, 1, "jax")
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["DERMFLOW_EXPECT_GPU"] == "1"
    assert env["KERAS_BACKEND"] == "jax" and env["JAX_PLATFORMS"] == ""
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in env  # alone on its GPU: preallocation is faster


def test_four_gpus_four_trainers_each_on_its_own():
    envs = gpu_env.trainer_envs(4, 4, "jax")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["DERMFLOW_TRAINER_SLOT"] for e in envs] == ["0", "1", "2", "3"]
    assert all("XLA_PYTHON_CLIENT_PREALLOCATE" not in e for e in envs)


def test_more_slots_than_gpus_share_them_without_preallocating():
    envs = gpu_env.trainer_envs(2, 5, "jax")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1", "0"]
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and e["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
               for e in envs)
    with pytest.raises(ValueError):
        gpu_env.trainer_envs(2, 0, "jax")


def test_the_orchestrator_and_the_cli_see_no_gpu():
    env = gpu_env.hidden_gpu_env(4)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["JAX_PLATFORMS"] == "cpu" and env["DERMFLOW_GPU_COUNT"] == "4"
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    gpu_env.hide_gpus(environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}


def test_the_cli_hides_the_gpus_before_any_command(monkeypatch):
    from dermflow.ops import cli

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(cli, "build_parser", lambda: _Parser(lambda args: os.environ["CUDA_VISIBLE_DEVICES"] == ""))
    assert cli.main(["anything"]) is True


class _Parser:
    def __init__(self, func):
        self.func = func

    def parse_args(self, argv):
        return type("Args", (), {"func": staticmethod(self.func), "command": "x"})()


def test_the_stack_starts_a_hidden_orchestrator_and_pinned_trainers(tmp_path, monkeypatch):
    from dermflow.ops import lifecycle, stack
    from dermflow.settings import load_settings

    monkeypatch.setattr(stack, "detected_gpus", lambda: 2)
    monkeypatch.setattr(gpu_env, "gpu_extra_installed", lambda: True)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    settings = load_settings(data_dir=tmp_path, gpu_slots=3)
    orchestrator, *trainers = lifecycle._workers(settings)
    assert orchestrator.env["CUDA_VISIBLE_DEVICES"] == "" and orchestrator.queues == [lifecycle.ORCHESTRATION_QUEUE]
    assert [(t.name, t.env["CUDA_VISIBLE_DEVICES"], t.env["KERAS_BACKEND"]) for t in trainers] == [
        ("trainer-0", "0", "jax"), ("trainer-1", "1", "jax"), ("trainer-2", "0", "jax")]


def test_status_shows_each_trainers_backend_and_devices(tmp_path, monkeypatch, capsys):
    """What a trainer saw (its heartbeat) wins over what it was given; the orchestrator sees none."""
    from types import SimpleNamespace

    from dermflow.modeling.devices import heartbeat_path, write_heartbeat
    from dermflow.ops import lifecycle, stack
    from dermflow.settings import load_settings

    monkeypatch.setattr(stack, "detected_gpus", lambda: 2)
    monkeypatch.setattr(gpu_env, "gpu_extra_installed", lambda: True)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    settings = load_settings(data_dir=tmp_path, gpu_slots=2, aws_endpoint_url="https://s3.example.org",
                             prefect_api_url="https://prefect.example.org/api")
    monkeypatch.setattr(lifecycle, "load_settings", lambda: settings)
    write_heartbeat(heartbeat_path(tmp_path, 1), {"backend": "jax", "devices": ["cpu:0 (cpu)"],
                                                  "accelerator": False, "expect_gpu": True})
    lifecycle.cmd_status(SimpleNamespace(json=True))
    rows = {row["service"]: row for row in json.loads(capsys.readouterr().out)["services"]}
    assert rows["worker orchestrator"]["devices"] == ["cpu"]
    assert (rows["worker trainer-0"]["backend"], rows["worker trainer-0"]["devices"]) == ("jax", ["gpu 0"])
    assert rows["worker trainer-1"]["devices"] == ["cpu:0 (cpu)"] and "CPU fallback" in rows["worker trainer-1"]["seen"]
