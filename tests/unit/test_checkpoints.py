"""CheckpointManager without services: keys from the layout, state.json after every epoch,
the last N and the best kept, a fresh manager resuming from the bucket's state."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit

keras = pytest.importorskip("keras")

from dermflow import layout  # noqa: E402
from dermflow.modeling.checkpoints import CheckpointManager, scalar_logs  # noqa: E402
from tests.support.memory_s3 import memory_store  # noqa: E402


def tiny_model() -> keras.Model:
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))


def test_epochs_are_recorded_under_the_layout_keys_and_pruned_to_last_and_best(tmp_path):
    store = memory_store()
    manager = CheckpointManager(store, "run1", "vgg16", tmp_path / "a", keep=1)
    model = tiny_model()
    scores = [0.2, 0.5, 0.4, 0.3]
    improved = [manager.record_epoch(model, epoch, "warmup", {"val_weighted_f1": score, "loss": 1.0, "x": "text"}, 1.0)
                for epoch, score in enumerate(scores, start=1)]
    assert improved == [True, True, False, False]
    assert manager.key_for(2) == layout.checkpoint_key("run1", "vgg16", 2)
    kept = sorted(k for k in store.list_keys(layout.checkpoint_prefix("run1", "vgg16")) if k.endswith(".keras"))
    assert kept == [layout.checkpoint_key("run1", "vgg16", 2), layout.checkpoint_key("run1", "vgg16", 4)]

    state = store.get_json(layout.checkpoint_state_key("run1", "vgg16"))
    assert state["best_epoch"] == 2 and state["best_score"] == 0.5 and state["epoch"] == 4
    assert state["checkpoints"] == kept and state["history"]["epoch"] == [1, 2, 3, 4]
    assert "x" not in state["history"]  # only numbers go into the history

    # another machine: a fresh local directory, the state and checkpoints from the bucket
    again = CheckpointManager(store, "run1", "vgg16", tmp_path / "b", keep=1)
    assert again.load() == state
    assert keras.saving.load_model(again.fetch(state["best_key"])).output_shape == (None, 2)
    assert CheckpointManager(store, "run2", "vgg16", tmp_path / "c", keep=1).load() is None


def test_scalar_logs_keeps_numbers_only():
    assert scalar_logs({"loss": 1, "lr": "0.1", "name": "x", "none": None}) == {"loss": 1.0, "lr": 0.1}
    assert scalar_logs(None) == {}
