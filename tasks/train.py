"""Prefect task that trains one architecture (`dermflow.modeling.train.train_architecture`)."""

from __future__ import annotations

from prefect import get_run_logger, task

from tasks.common import object_store, retry_unless_permanent, settings


@task(name="train-architecture", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def train_architecture(split_key: str, run_id: str, config: dict) -> dict:
    """Train, evaluate and store one model; a retry resumes from the last checkpoint."""
    from dermflow.modeling.recipe import parse_train_config
    from dermflow.modeling.train import train_architecture as train

    logger = get_run_logger()
    from dermflow.inputs import weights_on_this_host

    # `s3://` weights (a local file the derm run staged) are read from this host's cache
    if config.get("weights"):
        config = {**config, "weights": weights_on_this_host(object_store(), config["weights"],
                                                            settings().local_cache_dir)}
    train_config = parse_train_config(config)
    logger.info("training %s on %s (run %s)", train_config.architecture, split_key, run_id)

    def progress(event: dict) -> None:
        if event.get("event") == "epoch_end":
            logs = event.get("logs") or {}
            logger.info("%s epoch %s/%s (%s): loss %.4f, val weighted F1 %.4f%s",
                        train_config.architecture, event.get("epoch"), event.get("epochs"), event.get("phase"),
                        logs.get("loss", float("nan")), logs.get("val_weighted_f1", float("nan")),
                        " (best)" if event.get("improved") else "")
        elif event.get("event") == "phase_start":
            logger.info("%s: %s phase", train_config.architecture, event.get("phase"))

    summary = train(object_store(), split_key, train_config, run_id, settings=settings(), progress=progress)
    logger.info("%s done: %s", train_config.architecture, summary.get("test"))
    return summary
