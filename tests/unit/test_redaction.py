"""Credentials in URLs (userinfo, signed query parameters) never reach a run's params.json,
report.html, metrics.json, artifacts, log lines or errors; the original is kept only in a
private object when the pipeline must replay it."""

from __future__ import annotations

import json
import logging

import pytest
from prefect.logging import disable_run_logger

import tasks.data as data_tasks
import tasks.report as report_task
import tasks.runs as run_tasks
from dermflow import layout
from dermflow.ingestion.guard import redact_values
from dermflow.ingestion.ingest import DatasetError, DatasetSourceError, load_dataset
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit

RUN_ID = "20261202-090000-quiet-owl"
SIGNED = "https://alice:hunter2@data.example.org/f17k.csv?X-Amz-Signature=deadbeef42&X-Amz-Date=20261202"
SECRETS = ("hunter2", "deadbeef42")


def assert_clean(text: str) -> None:
    assert not any(secret in text for secret in SECRETS), text[:2000]


@pytest.fixture
def store(monkeypatch):
    memory = memory_store()
    for module in (run_tasks, report_task, data_tasks):
        monkeypatch.setattr(module, "object_store", lambda: memory)
    with disable_run_logger():
        yield memory


def test_redact_values_walks_dicts_and_lists():
    redacted = redact_values({"csv": SIGNED, "n": 3, "list": [SIGNED, "plain"], "note": f"from {SIGNED} ok"})
    assert_clean(json.dumps(redacted))
    assert redacted["n"] == 3 and redacted["list"][1] == "plain" and "data.example.org" in redacted["csv"]


def test_params_json_is_redacted_and_the_original_is_private(store):
    config = {"data": {"csv": SIGNED, "limit_per_label": None}, "seed": 0}
    run_tasks.record_run_config.fn(RUN_ID, config, resolved={"epochs": 2})
    assert_clean(store.get_bytes(layout.run_params_key(RUN_ID)).decode())
    private = layout.private_run_config_key(RUN_ID)
    assert private.startswith(layout.PRIVATE_PREFIX) and not private.startswith(layout.RUNS_PREFIX)
    assert store.get_json(private)["config"]["data"]["csv"] == SIGNED  # for a replay


def test_a_config_without_credentials_leaves_no_private_copy(store):
    run_tasks.record_run_config.fn(RUN_ID, {"data": {"csv": "https://example.org/a.csv"}}, resolved={})
    assert not store.exists(layout.private_run_config_key(RUN_ID))


def test_report_metrics_and_artifacts_are_redacted(store, monkeypatch):
    artifacts = []
    monkeypatch.setattr(report_task, "_best_model_saliency", lambda *args: None)
    for name in ("create_markdown_artifact", "create_table_artifact", "create_link_artifact"):
        monkeypatch.setattr(report_task, name, lambda *args, **kwargs: artifacts.append((args, kwargs)))
    monkeypatch.setattr(report_task, "get_run_logger", lambda: logging.getLogger("test_redaction"))
    outcomes = [{"architecture": "vgg16", "status": "failed", "error": f"Failed: cannot read {SIGNED}"}]
    report_task.build_and_store_report.fn(RUN_ID, {"csv": SIGNED, "epochs": 2}, {"rows": 3, "source": SIGNED},
                                          outcomes)
    assert_clean(store.get_bytes(layout.report_key(RUN_ID)).decode())
    assert_clean(store.get_bytes(layout.run_metrics_key(RUN_ID)).decode())
    assert_clean(repr(artifacts))


def test_the_ingest_log_line_is_redacted(store, tmp_path, monkeypatch, caplog):
    csv = tmp_path / "d.csv"
    csv.write_text("md5hash,fitzpatrick_scale,label,url\n" + "0" * 32 + ",2,acne,https://example.org/a.jpg\n")
    monkeypatch.setattr(data_tasks.ingest, "load_dataset", lambda *args, **kwargs: load_dataset(csv))
    monkeypatch.setattr(data_tasks, "get_run_logger", lambda: logging.getLogger("test_redaction.ingest"))
    with caplog.at_level(logging.INFO, logger="test_redaction.ingest"):
        data_tasks.ingest_dataset.fn(SIGNED, limit_per_label=None, seed=0)
    assert "data.example.org" in caplog.text
    assert_clean(caplog.text)


def test_the_dataset_rows_with_their_urls_are_a_private_object(store, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("md5hash,fitzpatrick_scale,label,url\n" + "0" * 32 + f",2,acne,{SIGNED}\n")
    result = data_tasks.ingest_dataset.fn(str(csv), limit_per_label=None, seed=0)
    assert result["dataset_key"].startswith(layout.PRIVATE_PREFIX)
    assert store.get_dataframe_csv(result["dataset_key"])["url"][0] == SIGNED  # refetch needs it as given


def test_ingest_errors_are_redacted(monkeypatch):
    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "")
    with pytest.raises(DatasetError) as invalid:
        raise DatasetError(["column label: empty"], SIGNED)
    assert_clean(str(invalid.value))
    with pytest.raises(DatasetSourceError) as unreadable:
        load_dataset(SIGNED.replace("https://", "ftp://"))
    assert_clean(str(unreadable.value))
