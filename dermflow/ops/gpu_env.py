"""Which GPUs a host has, which backend its trainers use, and the environment of each process
that `dermflow up` starts (and of the CLI).

Pure functions of what was detected, so each case (no GPU, one, four, more training slots than
GPUs) is unit-tested without a GPU:

- `gpu_names()`: the GPUs `nvidia-smi -L` lists (none without a driver).
- `gpu_extra_installed()`: the `gpu` extra (JAX with CUDA) is installed.
- `trainer_backend(...)`: `jax` with the `gpu` extra, else `tensorflow`; `KERAS_BACKEND` set by
  the user wins.
- `trainer_envs(gpus, slots, backend)`: one environment per training worker, pinned round-robin
  to one GPU (`CUDA_VISIBLE_DEVICES`), with the backend's no-preallocation setting when two
  trainers share a GPU, and `DERMFLOW_EXPECT_GPU` so a trainer that sees none says so loudly.
- `hidden_gpu_env()`: the orchestrator's, the fetch/report processes' and the CLI's: no GPU.

`python -m dermflow.ops.gpu_env extras` prints the pip extras for this host (`dev` or
`dev,gpu`); the Makefile installs what it prints.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

GPU_EXTRA_DISTRIBUTION = "jax-cuda12-plugin"  # what `pip install '.[gpu]'` brings


def gpu_names(nvidia_smi: str = "nvidia-smi", timeout: float = 10.0) -> list[str]:
    """The GPUs `nvidia-smi -L` lists, e.g. `GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)`; [] when
    there is no nvidia-smi, it fails (no driver, a driver mismatch) or lists none."""
    if shutil.which(nvidia_smi) is None:
        return []
    try:
        result = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.startswith("GPU ")]


def gpu_host(machine: str | None = None, system: str | None = None, names: list[str] | None = None) -> bool:
    """A Linux x86_64 host with an NVIDIA GPU: where the `gpu` extra's CUDA wheels install."""
    machine = machine or platform.machine()
    system = system or platform.system()
    return system == "Linux" and machine == "x86_64" and bool(gpu_names() if names is None else names)


def install_extras(gpu: bool) -> str:
    """The extras `make` installs: `dev`, plus `gpu` on a GPU host."""
    return "dev,gpu" if gpu else "dev"


def gpu_extra_installed() -> bool:
    try:
        importlib.metadata.distribution(GPU_EXTRA_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def trainer_backend(gpu_extra: bool, environ: dict[str, str] | None = None) -> str:
    """The trainers' Keras backend: as the user set KERAS_BACKEND, else JAX when the `gpu`
    extra is installed (docs/DESIGN.md says why), else TensorFlow (the CPU install)."""
    environ = os.environ if environ is None else environ
    chosen = environ.get("KERAS_BACKEND", "").strip()
    if chosen:
        return chosen
    return "jax" if gpu_extra else "tensorflow"


def trainer_envs(gpus: int, slots: int, backend: str) -> list[dict[str, str]]:
    """The environment of each of `slots` training workers on a host with `gpus` GPUs.

    Trainer k sees GPU k mod `gpus` only (none without GPUs). When slots outnumber GPUs, two
    trainers share a GPU, so neither may grab all its memory up front: JAX's preallocation is
    turned off and TensorFlow grows its memory as needed."""
    if slots < 1:
        raise ValueError(f"slots={slots}: a stack has at least one training worker")
    shared = gpus > 0 and slots > gpus
    envs = []
    for slot in range(slots):
        env = {
            "CUDA_VISIBLE_DEVICES": str(slot % gpus) if gpus else "",
            "JAX_PLATFORMS": "",  # JAX's default (GPU if any), whatever `dermflow up` itself saw
            "KERAS_BACKEND": backend,
            "DERMFLOW_TRAINER_SLOT": str(slot),
            "DERMFLOW_EXPECT_GPU": "1" if gpus else "0",
        }
        if shared:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
        envs.append(env)
    return envs


def hidden_gpu_env(gpus: int = 0) -> dict[str, str]:
    """The orchestrator's (and fetch/split/report's, which run in it) and the CLI's
    environment: no GPU visible to any backend, so they never allocate GPU memory. `gpus` is
    passed on as `DERMFLOW_GPU_COUNT`: what the orchestrator may spread a data-parallel
    training over."""
    return {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "DERMFLOW_GPU_COUNT": str(gpus)}


def hide_gpus(environ: dict[str, str] | None = None) -> None:
    """Hide the GPUs from this process (the CLI: predict/evaluate run on the CPU)."""
    environ = os.environ if environ is None else environ
    for name, value in hidden_gpu_env().items():
        if name != "DERMFLOW_GPU_COUNT":
            environ[name] = value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["extras"]:
        print(install_extras(gpu_host()))
        return 0
    if argv == ["gpus"]:
        print("\n".join(gpu_names()))
        return 0
    print("usage: python -m dermflow.ops.gpu_env extras|gpus", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
