"""Flow `derm-train`: one architecture per flow run, in its own process, holding a `gpu` slot.

Started by `derm` through `run_deployment("derm-train/default")`, so it is a subflow in the UI
while TensorFlow state and GPU memory stay isolated in the worker's child process. Each
training worker is pinned to one GPU (`CUDA_VISIBLE_DEVICES`, set by `dermflow up`).
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.concurrency.sync import concurrency
from pydantic import Field

from dermflow.params import ArchitectureName
from tasks.train import train_architecture


@flow(name="derm-train", log_prints=True)
def derm_train(
    architecture: ArchitectureName,
    split_key: str,
    run_id: str,
    image_size: Annotated[int, Field(ge=32, le=1024)] = 256,
    epochs: Annotated[int, Field(ge=1, le=1000)] = 30,
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 32,
    weights: str = "imagenet",
    seed: int = 42,
    hyperparameters: dict | None = None,
    deadline: float | None = None,
    gpu_limit: str = "gpu",
) -> dict:
    config = {
        "architecture": architecture,
        "image_size": image_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "weights": weights,
        "seed": seed,
        "deadline": deadline,
        **(hyperparameters or {}),
    }
    # The slot is held for the whole training: at most `gpu` limit trainings run at once.
    with concurrency(gpu_limit, occupy=1):
        return train_architecture(split_key, run_id, config)
