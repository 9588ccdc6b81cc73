"""The report task with no stack: `.fn()` over an in-memory bucket. It loads each outcome from
where training left it (a reused model from its own run), and writes the report at the layout's
keys."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

import tasks.report as report_task
from dermflow import layout
from dermflow.storage import StorageError
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit

CLASS_NAMES = ["acne", "eczema", "psoriasis"]
RUN_ID = "20261202-080000-calm-heron"
OLDER_RUN_ID = "20261101-080000-old-fox"


def _predictions_npz(split: list[str], md5hash: list[str]) -> bytes:
    rng = np.random.default_rng(len(split))
    y_true = np.arange(len(split)) % len(CLASS_NAMES)
    y_prob = rng.dirichlet(np.ones(len(CLASS_NAMES)), size=len(split)).astype(np.float32)
    y_prob[np.arange(len(split)), y_true] += 1.0  # mostly right, so there is a best model
    buffer = io.BytesIO()
    np.savez_compressed(buffer, md5hash=np.array(md5hash), split=np.array(split), y_true=y_true.astype(np.int64),
                        y_prob=y_prob / y_prob.sum(axis=1, keepdims=True),
                        fitzpatrick_range=np.array(["I-II", "III-IV", "V-VI", "unknown"] * len(split))[:len(split)])
    return buffer.getvalue()


def _store_trained_model(store, run_id: str, arch: str, *, verified: bool = True) -> None:
    """What a training run leaves under `runs/<run_id>/models/<arch>/` that the report reads."""
    split = ["test"] * 9 + (["verified_test"] * 3 if verified else [])
    md5hash = [f"{arch}-{'v' if s == 'verified_test' else 't'}{i:02d}" for i, s in enumerate(split)]
    store.put_json(layout.model_key(run_id, arch, "params.json"), {"class_names": CLASS_NAMES, "image_size": 64})
    store.put_json(layout.model_key(run_id, arch, "history.json"), {"loss": [1.5, 1.0], "val_loss": [1.6, 1.2]})
    store.put_bytes(layout.model_key(run_id, arch, "predictions.npz"), _predictions_npz(split, md5hash))


@pytest.fixture()
def store(monkeypatch):
    store = memory_store()
    monkeypatch.setattr(report_task, "object_store", lambda: store)
    return store


def test_a_failed_outcome_becomes_a_failed_result_without_reading_the_bucket(store):
    result = report_task._load_arch_result(store, RUN_ID, {"architecture": "resnet50", "status": "failed",
                                                           "error": "Crashed: out of memory"})
    assert result.status == "failed" and result.error == "Crashed: out of memory"
    assert result.test is None
    unknown = report_task._load_arch_result(store, RUN_ID, {"architecture": "vgg16", "status": "failed"})
    assert unknown.error == "unknown error"


def test_an_ok_outcome_loads_params_history_and_predictions_with_verified_md5hashes(store):
    _store_trained_model(store, RUN_ID, "efficientnetb0")
    result = report_task._load_arch_result(store, RUN_ID, {"architecture": "efficientnetb0", "status": "ok",
                                                           "run_id": RUN_ID, "seconds": 42.0})
    assert result.status == "ok" and result.seconds == 42.0
    assert list(result.class_names) == CLASS_NAMES
    assert result.history == {"loss": [1.5, 1.0], "val_loss": [1.6, 1.2]}
    assert result.test.md5hash.tolist() == [f"efficientnetb0-t{i:02d}" for i in range(9)]
    assert result.test.y_prob.shape == (9, 3) and result.test.fitzpatrick_range[0] == "I-II"
    # the hand-written reader this replaced dropped these
    assert result.verified_md5hash.tolist() == [f"efficientnetb0-v{i:02d}" for i in range(9, 12)]
    assert result.verified_test.y_true.tolist() == [0, 1, 2]


def test_an_outcome_without_verified_rows_has_no_verified_test(store):
    _store_trained_model(store, RUN_ID, "mobilenetv3", verified=False)
    result = report_task._load_arch_result(store, RUN_ID, {"architecture": "mobilenetv3", "status": "ok"})
    assert result.verified_test is None and len(result.test.y_true) == 9


def test_a_reused_outcome_loads_from_the_run_that_trained_it(store):
    _store_trained_model(store, OLDER_RUN_ID, "resnet50")
    reused = {"architecture": "resnet50", "status": "ok", "run_id": OLDER_RUN_ID, "reused": True}
    result = report_task._load_arch_result(store, RUN_ID, reused)
    assert result.status == "ok" and len(result.test.y_true) == 9
    assert not any(key.startswith(layout.run_prefix(RUN_ID)) for key in store.list_keys(""))
    # the current run has nothing of that architecture: reading there would fail
    with pytest.raises(StorageError, match="no object"):
        report_task._load_arch_result(store, RUN_ID, {**reused, "run_id": RUN_ID})


def test_build_and_store_report_writes_the_page_and_metrics_at_the_layout_keys(store, monkeypatch):
    _store_trained_model(store, RUN_ID, "efficientnetb0")
    _store_trained_model(store, OLDER_RUN_ID, "resnet50", verified=False)
    artifacts: list[tuple[str, dict]] = []
    saliency_calls: list[tuple] = []
    monkeypatch.setattr(report_task, "_best_model_saliency",
                        lambda *args: saliency_calls.append(args) or None)  # no Keras model in this test
    for name in ("create_markdown_artifact", "create_table_artifact", "create_link_artifact"):
        monkeypatch.setattr(report_task, name, lambda *args, _name=name, **kwargs: artifacts.append((_name, kwargs)))
    monkeypatch.setattr(report_task, "get_run_logger", lambda: logging.getLogger("test_report_task"))
    outcomes = [
        {"architecture": "efficientnetb0", "status": "ok", "run_id": RUN_ID, "test": {"weighted_f1": 0.9}},
        {"architecture": "resnet50", "status": "ok", "run_id": OLDER_RUN_ID, "reused": True,
         "test": {"weighted_f1": 0.8}},
        {"architecture": "vgg16", "status": "failed", "error": "Crashed: <b>out of memory</b>"},
    ]

    result = report_task.build_and_store_report.fn(RUN_ID, {"epochs": 2}, {"rows": 12}, outcomes)

    assert result["report_key"] == layout.report_key(RUN_ID)
    assert result["metrics_key"] == layout.run_metrics_key(RUN_ID)
    page = store.get_bytes(layout.report_key(RUN_ID)).decode()
    assert page.startswith("<!DOCTYPE html>") and RUN_ID in page
    assert "Crashed: &lt;b&gt;out of memory&lt;/b&gt;" in page
    metrics = json.loads(store.get_bytes(layout.run_metrics_key(RUN_ID)))
    assert metrics["run_id"] == RUN_ID and metrics["best_architecture"] in {"efficientnetb0", "resnet50"}
    assert metrics["architectures"]["efficientnetb0"]["verified_test"]["n"] == 3
    assert metrics["architectures"]["resnet50"]["test"]["n"] == 9
    assert metrics["failed"] == [{"architecture": "vgg16", "reason": "Crashed: <b>out of memory</b>"}]
    assert store.exists(layout.figure_key(RUN_ID, "calibration"))
    assert saliency_calls and saliency_calls[0][1:] == (RUN_ID, outcomes)
    assert [name for name, _ in artifacts] == ["create_markdown_artifact", "create_table_artifact",
                                               "create_link_artifact"]
    assert artifacts[2][1]["description"] == store.uri(layout.report_key(RUN_ID))


def test_the_report_task_does_not_retry_permanent_errors():
    from tasks.common import retry_unless_permanent

    assert report_task.build_and_store_report.retry_condition_fn is retry_unless_permanent
