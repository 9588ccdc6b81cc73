"""The training and tuning tasks without a stack: `.fn()` over the in-memory store, with the core
call replaced where it would train.

Covered: the train task validates its config dict into a `TrainConfig` (a bad key is a permanent
error that is not retried), logs its progress events and hands the store and settings on; the
tune tasks pass their options through, build the spec payload the chief and workers share, and
publish the trial table."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pandas as pd
import pytest
from prefect.states import Failed

pytestmark = pytest.mark.unit

pytest.importorskip("keras")

import tasks.train as train_tasks  # noqa: E402
import tasks.tune as tune_tasks  # noqa: E402
from dermflow.config import TrainConfig  # noqa: E402
from dermflow.modeling import train as train_lib  # noqa: E402
from dermflow.modeling import tuning  # noqa: E402
from dermflow.modeling.recipe import TrainingError  # noqa: E402
from dermflow.settings import load_settings  # noqa: E402
from tasks.common import retry_unless_permanent  # noqa: E402
from tests.support.memory_s3 import memory_store  # noqa: E402

LOGGER = "tests.modeling_tasks"


@pytest.fixture
def store(monkeypatch, tmp_path):
    """The tasks' object store and settings: in memory and under tmp_path; the run logger a
    plain logger that caplog sees."""
    store = memory_store()
    settings = load_settings(cache_dir=tmp_path / "cache")
    for module in (train_tasks, tune_tasks):
        monkeypatch.setattr(module, "object_store", lambda: store)
        monkeypatch.setattr(module, "settings", lambda: settings)
        monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger(LOGGER), raising=False)
    return store


def test_train_task_validates_its_config_and_logs_progress(store, monkeypatch, caplog):
    calls = []

    def fake_train(store_, split_key, config, run_id, settings=None, progress=None):
        calls.append((store_, split_key, config, run_id, settings))
        progress({"event": "phase_start", "phase": "warmup"})
        progress({"event": "epoch_end", "epoch": 1, "epochs": 2, "phase": "warmup", "improved": True,
                  "logs": {"loss": 1.25, "val_weighted_f1": 0.5}})
        progress({"event": "done"})
        return {"architecture": config.architecture, "test": {"weighted_f1": 0.5}}

    monkeypatch.setattr(train_lib, "train_architecture", fake_train)
    caplog.set_level(logging.INFO, logger=LOGGER)
    summary = train_tasks.train_architecture.fn("split.csv", "run-1", {"architecture": "vgg16", "epochs": 2})

    assert summary == {"architecture": "vgg16", "test": {"weighted_f1": 0.5}}
    (used_store, split_key, config, run_id, settings), = calls
    assert used_store is store and (split_key, run_id) == ("split.csv", "run-1")
    assert config == TrainConfig(architecture="vgg16", epochs=2)  # defaults filled from the config
    assert settings.local_cache_dir.name == "cache"
    messages = [record.getMessage() for record in caplog.records if record.name == LOGGER]
    assert "vgg16: warmup phase" in messages
    assert "vgg16 epoch 1/2 (warmup): loss 1.2500, val weighted F1 0.5000 (best)" in messages
    assert messages[0] == "training vgg16 on split.csv (run run-1)"


def test_train_task_refuses_a_bad_config_permanently(store, monkeypatch):
    monkeypatch.setattr(train_lib, "train_architecture", lambda *a, **k: pytest.fail("must not train"))
    with pytest.raises(TrainingError, match="(?s)bad training config: .*epoch\n  Extra inputs") as caught:
        train_tasks.train_architecture.fn("split.csv", "run-1", {"architecture": "vgg16", "epoch": 2})
    with pytest.raises(TrainingError, match="image_size"):
        train_tasks.train_architecture.fn("split.csv", "run-1", {"image_size": 8})
    task = train_tasks.train_architecture
    assert task.retries == 1 and task.retry_condition_fn is retry_unless_permanent
    # what Prefect asks before a retry: a permanent error is not retried, a network blip is
    assert retry_unless_permanent(task, None, Failed(data=caught.value)) is False
    assert retry_unless_permanent(task, None, Failed(data=ConnectionError("reset"))) is True


def test_tune_search_task_passes_its_options_through(store, monkeypatch):
    seen = {}

    def fake_tune(store_, split_key, architecture, *, settings, **options):
        seen.update(store=store_, split_key=split_key, architecture=architecture, options=options)
        return {"tuning_id": "t1", "trials": [], "best": None}

    @contextlib.asynccontextmanager
    async def no_slot(name, occupy, **options):  # options: lease_duration
        seen["slot"] = (name, occupy)
        yield

    monkeypatch.setattr(tuning, "tune_architecture", fake_tune)
    monkeypatch.setattr(tune_tasks, "concurrency", no_slot)
    options = {"tuner": "random", "max_trials": 2, "image_size": 64}
    result = asyncio.run(tune_tasks.search_in_process.fn("split.csv", "baseline_cnn", options, "gpu"))
    assert result == {"tuning_id": "t1", "trials": [], "best": None}
    assert seen["store"] is store and seen["options"] == options and seen["slot"] == ("gpu", 1)
    task = tune_tasks.search_in_process
    assert task.retries == 1 and task.retry_condition_fn is retry_unless_permanent


def test_tune_spec_task_builds_the_payload_workers_share(store):
    frame = pd.DataFrame({"md5hash": [str(i) for i in range(6)], "label": ["a", "b", "c"] * 2,
                          "split": ["train"] * 3 + ["val"] * 3})
    store.put_dataframe_csv("split.csv", frame)
    payload = asyncio.run(tune_tasks.search_spec.fn(
        "split.csv", "baseline_cnn", {"tuner": "bayesian", "max_trials": 3, "epochs": 12, "image_size": 64,
                                      "weights": "none", "tuning_id": "t-1"}))
    assert payload["split_key"] == "split.csv"
    spec = tuning.SearchSpec.from_dict(payload["spec"])  # what the chief and the workers read
    assert (spec.num_classes, spec.tuner, spec.max_trials, spec.image_size) == (3, "bayesian", 3, 64)
    assert spec.trial_epochs == tuning.default_trial_epochs(12) and spec.tuning_id == "t-1"
    assert spec.project_dir.parent.parent.name == "cache"  # the local cache, not a bucket key


def test_trial_table_artifact_has_one_row_per_trial_and_every_column(monkeypatch):
    published = {}

    async def fake_artifact(table, key, description):
        published.update(table=table, key=key, description=description)
        return "artifact-1"

    monkeypatch.setattr(tune_tasks, "acreate_table_artifact", fake_artifact)
    trials = [
        {"architecture": "baseline_cnn", "trial_id": "0", "status": "COMPLETED", "score": 0.51234,
         "hyperparameters": {"learning_rate": 0.001, "arch_options": {"depth": 4}}},
        {"architecture": "vgg16", "trial_id": "0", "status": "FAILED", "score": None,
         "hyperparameters": {"learning_rate": 0.01, "fine_tune_blocks": 2}},
    ]
    assert asyncio.run(tune_tasks.publish_trial_table.fn("20260101_Run", trials)) == "artifact-1"
    assert published["key"] == "tuning-20260101-run"  # artifact keys: lowercase, no underscores
    assert published["table"] == [
        {"architecture": "baseline_cnn", "trial": "0", "status": "COMPLETED", "cut_off": False, "default": False,
         "chosen": False, "val_weighted_f1": 0.5123, "learning_rate": 0.001, "arch_options.depth": 4,
         "fine_tune_blocks": None},
        {"architecture": "vgg16", "trial": "0", "status": "FAILED", "cut_off": False, "default": False,
         "chosen": False, "val_weighted_f1": None, "learning_rate": 0.01, "arch_options.depth": None,
         "fine_tune_blocks": 2},
    ]
    assert asyncio.run(tune_tasks.publish_trial_table.fn("r", [])) is None
