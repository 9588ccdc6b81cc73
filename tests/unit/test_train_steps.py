"""The steps of `train_architecture` without a stack, over the in-memory store and tiny images:
the whole wiring (outputs under the layout's keys, a finished run not trained again), a deadline
before the first epoch, and resuming in the phase the checkpoint was trained in."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.unit

keras = pytest.importorskip("keras")

from dermflow import layout  # noqa: E402
from dermflow.config import TrainConfig  # noqa: E402
from dermflow.modeling import train  # noqa: E402
from dermflow.modeling.checkpoints import CheckpointManager  # noqa: E402
from dermflow.modeling.recipe import TrainingError  # noqa: E402
from dermflow.settings import load_settings  # noqa: E402
from tests.support.memory_s3 import memory_store  # noqa: E402

SPLIT_KEY = layout.split_manifest_key("unit")
SIZES = {"train": 5, "val": 2, "test": 2}


def put_split(store) -> None:
    """Three classes of tiny JPEGs (the class is the dominant colour) and their split manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for class_index, label in enumerate(("a", "b", "c")):
        for split, count in SIZES.items():
            for _ in range(count):
                pixels = rng.integers(0, 90, (20, 20, 3))
                pixels[..., class_index] += 150
                buffer = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
                md5 = hashlib.md5(buffer.getvalue()).hexdigest()
                store.put_bytes(layout.image_key(md5), buffer.getvalue())
                rows.append({"md5hash": md5, "label": label, "fitzpatrick_range": "I-II", "split": split})
    store.put_dataframe_csv(SPLIT_KEY, pd.DataFrame(rows))  # no key column: keys come from the layout


@pytest.fixture
def setup(tmp_path):
    store = memory_store()
    put_split(store)
    return store, load_settings(cache_dir=tmp_path / "cache", keep_checkpoints=1)


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"architecture": "baseline_cnn", "image_size": 32, "epochs": 2, "batch_size": 8,
                          "weights": "none", "augment": False, **overrides})


def test_train_architecture_wires_the_steps_and_writes_the_outputs(setup):
    store, settings = setup
    events = []
    summary = train.train_architecture(store, SPLIT_KEY, tiny_config(), "20260101-000000-run-a", settings, events.append)
    expected = {name: layout.model_key("20260101-000000-run-a", "baseline_cnn", file) for name, file in (
        ("model", "model.keras"), ("metrics", "metrics.json"), ("history", "history.json"),
        ("params", "params.json"), ("predictions", "predictions.npz"))}
    assert summary["keys"] == expected and all(store.exists(key) for key in expected.values())
    assert summary["status"] == "completed" and summary["epochs_run"] == 2 and summary["test"]["n"] == 6
    assert [e["event"] for e in events] == ["placement", "phase_start", "epoch_end", "epoch_end", "done"]
    params = store.get_json(expected["params"])
    assert params["split_sizes"] == {"train": 15, "val": 6, "test": 6, "verified_test": 0}
    assert params["best_epoch"] == summary["best_epoch"] and params["accelerator"] is False
    # finished: a rerun returns the recorded summary without touching the data
    store.put_dataframe_csv(SPLIT_KEY, pd.DataFrame({"md5hash": []}))
    assert train.train_architecture(store, SPLIT_KEY, tiny_config(), "20260101-000000-run-a", settings) == summary


def test_a_deadline_before_the_first_epoch_is_a_clear_error(setup):
    store, settings = setup
    config = tiny_config(deadline=time.time() - 1)
    data = train.prepare_data(store, SPLIT_KEY, config, settings)
    manager = CheckpointManager(store, "run-b", "baseline_cnn", settings.local_cache_dir / "ckpt", 1)
    start = train.build_or_resume(manager, None, config, data, "run-b")
    assert start.done_epochs == 0 and start.loaded_phase is None
    assert train.run_phases(start, manager, config, data, jit_compile=False, progress=None)[0] == "deadline"
    with pytest.raises(TrainingError, match="no epoch finished before the deadline"):
        train.evaluate_best_epoch(manager, config, data)


def test_resume_continues_in_the_phase_the_checkpoint_was_trained_in(setup):
    store, settings = setup
    config = tiny_config(epochs=3)
    data = train.prepare_data(store, SPLIT_KEY, config, settings)
    manager = CheckpointManager(store, "run-c", "baseline_cnn", settings.local_cache_dir / "ckpt", 1)
    start = train.build_or_resume(manager, None, config, data, "run-c")
    config_one_epoch = tiny_config(epochs=1)
    train.run_phases(start, manager, config_one_epoch, data, jit_compile=False, progress=None)
    # the crash came after the next phase was set up (state names it), before its first epoch
    manager.save_state(phase="finetune")
    previous = CheckpointManager(store, "run-c", "baseline_cnn", settings.local_cache_dir / "other", 1).load()
    resumed = train.build_or_resume(manager, previous, config, data, "run-c")
    assert resumed.done_epochs == 1 and resumed.loaded_phase == "full"
    assert resumed.model.output_shape == (None, 3)


def test_both_candidates_are_scored_and_the_configured_one_is_kept(setup):
    """The best validation epoch by default (what bench-quality measured better), the average
    of the annealed tail on request; the other candidate's score is recorded either way."""
    store, settings = setup
    run_id = "20260101-000000-run-avg"
    summary = train.train_architecture(store, SPLIT_KEY, tiny_config(epochs=4, model_choice="average"), run_id,
                                       settings)
    choice = summary["model_choice"]
    # epochs 3 and 4 end in the last quarter of the schedule: two epochs averaged
    assert choice["chosen"] == "average" and choice["average"]["epochs"] == 2 and choice["tta"] is True
    assert store.exists(layout.averaged_checkpoint_key(run_id, "baseline_cnn"))
    assert choice["average"]["test_weighted_f1"] == summary["test"]["weighted_f1"]
    assert choice["best_epoch"]["test_weighted_f1"] is not None  # the other candidate, for the record
    best = train.train_architecture(store, SPLIT_KEY, tiny_config(epochs=4), "20260101-000000-run-best", settings)
    assert best["model_choice"]["chosen"] == "best_epoch"
    assert best["model_choice"]["best_epoch"]["test_weighted_f1"] == best["test"]["weighted_f1"]
    assert best["model_choice"]["average"]["test_weighted_f1"] is not None
