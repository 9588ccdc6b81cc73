"""derm/full end to end on the real stack: `dermflow up` (SeaweedFS, Prefect server, workers,
deployments), images served by a local HTTP server, `prefect deployment run derm/full --watch`,
then the bucket is checked for everything the run promises. Real atlas20 images when
`../shared` is there, synthetic ones otherwise."""

from __future__ import annotations

import io
import json

import pytest

from tests.integration.stack import start_stack
from tests.support.image_servers import rewrite_csv_host, serve_atlas, synthetic_atlas

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ATLAS = __import__("tests.conftest", fromlist=["ATLAS_DIR"]).ATLAS_DIR


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("stack"), gpu_slots=2)
    yield stack
    stack.dermflow("down", check=False, timeout=120)


@pytest.fixture(scope="module")
def image_source(tmp_path_factory):
    """(images dir, rows.csv) of real atlas20 images, or of a synthetic set."""
    if (ATLAS / "rows.csv").exists():
        return ATLAS / "images", ATLAS / "rows.csv"
    root = synthetic_atlas(tmp_path_factory.mktemp("synthetic"), n_labels=4, per_label=24, size=96)
    return root / "images", root / "rows.csv"


@pytest.fixture(scope="module")
def full_run(stack, image_source, tmp_path_factory):
    images, rows = image_source
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, tmp_path_factory.mktemp("csv") / "rows.csv",
                                    limit_per_label=8)
        result = stack.prefect(
            "deployment", "run", "derm/full",
            "-p", f"csv={csv_path}", "-p", "limit_per_label=8", "-p", "image_size=64", "-p", "epochs=1",
            "-p", 'architectures=["baseline_cnn"]', "--watch", timeout=900, check=False,
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    store = stack.store()
    runs = sorted({key.split("/")[1] for key in store.iter_keys("runs/")})
    assert len(runs) == 1, runs
    return {"store": store, "run_id": runs[0], "csv": csv_path, "output": result.stdout}


def test_full_run_leaves_everything_in_the_bucket(full_run):
    import pandas as pd

    store, run_id = full_run["store"], full_run["run_id"]
    rows = pd.read_csv(full_run["csv"])
    images = store.list_keys("images/")
    assert len(images) == len(rows)
    manifest = store.get_dataframe_csv("manifests/fetch.csv")
    assert len(manifest) == len(rows) and set(manifest["status"]) == {"ok"}
    assert any(key.startswith("manifests/split-") and key.endswith(".csv") for key in store.iter_keys("manifests/"))
    for name in ("report.html", "metrics.json", "params.json", "models/baseline_cnn/model.keras",
                 "models/baseline_cnn/metrics.json", "models/baseline_cnn/predictions.npz"):
        assert store.exists(f"runs/{run_id}/{name}"), name
    metrics = store.get_json(f"runs/{run_id}/metrics.json")
    test = metrics["architectures"]["baseline_cnn"]["test"]
    for key in ("accuracy", "weighted_f1", "macro_f1", "top3_accuracy"):
        assert 0.0 <= test[key] <= 1.0
    assert metrics["duplicates"]["cross_split"] == 0
    html = store.get_bytes(f"runs/{run_id}/report.html").decode()
    assert "baseline_cnn" in html and "not for clinical use" in html.lower()
    params = store.get_json(f"runs/{run_id}/params.json")
    assert params["image_size"] == 64 and params["architectures"] == ["baseline_cnn"]


def test_rerun_of_fetch_fetches_nothing(stack, full_run, image_source):
    images, rows = image_source
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, full_run["csv"].with_name("again.csv"), limit_per_label=8)
        stack.prefect("deployment", "run", "derm/fetch", "-p", f"csv={csv_path}",
                      "-p", "limit_per_label=8", "--watch", timeout=600)
        assert sum(server.hits.values()) == 0  # everything was already stored: one listing, no GETs


def test_cli_report_and_status(stack, full_run):
    status = stack.dermflow("status", "--json")
    services = json.loads(status.stdout)
    assert all(service["healthy"] for service in services)
    report = stack.dermflow("report", full_run["run_id"], "--json")
    assert "baseline_cnn" in json.loads(report.stdout)["architectures"]
