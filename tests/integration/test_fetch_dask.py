"""The fetch subflow's shards on an existing distributed engine: a local Dask cluster started
by the test, through prefect-dask's DaskTaskRunner (no scheduler of our own)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_fetch_shards_run_on_a_local_dask_cluster(store, s3_env, tmp_path, monkeypatch):
    from distributed import Client, LocalCluster
    from prefect.testing.utilities import prefect_test_harness
    from prefect_dask import DaskTaskRunner

    from dermflow.ingestion.ingest import load_dataset
    from flows.fetch import fetch_images
    from tests.support.image_servers import rewrite_csv_host, serve_atlas, synthetic_atlas

    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "127.0.0.1")  # before the workers start: they inherit it
    root = synthetic_atlas(tmp_path / "atlas", n_labels=3, per_label=8, size=64)
    with serve_atlas(root / "images", root / "rows.csv") as server, prefect_test_harness(server_startup_timeout=120):
        dataset = load_dataset(str(rewrite_csv_host(root / "rows.csv", server.base_url, tmp_path / "rows.csv")))
        store.put_dataframe_csv("manifests/datasets/dask.csv", dataset)
        with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            before = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
            result = fetch_images.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(
                "manifests/datasets/dask.csv", "20990101-000000-dask", shard_size=5)
            after = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    assert after > before  # the shards went through the Dask scheduler
    assert sum(server.hits.values()) == len(dataset)
    assert result["summary"]["ok"] == len(dataset) == 24
    assert len(store.list_keys("images/")) == 24
