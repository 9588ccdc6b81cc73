"""The fetch subflow's shards in Prefect's process pool (`task_runner=processes`, what `auto`
takes for long fetches on several cores): spawned workers that read their settings from the
environment and put into the same S3."""

from __future__ import annotations

import resource

import pytest

from dermflow import layout

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _children_cpu_s() -> float:
    """CPU of this process's ended and waited-for children: the pool's workers, once they exit."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_fetch_shards_run_in_prefects_process_pool(store, s3_env, tmp_path, monkeypatch):
    from prefect.task_runners import ProcessPoolTaskRunner
    from prefect.testing.utilities import prefect_test_harness

    from dermflow.ingestion.ingest import load_dataset
    from flows.fetch import fetch_images, fetch_runner
    from tests.support.image_servers import rewrite_csv_host, serve_atlas, synthetic_atlas

    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "127.0.0.1")  # before the workers start: they inherit it
    runner, parallel = fetch_runner("processes", None, shards=5, rows=24)
    assert isinstance(runner, ProcessPoolTaskRunner)
    root = synthetic_atlas(tmp_path / "atlas", n_labels=3, per_label=8, size=64)
    with serve_atlas(root / "images", root / "rows.csv") as server, prefect_test_harness(server_startup_timeout=120):
        dataset = load_dataset(str(rewrite_csv_host(root / "rows.csv", server.base_url, tmp_path / "rows.csv")))
        store.put_dataframe_csv("manifests/datasets/pool.csv", dataset)
        children_before = _children_cpu_s()
        result = fetch_images.with_options(task_runner=runner)(
            "manifests/datasets/pool.csv", "20990101-000000-pool", shard_size=5, shard_parallelism=parallel)
        workers_cpu = _children_cpu_s() - children_before
    # spawned workers import Prefect, NumPy, Pillow and boto3: seconds of CPU, in other processes
    assert workers_cpu > 0.5
    assert sum(server.hits.values()) == len(dataset)
    assert result["summary"]["ok"] == len(dataset) == 24
    assert len(store.list_keys("images/")) == 24
    assert store.list_keys(layout.fetch_work_prefix("20990101-000000-pool")) == []  # the shards' hand-overs


def test_import_shards_run_in_prefects_process_pool(store, s3_env, tmp_path, monkeypatch):
    import zipfile

    import pandas as pd
    from prefect.testing.utilities import prefect_test_harness

    from dermflow.ingestion.ingest import load_dataset
    from flows.fetch import fetch_images, fetch_runner
    from tests.support.image_servers import synthetic_atlas

    root = synthetic_atlas(tmp_path / "atlas", n_labels=3, per_label=8, size=64)
    rows = pd.read_csv(root / "rows.csv", dtype=str, keep_default_na=False).assign(url="")  # no URLs
    rows.to_csv(tmp_path / "rows.csv", index=False)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted((root / "images").glob("*.jpg")):
            handle.write(path, f"images/{path.name}")
    runner, parallel = fetch_runner("processes", None, shards=5, rows=24, importing=True)
    with prefect_test_harness(server_startup_timeout=120):
        dataset = load_dataset(str(tmp_path / "rows.csv"))
        store.put_dataframe_csv("manifests/datasets/pool-import.csv", dataset)
        children_before = _children_cpu_s()
        result = fetch_images.with_options(task_runner=runner)(
            "manifests/datasets/pool-import.csv", "20990101-000000-pooli", shard_size=5,
            shard_parallelism=parallel, images=str(archive))
        workers_cpu = _children_cpu_s() - children_before
    assert workers_cpu > 0.5  # the import shards ran in spawned workers
    assert result["summary"]["by_source"] == {"archive": 24}
    assert {key.rsplit("/", 1)[1].split(".")[0] for key in store.list_keys("images/")} == set(rows["md5hash"])
