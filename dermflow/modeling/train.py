"""The one entry point that trains one architecture: `train_architecture`.

`train_architecture(store, split_key, config, run_id)` reads a split manifest, prepares the
cached image arrays (`dermflow.dataset.arrays`), builds the model (`dermflow.modeling.models`),
trains it by the recipe (`dermflow.modeling.recipe`: head warm-up on a frozen backbone, then the
top of the backbone at a lower learning rate with BatchNormalization frozen; `baseline_cnn`
trains whole), checkpoints every epoch to the bucket (`dermflow.modeling.checkpoints`) so that a
rerun of the same run id resumes, evaluates the best epoch on `test` and `verified_test`, and
writes the model and its reports under `runs/<run_id>/models/<arch>/`.

Model selection and early stopping use the real validation weighted F1 (scikit-learn over the
whole val split, once per epoch; `dermflow.modeling.callbacks`). Only Keras 3 APIs are used in
the training core, so it also runs under `KERAS_BACKEND=jax` (the input pipeline then uses a
PyDataset).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from dermflow.config import TrainConfig
from dermflow.dataset import arrays as data_lib
from dermflow.metrics import classification_metrics
from dermflow.modeling import models
from dermflow.modeling.callbacks import (
    EpochCheckpoint,
    Progress,
    TimeBudget,
    ValWeightedF1,
    schedule_callbacks,
)
from dermflow.modeling.checkpoints import CheckpointManager
from dermflow.modeling.recipe import (
    TrainingError,
    accelerator_present,
    check_training_data,
    configure_phase,
    phases_for,
)
from dermflow.settings import Settings, get_settings

log = logging.getLogger("dermflow.modeling.train")


def _versions() -> dict:
    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    except ImportError:  # pragma: no cover - jax/torch-only environments
        versions["tensorflow"] = None
    return versions


def _headline(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: metrics.get(k) for k in ("n", "accuracy", "weighted_f1", "macro_f1", "top3_accuracy", "range_gap_weighted_f1")}


def train_architecture(
    store,
    split_key: str,
    config: TrainConfig,
    run_id: str,
    settings: Settings | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train, evaluate and save one architecture; resume from its last checkpoint if any.

    `progress(event: dict)` is called after every epoch (`event="epoch_end"`, with the
    epoch's logs) and at phase starts and the end. Returns a JSON-able summary:
    architecture, status (`completed`, `early_stopped`, `deadline`), keys and URIs of the
    outputs, headline test/verified_test metrics, epochs run, best epoch, seconds.
    """
    started = time.time()
    settings = settings or get_settings()
    arch = config.architecture
    spec = models.get_spec(arch)
    out_prefix = f"runs/{run_id}/models/{arch}/"
    work_dir = Path(settings.local_cache_dir) / "runs" / run_id / arch
    manager = CheckpointManager(store, run_id, arch, work_dir / "checkpoints", settings.keep_checkpoints)
    previous = manager.load()
    if previous and previous.get("status") == "done" and previous.get("summary") and store.exists(out_prefix + "model.keras"):
        log.info("%s: run %s already finished; returning its summary", arch, run_id)
        return previous["summary"]

    frame = store.get_dataframe_csv(split_key)
    class_names = check_training_data(frame, config.min_train_images)
    image_size = models.effective_image_size(arch, config.image_size)

    # --- data: bucket -> local cache -> one uint8 array per (manifest, size)
    used = frame[frame["split"].isin(data_lib.USED_SPLITS)]
    keys = {
        md5: (key or f"images/{md5}")
        for md5, key in zip(used["md5hash"], used["key"] if "key" in used.columns else [""] * len(used))
    }
    paths = data_lib.cache_images_from_store(store, keys, settings.local_cache_dir)
    try:
        arrays = data_lib.prepare_split_arrays(frame, paths.__getitem__, image_size, settings.local_cache_dir, class_names)
    except data_lib.DataError as error:
        raise TrainingError(str(error)) from error
    train_idx, val_idx = arrays.indices("train"), arrays.indices("val")
    class_weights = (
        data_lib.class_weights_from_labels(arrays.labels[train_idx], len(class_names)) if config.class_weights else None
    )

    gpu = accelerator_present()
    use_mixed = gpu if config.mixed_precision is None else config.mixed_precision
    # XLA on TensorFlow only pays off on a GPU; a JAX model without jit runs op by op, so
    # there jit is on everywhere.
    auto_jit = gpu or keras.backend.backend() == "jax"
    jit = auto_jit if config.jit_compile is None else config.jit_compile
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if use_mixed else "float32")
    try:
        keras.utils.set_random_seed(config.seed)
        phases = phases_for(config, spec.pretrained)
        done_epochs = 0
        model = None
        loaded_phase = None
        if previous and previous.get("checkpoints"):
            done_epochs = int(previous["epoch"])
            last = previous["checkpoints"][-1]
            log.info("%s: resuming run %s after epoch %d from %s", arch, run_id, done_epochs, last)
            model = keras.saving.load_model(manager.fetch(last))
            # the phase the checkpoint was trained in (state["phase"] may already name the next
            # phase if the crash came between configuring it and its first epoch)
            loaded_phase = (previous.get("history", {}).get("phase") or [previous["phase"]])[-1]
        resumed_from = done_epochs
        if model is None:
            model = models.create_model(
                arch, len(class_names), image_size, config.weights, head_width=config.head_width,
                dropout=config.dropout, augment=config.augment, seed=config.seed, **config.arch_options,
            )

        train_data = data_lib.make_dataset(arrays, train_idx, config.batch_size, shuffle=True, seed=config.seed, class_weights=class_weights)
        val_data = data_lib.make_dataset(arrays, val_idx, config.eval_batch_size, shuffle=False)
        f1_callback = ValWeightedF1(val_data, arrays.labels[val_idx])
        budget = TimeBudget(config.deadline)
        status = "completed"
        for phase, first, end in phases:
            if end <= done_epochs:
                continue
            if budget.stopped or (config.deadline is not None and time.time() >= config.deadline):
                status = "deadline"
                break
            if loaded_phase != phase:
                configure_phase(model, phase, config, jit_compile=jit)
                manager.save_state(phase=phase, phase_start_epoch=max(first, done_epochs))
            loaded_phase = None
            if progress:
                progress({"event": "phase_start", "architecture": arch, "phase": phase, "epoch": done_epochs + 1, "epochs": config.epochs})
            schedule = schedule_callbacks(config, phase, first, end, config.deadline)
            checkpoint = EpochCheckpoint(manager, phase, config.patience, progress, config.epochs, arch,
                                         may_stop=schedule[0].annealed if schedule else None)
            model.fit(
                train_data, shuffle=False, initial_epoch=max(first, done_epochs), epochs=end,
                callbacks=[*schedule, f1_callback, checkpoint, budget], verbose=0,
            )
            done_epochs = int(manager.state["epoch"])
            if budget.stopped:
                status = "deadline"
                break
            if checkpoint.early_stopped and phase != "warmup":
                status = "early_stopped"
                break
        if manager.state.get("best_key") is None:
            raise TrainingError(f"{arch}: no epoch finished before the deadline; nothing to evaluate")

        # --- evaluate the best epoch
        best_path = manager.fetch(manager.state["best_key"])
        best = keras.saving.load_model(best_path)
        metrics: dict[str, dict | None] = {}
        prediction_parts = []
        for split in ("test", "verified_test"):
            idx = arrays.indices(split)
            if len(idx) == 0:
                metrics[split] = None
                continue
            probs = np.asarray(
                best.predict(data_lib.make_dataset(arrays, idx, config.eval_batch_size, shuffle=False), verbose=0),
                dtype=np.float32,
            )
            metrics[split] = classification_metrics(arrays.labels[idx], probs, class_names, arrays.fitzpatrick_range[idx])
            prediction_parts.append((split, idx, probs))

        # --- outputs
        out_dir = work_dir / "outputs"
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best_path, out_dir / "model.keras")
        npz_path = out_dir / "predictions.npz"
        if prediction_parts:
            all_idx = np.concatenate([idx for _, idx, _ in prediction_parts])
            np.savez_compressed(
                npz_path,
                md5hash=arrays.md5hash[all_idx].astype(str),
                split=np.concatenate([[s] * len(idx) for s, idx, _ in prediction_parts]).astype(str),
                y_true=arrays.labels[all_idx].astype(np.int64),
                y_prob=np.concatenate([p for _, _, p in prediction_parts]).astype(np.float32),
                fitzpatrick_range=arrays.fitzpatrick_range[all_idx].astype(str),
            )
        else:
            np.savez_compressed(
                npz_path, md5hash=np.zeros(0, dtype=str), split=np.zeros(0, dtype=str), y_true=np.zeros(0, dtype=np.int64),
                y_prob=np.zeros((0, len(class_names)), dtype=np.float32), fitzpatrick_range=np.zeros(0, dtype=str),
            )
        history = manager.state.get("history", {})
        params = {
            **config.to_dict(),
            "image_size_requested": config.image_size,
            "image_size": image_size,
            "run_id": run_id,
            "split_key": split_key,
            "split_digest": arrays.digest,
            "class_names": class_names,
            "class_weights_values": None if class_weights is None else [float(w) for w in class_weights],
            "split_sizes": {s: int(len(arrays.indices(s))) for s in data_lib.USED_SPLITS},
            "mixed_precision": bool(use_mixed),
            "jit_compile": bool(jit),
            "accelerator": bool(gpu),
            "best_epoch": manager.state["best_epoch"],
            "best_val_weighted_f1": manager.state["best_score"],
            **_versions(),
        }
        keys_out = {
            "model": out_prefix + "model.keras",
            "metrics": out_prefix + "metrics.json",
            "history": out_prefix + "history.json",
            "params": out_prefix + "params.json",
            "predictions": out_prefix + "predictions.npz",
        }
        store.put_json(keys_out["metrics"], metrics)
        store.put_json(keys_out["history"], history)
        store.put_json(keys_out["params"], params)
        store.put_file(keys_out["predictions"], npz_path)
        store.put_file(keys_out["model"], out_dir / "model.keras")  # last: its presence means "complete"
        summary = {
            "architecture": arch,
            "status": status,
            "run_id": run_id,
            "image_size": image_size,
            "keys": keys_out,
            "uris": {name: store.uri(key) for name, key in keys_out.items()},
            "test": _headline(metrics.get("test")),
            "verified_test": _headline(metrics.get("verified_test")),
            "best_epoch": manager.state["best_epoch"],
            "best_val_weighted_f1": manager.state["best_score"],
            "epochs_run": int(manager.state["epoch"]) - resumed_from,
            "epochs_total": int(manager.state["epoch"]),
            "resumed_from_epoch": resumed_from,
            "seconds": round(time.time() - started, 2),
        }
        manager.save_state(status="done", summary=summary)
        if progress:
            progress({"event": "done", **summary})
        return summary
    finally:
        keras.config.set_dtype_policy(previous_policy)
