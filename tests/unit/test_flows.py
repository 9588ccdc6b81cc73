"""The `derm` flow's wiring, without a stack: no SeaweedFS and no workers. Tasks run in
process against an in-memory bucket; whole flow runs use `prefect_test_harness`."""

from __future__ import annotations

import asyncio
import csv
import hashlib
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from dermflow import layout
from dermflow.config import DEFAULT_EPOCHS, RunConfig
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit

COLUMNS = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
           "three_partition_label", "qc", "url", "url_alphanum"]


def _csv_without_urls(path: Path, rows: int = 6) -> Path:
    """Rows in the dataset's schema whose images have no URL (so fetching needs no network)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for index in range(rows):
            writer.writerow({"md5hash": hashlib.md5(str(index).encode()).hexdigest(), "fitzpatrick_scale": 1 + index % 6,
                             "fitzpatrick_centaur": 1, "label": f"condition {index % 2}", "nine_partition_label": "x",
                             "three_partition_label": "y", "qc": "", "url": "", "url_alphanum": ""})
    return path


def test_fetch_mode_records_the_config_and_writes_the_manifest(harness, bucket, tmp_path):
    from flows.derm import derm

    result = asyncio.run(derm(mode="fetch", csv=str(_csv_without_urls(tmp_path / "rows.csv")), image_size=64))
    run_id = result["run_id"]
    stored = bucket.get_json(layout.run_params_key(run_id))
    # the local CSV was staged to the bucket: the run records (and replays from) its URI
    staged = stored["config"]["data"]["csv"]
    assert staged.startswith(f"s3://{bucket.bucket}/private/inputs/") and staged.endswith("/rows.csv")
    assert bucket.get_bytes(bucket.key_of(staged)) == (tmp_path / "rows.csv").read_bytes()
    assert RunConfig.model_validate(stored["config"]) == RunConfig.from_parameters(
        mode="fetch", csv=staged, image_size=64)
    assert stored["resolved"]["epochs"] == DEFAULT_EPOCHS and stored["resolved"]["deadline"] is None
    summary = result["fetch"]["summary"]
    assert (summary["rows"], summary["ok"]) == (6, 0) and summary["by_reason"] == {"no_url": 6}
    assert bucket.exists(layout.FETCH_MANIFEST_KEY)


def test_a_run_is_marked_in_progress_while_its_stages_run_and_unmarked_when_it_fails(harness, bucket, tmp_path,
                                                                                   monkeypatch):
    """Retention skips a run while its `layout.run_active_key` marker exists (issue 14, #12)."""
    import flows.derm as derm_module

    seen: dict[str, bool] = {}
    real_ingest_and_fetch = derm_module.ingest_and_fetch

    def ingest_and_fetch(config, run_id):
        seen[run_id] = bucket.exists(layout.run_active_key(run_id))
        return real_ingest_and_fetch(config, run_id)

    monkeypatch.setattr(derm_module, "ingest_and_fetch", ingest_and_fetch)
    with pytest.raises(derm_module.PipelineError):
        asyncio.run(derm_module.derm(mode="full", csv=str(_csv_without_urls(tmp_path / "rows.csv"))))
    [(run_id, marked)] = seen.items()
    assert marked and not bucket.exists(layout.run_active_key(run_id))
    assert bucket.exists(layout.run_params_key(run_id))


def test_full_mode_with_nothing_fetched_stops_with_what_to_do(harness, bucket, tmp_path):
    from flows.derm import PipelineError, derm

    with pytest.raises(PipelineError, match="too few to split.*derm/refetch"):
        asyncio.run(derm(mode="full", csv=str(_csv_without_urls(tmp_path / "rows.csv"))))


def test_training_parameters_resolve_epochs_and_deadline():
    from flows.derm import training_parameters

    budgeted = RunConfig.from_parameters(budget_minutes=2, weights="none", image_size=64)
    params = training_parameters(budgeted, started=1000.0)
    assert params == {"image_size": 64, "epochs": 1000, "batch_size": 32, "weights": "none", "seed": 42,
                      "deadline": 1120.0}


def test_a_weights_file_that_does_not_exist_is_refused(tmp_path):
    from flows.derm import PipelineError, training_parameters

    with pytest.raises(PipelineError, match="weights=.*missing.h5"):
        training_parameters(RunConfig.from_parameters(weights=str(tmp_path / "missing.h5")), started=0.0)


def test_retrain_reuses_unchanged_trainings_and_trains_the_rest(monkeypatch):
    import flows.derm as derm_module

    def reusable(split_hash, architecture, params):
        return {"architecture": architecture, "status": "ok", "run_id": "old", "reused": True} \
            if architecture == "vgg16" else None

    started = {}

    async def train_all(jobs, split_key, run_id, parent_id):
        started.update(jobs)
        return [{"architecture": a, "status": "ok", "run_id": run_id} for a in jobs]

    monkeypatch.setattr(derm_module, "reusable_training", reusable)
    monkeypatch.setattr(derm_module, "_train_all", train_all)
    config = RunConfig.from_parameters(mode="retrain", architectures=["baseline_cnn", "vgg16"])
    train_params = {"image_size": 256, "epochs": 30}
    with disable_run_logger():
        outcomes = asyncio.run(derm_module.train_architectures(
            config, {"hash": "h", "split_key": "k"}, "new", train_params, {"baseline_cnn": {"dropout": 0.5}}))
    assert list(started) == ["baseline_cnn"] and started["baseline_cnn"]["hyperparameters"] == {"dropout": 0.5}
    assert {o["architecture"]: o["run_id"] for o in outcomes} == {"vgg16": "old", "baseline_cnn": "new"}

    config_full = RunConfig.from_parameters(mode="full", architectures=["baseline_cnn", "vgg16"])
    started.clear()
    with disable_run_logger():
        asyncio.run(derm_module.train_architectures(config_full, {"hash": "h", "split_key": "k"}, "new",
                                                    train_params, {}))
    assert set(started) == {"baseline_cnn", "vgg16"}  # a full run never reuses


def test_a_run_where_every_architecture_failed_is_an_error():
    from flows.derm import PipelineError, finish

    failed = [{"architecture": "vgg16", "status": "failed", "error": "Crashed: out of memory"}]
    with pytest.raises(PipelineError, match="out of memory"):
        finish("run", failed, {}, None)
    result = finish("run", failed + [{"architecture": "baseline_cnn", "status": "ok"}], {"report_key": "k"}, None)
    assert result["failed"] == ["vgg16"]


def test_missing_objects_are_permanent_and_unreachable_storage_is_transient():
    from dermflow.errors import is_transient
    from dermflow.storage import StorageError
    from tasks.common import retry_unless_permanent

    store = memory_store()
    with pytest.raises(StorageError) as missing:
        store.get_bytes("nowhere")
    assert not is_transient(missing.value)
    assert is_transient(StorageError("endpoint unreachable")) and is_transient(OSError("reset"))

    class FailedState:
        def __init__(self, error):
            self.data = error

    assert retry_unless_permanent(None, None, FailedState(missing.value)) is False
    assert retry_unless_permanent(None, None, FailedState(ConnectionError("reset"))) is True
