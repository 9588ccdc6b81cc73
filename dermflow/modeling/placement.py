"""Where a training runs: the devices it sees, and Keras data parallelism over them.

`check_placement` describes this process's devices (`dermflow.modeling.devices`), warns loudly
when it should have a GPU and has none (a `placement` progress event, which `derm-train` turns
into a log warning and an artifact), and raises under `require_gpu` before any work.
`distribution_scope` trains under `keras.distribution.DataParallel` when `data_parallel` asks
and the backend is JAX with several devices. `Placement` carries what the run records about
it: the devices, the epoch timer behind the throughput figures, and an out-of-memory retry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import keras

from dermflow.config import TrainConfig
from dermflow.modeling import devices
from dermflow.modeling.callbacks import EpochTimer, Progress

log = logging.getLogger("dermflow.modeling.train")


@dataclass
class Placement:
    """Where this training ran, how fast, and whether it had to shrink its batch."""

    device: dict  # devices.describe_devices(), plus the warnings and the data-parallel devices
    timer: EpochTimer
    oom_retry: dict | None = None

    def throughput(self, train_images: int, evaluation) -> dict:
        """Training and inference images/s; `evaluation` is the final `train.Evaluation` or None."""
        return {"train_images_per_second": self.timer.images_per_second(train_images),
                "inference_images_per_second": evaluation.inference_images_per_second if evaluation else None}


def check_placement(config: TrainConfig, progress: Progress | None) -> Placement:
    """The devices this process trains on; loud (log + progress event) when it should have a
    GPU and has none; a GPURequiredError under `require_gpu`, before any work."""
    info = devices.describe_devices()
    warnings = devices.check_placement(info, config.require_gpu)
    for warning in warnings:
        log.warning("%s: %s", config.architecture, warning)
    if progress:
        progress({"event": "placement", "architecture": config.architecture, "device": info, "warnings": warnings})
    return Placement(device={**info, "warnings": warnings, "data_parallel_devices": None}, timer=EpochTimer())


@contextlib.contextmanager
def distribution_scope(config: TrainConfig, placement: Placement) -> Iterator[None]:
    """Keras' DataParallel over this process's devices when `data_parallel` asks and the
    backend is JAX with more than one device; else nothing (one device)."""
    distribution = None
    if config.data_parallel and keras.backend.backend() == "jax":
        distribution = devices.data_parallel()
    if distribution is None:
        yield
        return
    placement.device["data_parallel_devices"] = [str(d) for d in distribution.device_mesh.devices.flatten()]
    log.info("%s: data parallel over %s", config.architecture, placement.device["data_parallel_devices"])
    with distribution.scope():
        yield
