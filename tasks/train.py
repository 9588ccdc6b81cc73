"""Prefect task that trains one architecture (`dermflow.train.train_architecture`)."""

from __future__ import annotations

from prefect import get_run_logger, task

from tasks.common import object_store, settings


@task(name="train-architecture", retries=1, retry_delay_seconds=5)
def train_architecture(split_key: str, run_id: str, config: dict) -> dict:
    """Train, evaluate and store one model; a retry resumes from the last checkpoint."""
    from dermflow.train import TrainConfig, train_architecture as train

    logger = get_run_logger()
    train_config = TrainConfig(**config)
    logger.info("training %s on %s (run %s)", train_config.architecture, split_key, run_id)
    summary = train(object_store(), split_key, train_config, run_id, settings=settings(),
                    progress=lambda message: logger.info(message))
    logger.info("%s done: %s", train_config.architecture, summary.get("test"))
    return summary
