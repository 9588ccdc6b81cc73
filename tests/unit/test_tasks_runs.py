"""The run tasks without a stack: `.fn()` over the in-memory S3 store."""

from __future__ import annotations

import pytest
from prefect.logging import disable_run_logger

import tasks.runs as run_tasks
from dermflow.layout import checkpoint_state_key, model_key, run_params_key
from tasks.runs import data_summary, record_params, training_outcome
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit

RUN_ID = "20261126-100000-calm-fox"


@pytest.fixture
def store(monkeypatch):
    store = memory_store()
    monkeypatch.setattr(run_tasks, "object_store", lambda: store)
    with disable_run_logger():
        yield store


def test_record_params_writes_the_runs_params(store):
    uri = record_params.fn(RUN_ID, {"image_size": 64, "epochs": 2})
    assert store.get_json(run_params_key(RUN_ID)) == {"image_size": 64, "epochs": 2}
    assert uri.endswith(run_params_key(RUN_ID))


def test_a_completed_training_reports_its_test_scores_and_time(store):
    store.put_json(model_key(RUN_ID, "cnn", "metrics.json"),
                   {"test": {"weighted_f1": 0.4}, "verified_test": {"weighted_f1": 0.5}})
    store.put_json(checkpoint_state_key(RUN_ID, "cnn"), {"summary": {"seconds": 12.5}})
    outcome = training_outcome.fn(RUN_ID, "cnn", "Completed", None, True)
    assert outcome == {"architecture": "cnn", "status": "ok", "run_id": RUN_ID, "test": {"weighted_f1": 0.4},
                       "verified_test": {"weighted_f1": 0.5}, "model_key": model_key(RUN_ID, "cnn"),
                       "seconds": 12.5}


def test_a_failed_or_incomplete_training_reports_why(store):
    failed = training_outcome.fn(RUN_ID, "cnn", "Failed", "out of memory", False)
    assert failed == {"architecture": "cnn", "status": "failed", "error": "Failed: out of memory"}
    # completed, but it left no metrics: not a usable model
    assert training_outcome.fn(RUN_ID, "vgg16", "Completed", None, True)["status"] == "failed"


def test_data_summary_merges_the_stages():
    summary = data_summary({"rows": 10, "labels": 3}, {"summary": {"ok": 9}, "manifest_key": "m"},
                           {"split_key": "s", "reused": True, "summary": {"train": 6, "test": 2}})
    assert summary == {"rows": 10, "labels": 3, "fetch": {"ok": 9}, "fetch_manifest": "m", "split_key": "s",
                       "split_reused": True, "train": 6, "test": 2}
    assert data_summary(None, {}, {})["rows"] is None
