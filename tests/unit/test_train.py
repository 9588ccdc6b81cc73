"""The training recipe's parts: class-weighted loss, the validation weighted-F1 callback, the
time budget, configuration and the checks on a split before training."""

from __future__ import annotations

import time
from typing import get_args

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

pytestmark = pytest.mark.unit

keras = pytest.importorskip("keras")

import dermflow.config  # noqa: E402
from dermflow.errors import DermflowError, is_transient  # noqa: E402
from dermflow.dataset import arrays as data  # noqa: E402
from dermflow.config import TrainConfig  # noqa: E402
from dermflow.modeling import callbacks, recipe  # noqa: E402


def tiny_classifier(num_classes: int = 3, size: int = 4) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(keras.layers.Rescaling(1 / 255)(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="categorical_crossentropy", run_eagerly=True)
    return model


def imbalanced_arrays(tmp_path, size: int = 4) -> data.SplitArrays:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 9 + [1] * 3 + [2] * 1)
    images = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8, shape=(len(labels), size, size, 3))
    images[:] = rng.integers(0, 255, images.shape)
    return data.SplitArrays(
        images=images, labels=labels, md5hash=np.array([str(i) for i in range(len(labels))]),
        split=np.array(["train"] * len(labels)), fitzpatrick_range=np.array(["I-II"] * len(labels)),
        class_names=["a", "b", "c"], image_size=size, array_path=tmp_path / "a.npy", digest="x",
    )


def test_class_weights_reweight_the_loss_toward_rare_classes(tmp_path):
    arrays = imbalanced_arrays(tmp_path)
    model = tiny_classifier()
    indices = np.arange(len(arrays.labels))
    weights = data.class_weights_from_labels(arrays.labels, 3)
    probs = model.predict(arrays.images[:].astype("float32"), verbose=0)
    per_example = -np.log(probs[indices, arrays.labels])

    plain = model.evaluate(data.make_dataset(arrays, indices, 13, shuffle=False), verbose=0)
    weighted = model.evaluate(data.make_dataset(arrays, indices, 13, shuffle=False, class_weights=weights), verbose=0)
    plain = plain[0] if isinstance(plain, list) else plain
    weighted = weighted[0] if isinstance(weighted, list) else weighted
    assert plain == pytest.approx(per_example.mean(), rel=1e-4)
    assert weighted == pytest.approx(np.mean(weights[arrays.labels] * per_example), rel=1e-4)
    # each class contributes equally to the weighted loss: the rare one by weight 13/3
    assert weights[2] == pytest.approx(13 / 3) and weights[0] == pytest.approx(13 / 27)


def test_val_weighted_f1_callback_equals_sklearn_on_the_same_predictions():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, (40, 4, 4, 3)).astype("float32")
    y = rng.integers(0, 3, 40)
    model = tiny_classifier()
    callback = callbacks.ValWeightedF1(x, y, batch_size=16)
    callback.set_model(model)
    logs: dict = {}
    callback.on_epoch_end(0, logs)
    predicted = model.predict(x, verbose=0)
    assert logs["val_weighted_f1"] == pytest.approx(f1_score(y, predicted.argmax(1), average="weighted"))
    assert logs["val_accuracy"] == pytest.approx(np.mean(predicted.argmax(1) == y))
    assert logs["val_loss"] == pytest.approx(-np.mean(np.log(predicted[np.arange(40), y])), rel=1e-4)


def test_val_weighted_f1_reaches_the_fit_logs_for_later_callbacks():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (12, 4, 4, 3)).astype("float32")
    y = rng.integers(0, 3, 12)
    seen = []
    reader = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs["val_weighted_f1"]))
    model = tiny_classifier()
    model.fit(x, keras.utils.to_categorical(y, 3), epochs=2, verbose=0,
              callbacks=[callbacks.ValWeightedF1(x, y), reader])
    assert len(seen) == 2 and all(0.0 <= s <= 1.0 for s in seen)


def test_time_budget_stops_training_at_the_deadline():
    x = np.zeros((64, 4, 4, 3), "float32")
    y = keras.utils.to_categorical(np.arange(64) % 3, 3)
    model = tiny_classifier()
    budget = callbacks.TimeBudget(time.time() - 1)
    history = model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[budget])
    assert budget.stopped and len(history.epoch) == 1
    unlimited = callbacks.TimeBudget(None)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[unlimited])
    assert not unlimited.stopped and len(history.epoch) == 2


def test_phases_of_pretrained_and_scratch_models():
    config = TrainConfig(architecture="resnet50v2", epochs=5, warmup_epochs=2)
    assert recipe.phases_for(config, pretrained=True) == [("warmup", 0, 2), ("finetune", 2, 5)]
    assert recipe.training_phases(config) == recipe.phases_for(config, pretrained=True)
    assert recipe.phases_for(config, pretrained=False) == [("full", 0, 5)]
    short = TrainConfig(architecture="resnet50v2", epochs=1, warmup_epochs=3)
    assert recipe.phases_for(short, pretrained=True) == [("warmup", 0, 1)]


def test_config_round_trips_and_rejects_unknown_values():
    config = TrainConfig(architecture="vgg16", epochs=3, deadline=123.0, arch_options={})
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert recipe.TrainConfig is dermflow.config.TrainConfig  # one declaration
    with pytest.raises(ValueError, match="epoch\n  Extra inputs are not permitted"):
        TrainConfig.from_dict({"architecture": "vgg16", "epoch": 3})
    with pytest.raises(ValueError, match="architecture\n  Input should be 'baseline_cnn'"):
        TrainConfig(architecture="alexnet")
    with pytest.raises(ValueError, match="optimizer\n  Input should be 'adam'"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(recipe.TrainingError, match="(?s)bad training config: .*epoch\n  Extra inputs") as caught:
        recipe.parse_train_config({"architecture": "vgg16", "epoch": 3})
    assert isinstance(caught.value, DermflowError) and not is_transient(caught.value)
    assert recipe.parse_train_config({"architecture": "vgg16"}).architecture == "vgg16"


def test_optimizers_and_schedules_cover_the_config_names():
    assert set(recipe.OPTIMIZERS) == set(get_args(dermflow.config.OptimizerName))
    assert set(recipe.LR_SCHEDULES) == set(get_args(dermflow.config.LRScheduleName))
    for name in recipe.OPTIMIZERS:
        config = TrainConfig(optimizer=name)
        assert isinstance(recipe.OPTIMIZERS[name](1e-3, config), keras.optimizers.Optimizer)


def test_training_data_checks_name_the_problem():
    frame = pd.DataFrame({
        "md5hash": [str(i) for i in range(6)], "label": ["a", "a", "b", "b", "c", "a"],
        "split": ["train", "train", "train", "val", "test", "val"],
    })
    with pytest.raises(recipe.TrainingError, match="class\\(es\\) missing from the training split: 'c' \\(found in test\\)"):
        recipe.check_training_data(frame, min_train_images=2)
    with pytest.raises(recipe.TrainingError, match="training split has 3 images; at least 10"):
        recipe.check_training_data(frame, min_train_images=10)
    frame.loc[4, "label"] = "a"
    assert recipe.check_training_data(frame, min_train_images=2) == ["a", "b"]
    with pytest.raises(recipe.TrainingError, match="no 'val' rows"):
        recipe.check_training_data(frame[frame["split"] != "val"], min_train_images=2)


def test_compile_asks_for_xla_only_where_every_layer_supports_it():
    from dermflow.modeling import models

    model = models.create_model("baseline_cnn", 3, 32)
    config = TrainConfig()
    recipe.compile_model(model, config, 1e-3, jit_compile=True)
    translation = model.get_layer("augmentation").layers[2]
    assert isinstance(translation, models.RandomTranslation)
    # TensorFlow's image-transform kernel has no XLA lowering; under JAX the layer jits
    assert translation.supports_jit == (keras.backend.backend() != "tensorflow")
    assert model.jit_compile == translation.supports_jit
    plain = models.create_model("baseline_cnn", 3, 32, augment=False)
    recipe.compile_model(plain, config, 1e-3, jit_compile=True)
    assert plain.jit_compile is True


def test_cosine_schedule_warms_up_then_anneals_to_the_floor():
    schedule = callbacks.CosineSchedule(1e-2, 0, 10, warmup_fraction=0.1, floor_fraction=1e-3)
    assert schedule.rate_at(0.0) == pytest.approx(1e-5)  # the floor, not zero
    assert schedule.rate_at(0.05) == pytest.approx(0.5e-2 * 0.5 * (1 + np.cos(np.pi * 0.05)))
    assert schedule.rate_at(0.1) == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 0.1)))
    assert schedule.rate_at(0.5) == pytest.approx(0.5e-2)
    assert schedule.rate_at(1.0) == pytest.approx(1e-5) and schedule.rate_at(3.0) == pytest.approx(1e-5)
    rates = [schedule.rate_at(p) for p in np.linspace(0.1, 1.0, 20)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_cosine_schedule_follows_epochs_or_the_deadline_whichever_is_further():
    by_epochs = callbacks.CosineSchedule(1e-3, 2, 6)
    by_epochs._steps = 10
    by_epochs.on_epoch_begin(4)
    assert by_epochs.progress(5) == pytest.approx((2 + 0.5) / 4)
    assert not by_epochs.annealed()  # early stopping waits for the schedule's end
    by_epochs.on_epoch_end(5)  # the last epoch (index 5 of 2..6) finished: at the floor
    assert by_epochs.annealed()
    by_time = callbacks.CosineSchedule(1e-3, 0, 100, deadline=time.time() + 10)
    by_time._started = time.time() - 10  # the phase started 10 s ago; 10 s are left
    assert by_time.progress(0) == pytest.approx(0.5, abs=0.01)


def test_cosine_schedule_sets_the_optimizer_rate_during_fit():
    x = np.zeros((32, 4, 4, 3), "float32")
    y = keras.utils.to_categorical(np.arange(32) % 3, 3)
    model = tiny_classifier()
    seen = []
    reader = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    )
    config = TrainConfig(learning_rate=1e-2, lr_warmup_fraction=0.25)
    schedule = callbacks.schedule_callbacks(config, "full", 0, 2, deadline=None)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[*schedule, reader])
    assert len(seen) == 8
    assert seen[0] < seen[2] and seen[2] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 0.25)), rel=1e-5)
    assert seen[-1] < 1e-3 and seen == sorted(seen[:2]) + sorted(seen[2:], reverse=True)
    assert callbacks.schedule_callbacks(TrainConfig(lr_schedule="constant"), "full", 0, 2, None) == []
    finetune = callbacks.schedule_callbacks(TrainConfig(fine_tune_learning_rate=3e-5), "finetune", 3, 9, None)
    assert finetune[0].base_rate == 3e-5
    with pytest.raises(ValueError, match="lr_schedule\n  Input should be 'cosine'"):
        TrainConfig(lr_schedule="step")


class NoisyValidation(keras.callbacks.Callback):
    """Fills `val_weighted_f1` like ValWeightedF1 would on a tiny, noisy validation split: an
    early spike, then nothing better (issue 17: 0.222, 0.296, 0.089, 0.029, ...)."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_weighted_f1"] = 0.9 if epoch == 1 else 0.1 + 0.05 * (epoch % 3)


class FakeClock(keras.callbacks.Callback):
    """The callbacks' clock: one second per epoch (a real clock would make the test depend on
    how busy the machine is)."""

    def __init__(self):
        super().__init__()
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    def on_epoch_begin(self, epoch, logs=None):
        self.now += 0.5

    def on_epoch_end(self, epoch, logs=None):
        self.now += 0.5


def fit_noisy(schedule, patience: int, clock: FakeClock, deadline: float):
    x = np.zeros((8, 4, 4, 3), "float32")
    y = keras.utils.to_categorical(np.arange(8) % 3, 3)
    model = tiny_classifier()
    rates = []
    reader = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))))
    stop = callbacks.AnnealedEarlyStopping(patience, schedule[0] if schedule else None)
    budget = callbacks.TimeBudget(deadline)
    model.fit(x, y, epochs=1_000, batch_size=8, verbose=0,
              callbacks=[clock, *schedule, NoisyValidation(), stop, reader, budget])
    return stop, budget, rates


def test_budgeted_training_with_noisy_validation_runs_until_the_schedule_has_annealed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(callbacks, "time", clock)
    config = TrainConfig(learning_rate=1e-2, patience=2)
    deadline = clock.now + 20  # 20 epochs of one (fake) second
    schedule = callbacks.schedule_callbacks(config, "full", 0, 1_000, deadline=deadline)
    stop, budget, rates = fit_noisy(schedule, config.patience, clock, deadline)
    # Patience ran out at epoch 4, but early stopping waited: training went on until the
    # deadline, with the rate annealed to (near) its floor in the last epoch.
    assert budget.stopped and len(rates) == 20 and clock.now == deadline
    assert max(rates) > 0.5e-2 and rates[-1] < 0.02 * 1e-2


def test_a_constant_rate_has_nothing_to_wait_for_so_patience_stops_it(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(callbacks, "time", clock)
    stop, budget, rates = fit_noisy([], 2, clock, deadline=clock.now + 20)
    assert stop.stopped and not budget.stopped and len(rates) == 4


def test_tail_average_is_the_mean_of_the_annealed_epochs_weights():
    model = tiny_classifier()
    schedule = callbacks.CosineSchedule(1e-3, 0, 4)
    tail = callbacks.TailAverage(schedule, start_progress=0.5)
    tail.set_model(model)
    for epoch in range(4):
        model.set_weights([np.full_like(w, epoch) for w in model.get_weights()])
        schedule.on_epoch_end(epoch)  # progress (epoch + 1) / 4
        tail.on_epoch_end(epoch)
    # epochs 1, 2, 3 end at progress >= 0.5
    assert tail.count == 3
    assert all(np.allclose(w, 2.0) for w in tail.averaged_weights())
    assert callbacks.TailAverage(None).in_tail() is False
