"""Prefect tasks of a `derm-train` flow run: train one architecture
(`dermflow.modeling.train.train_architecture`), and compute the Grad-CAM maps of its report
examples (`dermflow.evaluation.saliency_store`), both on the trainer's device."""

from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import object_store, retry_unless_permanent, settings


def _placement(event: dict, logger) -> None:
    """The devices this trainer sees, logged and written as its heartbeat for `dermflow status`;
    a trainer that should be on a GPU and is not is a warning and an artifact on the run."""
    from dermflow.modeling.devices import heartbeat_path, write_heartbeat

    device = event["device"]
    logger.info("%s trains with backend %s on %s", event["architecture"], device["backend"],
                ", ".join(device["devices"]))
    slot = os.environ.get("DERMFLOW_TRAINER_SLOT")
    if slot is not None:
        try:
            write_heartbeat(heartbeat_path(settings().data_dir, slot), device)
        except OSError as error:  # status shows less; training goes on
            logger.warning("could not write the trainer heartbeat: %s", error)
    for warning in event.get("warnings") or []:
        logger.warning("%s: %s", event["architecture"], warning)
        create_markdown_artifact(f"## Training on the CPU\n\n**{event['architecture']}**: {warning}\n",
                                 key="derm-device-warning", description="a trainer fell back to the CPU")


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
        elif event.get("event") == "placement":
            _placement(event, logger)
        elif event.get("event") == "oom_retry":
            logger.warning("%s ran out of memory at batch size %s; retrying once at %s", train_config.architecture,
                           event.get("batch_size"), event.get("retry_batch_size"))

    summary = train(object_store(), split_key, train_config, run_id, settings=settings(), progress=progress)
    logger.info("%s done: %s; throughput %s", train_config.architecture, summary.get("test"), summary.get("throughput"))
    return summary


@task(name="grad-cam-examples", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def grad_cam_examples(run_id: str, architecture: str) -> dict:
    """Grad-CAM maps of the report's example images for this model, stored beside it."""
    from dermflow.evaluation.saliency_store import compute_example_saliency

    result = compute_example_saliency(object_store(), run_id, architecture, settings().local_cache_dir / "models")
    get_run_logger().info("%s: Grad-CAM of %d report example(s) at %s", architecture, result["images"], result["key"])
    return result
