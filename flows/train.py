"""Flow `derm-train`: one architecture per flow run, in its own process, holding a `gpu` slot:
training, the final evaluation, and the Grad-CAM maps the report overlays.

Started by `derm` through `run_deployment("derm-train/default")`, so it is a subflow in the UI
while the backend's state and GPU memory stay isolated in the worker's child process. Each
training worker is pinned to one GPU (`CUDA_VISIBLE_DEVICES`, set by `dermflow up`). The
parameters' defaults, bounds and descriptions come from `dermflow.config.TrainConfig`.
"""

from prefect import flow
from prefect.concurrency.sync import concurrency

from dermflow.config import (
    TRAIN_DEFAULTS,
    ArchitectureName,
    BatchSize,
    DataParallel,
    ImageSize,
    RequireGpu,
    Seed,
    TrainConfig,
    TrainEpochs,
    Weights,
    describe_parameters,
)
from dermflow.runs import check_run_id
from tasks.common import settings
from tasks.train import grad_cam_examples, train_architecture

T = TRAIN_DEFAULTS


@flow(name="derm-train", log_prints=True)
@describe_parameters(
    TrainConfig,
    split_key="Bucket key of the split manifest to train on.",
    run_id="The derm run this training belongs to (outputs go under its run folder).",
    hyperparameters="TrainConfig fields that override the defaults, e.g. a tuned trial's.",
    gpu_limit="Name of the global concurrency limit whose slot the training holds.",
    gpu_slots="Slots of that limit the training holds: the GPUs it trains on (more than 1 only data-parallel).",
)
def derm_train(
    architecture: ArchitectureName,
    split_key: str,
    run_id: str,
    image_size: ImageSize = T.image_size,
    epochs: TrainEpochs = T.epochs,
    batch_size: BatchSize = T.batch_size,
    weights: Weights = T.weights,
    seed: Seed = T.seed,
    hyperparameters: dict | None = None,
    deadline: float | None = T.deadline,
    require_gpu: RequireGpu = T.require_gpu,
    data_parallel: DataParallel = T.data_parallel,
    gpu_limit: str = "gpu",
    gpu_slots: int = 1,
) -> dict:
    """Train, evaluate and store one architecture's model."""
    check_run_id(run_id)  # before the slot is taken: an API caller's id becomes a local path
    config = {
        "architecture": architecture,
        "image_size": image_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "weights": weights,
        "seed": seed,
        "deadline": deadline,
        "require_gpu": require_gpu,
        "data_parallel": data_parallel,
        **(hyperparameters or {}),
    }
    # The slot is held for the whole training: at most `gpu` limit trainings run at once. Its
    # lease is renewed while this process lives; if the process is killed, the server's
    # repossessor frees the slot once the lease (DERMFLOW_GPU_LEASE_SECONDS) expires.
    with concurrency(gpu_limit, occupy=max(1, gpu_slots), lease_duration=settings().gpu_lease_seconds):
        summary = train_architecture(split_key, run_id, config)
        # The report's Grad-CAM overlays, computed here on the trainer's GPU (never in the
        # orchestrator's process): the report reads them from the bucket.
        grad_cam_examples(run_id, architecture)
        return summary
