"""Where a training runs: the devices this process sees, whether it should have seen a GPU, the
data-parallel distribution over several GPUs, and what counts as running out of GPU memory.

- `describe_devices()`: the Keras backend, the devices it sees, and what `dermflow up` told
  this trainer (`DERMFLOW_EXPECT_GPU`, `DERMFLOW_TRAINER_SLOT`, `CUDA_VISIBLE_DEVICES`).
  Recorded in each model's params.json and the run's report, and written as the trainer's
  heartbeat for `dermflow status`.
- `check_placement(info, require_gpu)`: the warnings of a trainer that should be on a GPU and
  is not; a `GPURequiredError` instead when the run asked for `require_gpu`.
- `data_parallel(devices)`: Keras' `DataParallel` over this process's accelerators (JAX).
- `is_allocation_error(error)`: an out-of-memory error of TensorFlow, JAX/XLA or PyTorch.
- `device_groups(...)`: which GPUs each architecture of a run gets (one each, or several when
  `data_parallel` and there are more GPUs than architectures).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from dermflow.errors import DermflowError

GPU_EXTRA_DISTRIBUTION = "jax-cuda12-plugin"
ALLOCATION_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OOM when allocating", "ResourceExhausted",
                      "failed to allocate")


class GPURequiredError(DermflowError):
    """`require_gpu=true`, and this trainer sees no GPU (permanent: a retry sees the same)."""


def _gpu_extra_installed() -> bool:
    try:
        importlib.metadata.distribution(GPU_EXTRA_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def backend_devices(backend: str) -> list[str]:
    """The devices the backend sees, as `platform:id (kind)` strings."""
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} ({getattr(d, 'device_kind', d.platform)})" for d in jax.devices()]
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return [f"gpu:{i} ({d.name})" for i, d in enumerate(gpus)] or ["cpu:0 (CPU)"]
    if backend == "torch":
        import torch

        count = torch.cuda.device_count()
        return [f"gpu:{i} ({torch.cuda.get_device_name(i)})" for i in range(count)] or ["cpu:0 (CPU)"]
    return [f"cpu:0 ({backend})"]


def describe_devices(environ: dict[str, str] | None = None) -> dict:
    """What this process trains on, and what it was meant to train on."""
    import keras

    environ = os.environ if environ is None else environ
    backend = keras.backend.backend()
    devices = backend_devices(backend)
    return {
        "backend": backend,
        "devices": devices,
        "accelerator": any(not d.startswith("cpu") for d in devices),
        "expect_gpu": environ.get("DERMFLOW_EXPECT_GPU") == "1" or _gpu_extra_installed(),
        "cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES"),
        "trainer_slot": environ.get("DERMFLOW_TRAINER_SLOT"),
        "pid": os.getpid(),
    }


def check_placement(info: dict, require_gpu: bool) -> list[str]:
    """Warnings when a trainer that should be on a GPU is not (an installed GPU backend that
    finds no device, a driver mismatch, a CPU fallback); raises with `require_gpu`."""
    if info["accelerator"]:
        return []
    why = (f"backend {info['backend']} sees only {', '.join(info['devices'])} "
           f"(CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']!r})")
    if require_gpu:
        raise GPURequiredError(
            f"require_gpu=true but this trainer has no GPU: {why}. Check `nvidia-smi` on the worker's "
            "host, that the gpu extra is installed there (`make` installs it when nvidia-smi lists a GPU; "
            "by hand: pip install -c constraints.txt -c constraints-gpu.txt -e '.[gpu]'), and that the "
            "trainers run with KERAS_BACKEND=jax (`dermflow status`); or run with require_gpu=false."
        )
    if info["expect_gpu"]:
        return [f"this trainer should train on a GPU but trains on the CPU: {why}. A driver mismatch or "
                "a CUDA plugin that failed to load shows in the worker's log; `nvidia-smi` on the host "
                "says which GPUs the driver sees."]
    return []


def is_allocation_error(error: BaseException) -> bool:
    """An accelerator (or host) allocation failure: TensorFlow's ResourceExhaustedError, JAX's
    XlaRuntimeError RESOURCE_EXHAUSTED, PyTorch's OutOfMemoryError, a plain MemoryError."""
    if isinstance(error, MemoryError):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"ResourceExhaustedError", "OutOfMemoryError"}:
        return True
    text = str(error)
    return any(marker.lower() in text.lower() for marker in ALLOCATION_MARKERS)


def data_parallel(devices: list | None = None):
    """Keras' DataParallel over `devices` (default: every accelerator, else every device this
    process sees); None when there is only one (nothing to spread over)."""
    import keras

    if devices is None:
        every = keras.distribution.list_devices()
        devices = [d for d in every if not str(d).lower().startswith("cpu")] or every
    found = devices
    if len(found) < 2:
        return None
    return keras.distribution.DataParallel(devices=found)


def device_groups(architectures: list[str], gpu_count: int, data_parallel: bool) -> dict[str, list[int]]:
    """The GPUs each architecture trains on: none known (empty lists: the trainer's own pinned
    GPU), or with `data_parallel` and more GPUs than architectures, a disjoint block of
    `gpu_count // len(architectures)` GPUs each."""
    if not data_parallel or gpu_count <= len(architectures) or not architectures:
        return {arch: [] for arch in architectures}
    width = gpu_count // len(architectures)
    return {arch: list(range(i * width, (i + 1) * width)) for i, arch in enumerate(architectures)}


def orchestrator_gpu_count(environ: dict[str, str] | None = None) -> int:
    """The host's GPUs as `dermflow up` told the orchestrator (`DERMFLOW_GPU_COUNT`; it sees
    none itself), 0 when not told."""
    environ = os.environ if environ is None else environ
    try:
        return max(0, int(environ.get("DERMFLOW_GPU_COUNT", "0")))
    except ValueError:
        return 0


def write_heartbeat(path: Path, info: dict) -> None:
    """The devices this trainer saw, for `dermflow status` (atomic: status may read it meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(info))
    partial.replace(path)


def heartbeat_path(data_dir: Path, slot: str | int) -> Path:
    """Where training worker `slot` of the local stack writes what it saw (a local file under
    the stack's run directory, beside the workers' pid files; not a bucket key)."""
    return Path(data_dir) / "run" / f"trainer-{slot}.devices.json"


def read_heartbeat(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
