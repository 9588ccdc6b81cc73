"""Prefect task that makes a run's local-path inputs readable from every host
(`dermflow.inputs`): the CSV and weights files always, the images only when shards run on a
Dask cluster elsewhere. What the run records and reports is then the `s3://` URI."""

from __future__ import annotations

from prefect import get_run_logger, task

from tasks.common import object_store


@task(name="stage-inputs")
def stage_run_inputs(csv: str, images: str | None, weights: str, shards_elsewhere: bool) -> dict:
    """`{"csv", "images", "weights"}`, each local path checked (an InputError naming the
    parameter if it is not on this host) and, where another host reads it, uploaded and
    replaced by its `s3://` URI."""
    from dermflow import inputs

    logger = get_run_logger()
    values = {"csv": csv, "images": images, "weights": weights}
    staged = dict(values)
    for name, value in values.items():
        if not inputs.is_local(value):
            continue
        path = inputs.check_local(name, value)
        # the images are read where the import shards run: here, unless on a Dask cluster
        if name == "images" and not shards_elsewhere:
            continue
        object_store().ensure_bucket()
        staged[name] = inputs.stage(object_store(), path)
        logger.info("%s: staged the local %s as %s for the other hosts", name, path, staged[name])
    return staged
