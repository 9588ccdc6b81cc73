"""train_architecture end to end on a real SeaweedFS bucket with tiny synthetic images:
outputs, resume after SIGKILL, clear errors for untrainable splits."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

CLASSES = ("acne", "eczema", "psoriasis")
RANGES = ("I-II", "III-IV", "V-VI", "unknown")


def synthetic_image(class_index: int, rng: np.random.Generator) -> bytes:
    """A small JPEG whose dominant colour channel is its class (learnable in an epoch or two)."""
    from PIL import Image

    pixels = rng.integers(0, 90, size=(24, 30, 3))
    pixels[..., class_index % 3] += 150
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_split(store, per_class: dict[str, int], seed: int = 0, key: str = "manifests/split-test.csv") -> str:
    """Images under images/<md5> and a split manifest with the DESIGN.md columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for class_index, label in enumerate(CLASSES):
        for split, count in per_class.items():
            for _ in range(count):
                data = synthetic_image(class_index, rng)
                md5 = hashlib.md5(data).hexdigest()
                store.put_bytes(f"images/{md5}", data)
                rows.append({
                    "md5hash": md5, "label": label, "fitzpatrick_scale": "3",
                    "fitzpatrick_range": RANGES[len(rows) % 4], "qc": "", "split": split,
                    "dup_group": str(len(rows)), "key": f"images/{md5}",
                })
    store.put_dataframe_csv(key, pd.DataFrame(rows))
    return key


@pytest.fixture
def settings(store, tmp_path):
    from dermflow.settings import load_settings

    return load_settings(cache_dir=tmp_path / "cache", keep_checkpoints=2)


def test_train_architecture_writes_model_metrics_and_predictions(store, settings):
    import keras

    from dermflow.modeling.train import TrainConfig, train_architecture

    split_key = write_split(store, {"train": 8, "val": 3, "test": 3, "verified_test": 2, "excluded": 1})
    events = []
    config = TrainConfig(architecture="baseline_cnn", image_size=32, epochs=2, batch_size=8, weights="none", patience=5)
    summary = train_architecture(store, split_key, config, "20261126-101500-tiny-otter", settings, events.append)

    prefix = "runs/20261126-101500-tiny-otter/models/baseline_cnn/"
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    assert summary["keys"]["model"] == prefix + "model.keras"
    assert json.loads(json.dumps(summary)) == summary  # JSON-able
    assert [e["epoch"] for e in events if e["event"] == "epoch_end"] == [1, 2]

    metrics = store.get_json(prefix + "metrics.json")
    assert metrics["test"]["n"] == 9 and metrics["verified_test"]["n"] == 6
    assert set(metrics["test"]["per_range"]) <= set(RANGES)
    params = store.get_json(prefix + "params.json")
    assert params["class_names"] == list(CLASSES) and params["image_size"] == 32
    assert params["split_sizes"] == {"train": 24, "val": 9, "test": 9, "verified_test": 6}
    history = store.get_json(prefix + "history.json")
    assert history["epoch"] == [1, 2] and len(history["val_weighted_f1"]) == 2

    local = settings.local_cache_dir / "check"
    store.download_file(prefix + "predictions.npz", local / "p.npz")
    predictions = np.load(local / "p.npz")
    assert sorted(predictions.files) == ["fitzpatrick_range", "md5hash", "split", "y_prob", "y_true"]
    assert predictions["y_prob"].shape == (15, 3) and predictions["y_prob"].dtype == np.float32
    assert np.allclose(predictions["y_prob"].sum(axis=1), 1, atol=1e-4)
    assert sorted(set(predictions["split"])) == ["test", "verified_test"]

    store.download_file(prefix + "model.keras", local / "model.keras")
    model = keras.saving.load_model(local / "model.keras")
    test_rows = predictions["split"] == "test"
    assert model.output_shape == (None, 3)
    # the saved model is the best epoch's; the metrics file agrees with its predictions
    from dermflow.metrics import classification_metrics

    again = classification_metrics(predictions["y_true"][test_rows], predictions["y_prob"][test_rows], list(CLASSES))
    assert again["weighted_f1"] == pytest.approx(metrics["test"]["weighted_f1"])

    # a rerun of a finished run returns its summary without training again
    assert train_architecture(store, split_key, config, "20261126-101500-tiny-otter", settings) == summary


@pytest.mark.slow
def test_pretrained_architecture_warms_up_then_fine_tunes(store, settings):
    from dermflow.modeling.train import TrainConfig, train_architecture

    split_key = write_split(store, {"train": 4, "val": 2, "test": 2})
    # A constant rate per phase, so the history shows which phase's rate each epoch used.
    config = TrainConfig(architecture="resnet50v2", image_size=32, epochs=2, warmup_epochs=1, batch_size=6,
                         weights="none", lr_schedule="constant")

    class Crash(Exception):
        pass

    def crash_when_fine_tuning_starts(event):
        if event["event"] == "phase_start" and event["phase"] == "finetune":
            raise Crash

    # a crash after the fine-tuning phase was set up but before its first epoch finished:
    # the rerun must set fine-tuning up again on the warm-up checkpoint
    with pytest.raises(Crash):
        train_architecture(store, split_key, config, "20260101-000000-r1", settings, crash_when_fine_tuning_starts)
    assert store.get_json("runs/20260101-000000-r1/checkpoints/resnet50v2/state.json")["phase"] == "finetune"
    summary = train_architecture(store, split_key, config, "20260101-000000-r1", settings)
    assert summary["resumed_from_epoch"] == 1
    history = store.get_json("runs/20260101-000000-r1/models/resnet50v2/history.json")
    assert history["phase"] == ["warmup", "finetune"]
    assert history["learning_rate"][0] == pytest.approx(config.learning_rate)
    assert history["learning_rate"][1] == pytest.approx(config.fine_tune_learning_rate)
    assert summary["image_size"] == 32 and summary["verified_test"] is None
    assert store.get_json("runs/20260101-000000-r1/models/resnet50v2/metrics.json")["verified_test"] is None


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from dermflow.settings import load_settings
    from dermflow.storage import ObjectStore
    from dermflow.modeling.train import TrainConfig, train_architecture

    split_key, cache_dir, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = load_settings(cache_dir=cache_dir, keep_checkpoints=1)

    def progress(event):
        if event["event"] == "epoch_end" and event["epoch"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash right after a checkpoint

    config = TrainConfig(architecture="baseline_cnn", image_size=32, epochs=4, batch_size=8, weights="none", patience=10)
    train_architecture(ObjectStore.from_settings(settings), split_key, config, "20260101-000000-crash-run", settings, progress)
    """
)


@pytest.mark.slow
def test_rerun_after_sigkill_resumes_at_the_next_epoch(store, settings, s3_env, tmp_path):
    from dermflow.modeling.train import TrainConfig, train_architecture

    split_key = write_split(store, {"train": 6, "val": 3, "test": 2})
    env = {**os.environ, **s3_env}
    process = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, split_key, str(tmp_path / "crash-cache"), "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == -9, process.stderr[-2000:]
    state = store.get_json("runs/20260101-000000-crash-run/checkpoints/baseline_cnn/state.json")
    assert state["epoch"] == 2 and state["status"] == "running"
    assert store.exists("runs/20260101-000000-crash-run/checkpoints/baseline_cnn/epoch-002.keras")
    assert not store.exists("runs/20260101-000000-crash-run/models/baseline_cnn/model.keras")

    # the rerun (a fresh local cache, as on another machine) starts at epoch 3
    events = []
    config = TrainConfig(architecture="baseline_cnn", image_size=32, epochs=4, batch_size=8, weights="none", patience=10)
    from dermflow.settings import load_settings

    rerun_settings = load_settings(cache_dir=tmp_path / "other-cache", keep_checkpoints=1)
    summary = train_architecture(store, split_key, config, "20260101-000000-crash-run", rerun_settings, events.append)
    assert [e["epoch"] for e in events if e["event"] == "epoch_end"] == [3, 4]
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_run"] == 2 and summary["epochs_total"] == 4
    history = store.get_json("runs/20260101-000000-crash-run/models/baseline_cnn/history.json")
    assert history["epoch"] == [1, 2, 3, 4]
    # only the last checkpoint, the best and the tail average (where one was recorded) are kept
    kept = [k for k in store.list_keys("runs/20260101-000000-crash-run/checkpoints/baseline_cnn/") if k.endswith(".keras")]
    final = store.get_json("runs/20260101-000000-crash-run/checkpoints/baseline_cnn/state.json")
    averaged = {final["averaged_key"]} if final.get("averaged_key") else set()
    assert set(kept) == {final["checkpoints"][-1], final["best_key"], *averaged}
    assert final["checkpoints"][-1].endswith("epoch-004.keras")


def test_too_few_training_images_is_a_clear_error(store, settings):
    from dermflow.modeling.train import TrainConfig, TrainingError, train_architecture

    split_key = write_split(store, {"train": 1, "val": 1})
    with pytest.raises(TrainingError, match="training split has 3 images"):
        train_architecture(store, split_key, TrainConfig(weights="none"), "20260101-000000-r2", settings)


def test_class_missing_from_training_split_is_a_clear_error(store, settings):
    from dermflow.modeling.train import TrainConfig, TrainingError, train_architecture

    split_key = write_split(store, {"train": 5, "val": 1})
    frame = store.get_dataframe_csv(split_key)
    frame.loc[(frame["label"] == "eczema") & (frame["split"] == "train"), "split"] = "excluded"
    store.put_dataframe_csv(split_key, frame)
    with pytest.raises(TrainingError, match="missing from the training split: 'eczema'"):
        train_architecture(store, split_key, TrainConfig(weights="none"), "20260101-000000-r3", settings)
