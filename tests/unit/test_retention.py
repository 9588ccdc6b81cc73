"""Retention over the in-memory store (issue 14, finding 12): runs in progress are never
deleted, only runs that produced a model count toward `keep_runs`, and prefixes that are not
run ids are neither counted nor deleted."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from dermflow.layout import (
    checkpoint_key,
    checkpoint_state_key,
    fetch_work_prefix,
    model_key,
    run_params_key,
    run_prefix,
    shard_rows_key,
)
from dermflow.registry.retention import (
    ACTIVE_MARKER_MAX_AGE,
    apply_retention,
    mark_run_active,
    mark_run_finished,
)
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def run_with_model(store, run_id: str) -> None:
    store.put_json(run_params_key(run_id), {"run_id": run_id})
    store.put_bytes(model_key(run_id, "cnn"), b"stand-in model")


def run_without_model(store, run_id: str) -> None:
    """What a fetch-only (or a failed) run leaves under runs/."""
    store.put_json(run_params_key(run_id), {"run_id": run_id})


def remaining_runs(store) -> set[str]:
    return {key.split("/")[1] for key in store.list_keys("runs/")}


def test_a_run_still_training_is_never_deleted():
    store = memory_store()
    training = "20261121-100000-still-training"
    store.put_json(run_params_key(training), {"run_id": training})
    store.put_json(checkpoint_state_key(training, "cnn"), {"epoch": 2})
    store.put_bytes(checkpoint_key(training, "cnn", 1), b"ckpt")
    store.put_bytes(checkpoint_key(training, "cnn", 2), b"ckpt")
    mark_run_active(store, training, now=NOW - timedelta(hours=5))
    for run_id in ("20261122-100000-run-b", "20261123-100000-run-c", "20261124-100000-run-d"):
        run_with_model(store, run_id)

    result = apply_retention(store, keep_runs=2, keep_checkpoints=1, now=NOW)

    assert result["active_runs"] == [training] and training not in result["deleted_runs"]
    assert store.exists(run_params_key(training)) and store.exists(checkpoint_state_key(training, "cnn"))
    assert store.exists(checkpoint_key(training, "cnn", 1))  # a run in progress is not pruned either
    assert result["deleted_runs"] == ["20261122-100000-run-b"]


def test_a_finished_or_crashed_run_is_deleted_by_the_usual_rules():
    store = memory_store()
    finished, crashed = "20261120-100000-finished", "20261121-100000-crashed"
    for run_id in (finished, crashed):
        run_with_model(store, run_id)
    mark_run_active(store, finished, now=NOW - timedelta(hours=1))
    mark_run_finished(store, finished)
    mark_run_active(store, crashed, now=NOW - ACTIVE_MARKER_MAX_AGE - timedelta(minutes=1))
    store.put_json(shard_rows_key(crashed, "fetch", 0), [])  # its fetch's hand-overs, never cleaned up
    for run_id in ("20261122-100000-run-b", "20261123-100000-run-c"):
        run_with_model(store, run_id)
        store.put_json(shard_rows_key(run_id, "fetch", 0), [])  # kept runs keep theirs

    result = apply_retention(store, keep_runs=2, keep_checkpoints=1, now=NOW)

    assert result["deleted_runs"] == [finished, crashed] and result["active_runs"] == []
    assert not store.list_keys(run_prefix(crashed)) and not store.list_keys(fetch_work_prefix(crashed))
    assert store.list_keys(fetch_work_prefix("20261122-100000-run-b"))


def test_runs_without_models_do_not_use_up_the_budget():
    store = memory_store()
    run_with_model(store, "20261121-100000-model-a")
    run_with_model(store, "20261122-100000-model-b")
    run_without_model(store, "20261123-100000-fetch-c")
    run_without_model(store, "20261124-100000-fetch-d")

    result = apply_retention(store, keep_runs=2, keep_checkpoints=1, now=NOW)

    assert result["deleted_runs"] == []
    assert remaining_runs(store) == {"20261121-100000-model-a", "20261122-100000-model-b",
                                     "20261123-100000-fetch-c", "20261124-100000-fetch-d"}
    # once keep_runs runs with models are newer, a run without one goes too
    run_with_model(store, "20261125-100000-model-e")
    result = apply_retention(store, keep_runs=2, keep_checkpoints=1, now=NOW)
    assert result["deleted_runs"] == ["20261121-100000-model-a"]
    run_with_model(store, "20261126-100000-model-f")
    result = apply_retention(store, keep_runs=2, keep_checkpoints=1, now=NOW)
    assert result["deleted_runs"] == ["20261122-100000-model-b", "20261123-100000-fetch-c",
                                      "20261124-100000-fetch-d"]


def test_prefixes_that_are_not_run_ids_are_neither_counted_nor_deleted():
    store = memory_store()
    strangers = ["zz-not-a-run", "99999999-999999-X"]
    for name in strangers:
        run_with_model(store, name)  # sorts after every run id: used to count as the newest
    for run_id in ("20261121-100000-run-a", "20261122-100000-run-b", "20261123-100000-run-c"):
        run_with_model(store, run_id)

    result = apply_retention(store, keep_runs=2, keep_checkpoints=1, now=NOW)

    assert result["deleted_runs"] == ["20261121-100000-run-a"]
    assert sorted(result["ignored_prefixes"]) == sorted(strangers)
    assert remaining_runs(store) >= set(strangers) | {"20261122-100000-run-b", "20261123-100000-run-c"}
