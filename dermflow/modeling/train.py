"""The transfer-learning recipe and the one entry point that trains one architecture.

`train_architecture(store, split_key, config, run_id)` reads a split manifest, prepares the
cached image arrays (`dermflow.dataset.arrays`), builds the model (`dermflow.modeling.models`), trains it (head
warm-up on a frozen backbone, then the top of the backbone at a lower learning rate with
BatchNormalization frozen; `baseline_cnn` trains whole), checkpoints every epoch to the bucket
so that a rerun of the same run id resumes, evaluates the best epoch on `test` and
`verified_test`, and writes the model and its reports under `runs/<run_id>/models/<arch>/`.

Model selection and early stopping use the real validation weighted F1 (scikit-learn over the
whole val split, once per epoch). Only Keras 3 APIs are used in the training core, so it also
runs under `KERAS_BACKEND=jax` (the input pipeline then uses a PyDataset).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import keras
import numpy as np

from dermflow.config import LRScheduleName, TrainConfig
from dermflow.dataset import arrays as data_lib
from dermflow.modeling import models
from dermflow.metrics import classification_metrics, weighted_f1
from dermflow.settings import Settings, get_settings

log = logging.getLogger("dermflow.modeling.train")

Progress = Callable[[dict], None]


class TrainingError(RuntimeError):
    """Training cannot start or continue for a reason the caller can fix (data, config)."""


# Keyed by the names `dermflow.config.OptimizerName` allows (a unit test keeps them equal).
OPTIMIZERS: dict[str, Callable[[float, TrainConfig], keras.optimizers.Optimizer]] = {
    "adam": lambda lr, c: keras.optimizers.Adam(lr),
    "adamw": lambda lr, c: keras.optimizers.AdamW(lr, weight_decay=c.weight_decay),
    "sgd": lambda lr, c: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda lr, c: keras.optimizers.RMSprop(lr),
}


LR_SCHEDULES: tuple[str, ...] = get_args(LRScheduleName)


def parse_train_config(values) -> TrainConfig:
    """A `TrainConfig` from its JSON form (a flow parameter); a bad or unknown field is a
    TrainingError naming it (permanent: retrying cannot fix a config)."""
    try:
        return TrainConfig.from_dict(values)
    except ValueError as error:
        raise TrainingError(f"bad training config: {error}") from error


def accelerator_present() -> bool:
    """A GPU (or TPU) visible to the current Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform != "cpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def compile_model(model: keras.Model, config: TrainConfig, learning_rate: float, *, jit_compile: bool) -> None:
    """Compile for training; XLA only where asked and every layer supports it (under
    TensorFlow the image-transform augmentations do not, so a TF model runs as a graph)."""
    jit_compile = jit_compile and all(getattr(layer, "supports_jit", True) for layer in model._flatten_layers())
    model.compile(
        optimizer=OPTIMIZERS[config.optimizer](learning_rate, config),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


# --------------------------------------------------------------------------- callbacks


class ValWeightedF1(keras.callbacks.Callback):
    """Predicts the whole validation split once per epoch; adds `val_weighted_f1`,
    `val_accuracy` and `val_loss` (plain cross-entropy) to the epoch logs.

    Put it first in the callback list: later callbacks (checkpointing, early stopping) read
    the logs it fills.
    """

    def __init__(self, val_inputs, y_true: np.ndarray, batch_size: int | None = None):
        super().__init__()
        self.val_inputs = val_inputs
        self.y_true = np.asarray(y_true, dtype=int)
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        kwargs = {"batch_size": self.batch_size} if isinstance(self.val_inputs, np.ndarray) else {}
        probs = np.asarray(self.model.predict(self.val_inputs, verbose=0, **kwargs), dtype=np.float64)
        picked = probs[np.arange(len(self.y_true)), self.y_true]
        logs["val_weighted_f1"] = weighted_f1(self.y_true, probs.argmax(axis=1))
        logs["val_accuracy"] = float(np.mean(probs.argmax(axis=1) == self.y_true))
        logs["val_loss"] = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))


class TimeBudget(keras.callbacks.Callback):
    """Stops training cleanly before `deadline` (unix time).

    After each epoch it stops when another epoch of the same length would overrun; during an
    epoch it stops at the first batch past the deadline (that partial epoch is still validated
    and checkpointed, so the best model so far is kept).
    """

    def __init__(self, deadline: float | None):
        super().__init__()
        self.deadline = deadline
        self.stopped = False
        self._epoch_started = time.time()

    def _stop(self) -> None:
        self.stopped = True
        self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        if self.deadline is not None and time.time() >= self.deadline:
            self._stop()

    def on_epoch_end(self, epoch, logs=None):
        if self.deadline is None:
            return
        last_epoch_seconds = time.time() - self._epoch_started
        if time.time() + last_epoch_seconds >= self.deadline:
            self._stop()


class CosineSchedule(keras.callbacks.Callback):
    """Linear warm-up, then cosine decay of the learning rate across one training phase.

    Progress through the phase is whichever is further along: its epochs (`first_epoch` to
    `end_epoch`) or the wall clock (from the phase's start to `deadline`). So a run under a
    time budget anneals by the budget's end instead of being cut off at a high rate, and one
    without a budget anneals by its last epoch. Annealing to a small rate is what turns the
    erratic validation scores of a constant rate into a converged model (on atlas20 from
    scratch: held-out weighted F1 0.23 at a constant 1e-3 vs 0.43 with this, 6 minutes each).
    The rate is set per batch; it is a plain optimizer variable, so this works on any backend.
    """

    def __init__(
        self,
        base_rate: float,
        first_epoch: int,
        end_epoch: int,
        *,
        deadline: float | None = None,
        warmup_fraction: float = 0.05,
        floor_fraction: float = 1e-3,
    ):
        super().__init__()
        self.base_rate = float(base_rate)
        self.first_epoch = int(first_epoch)
        self.span = max(1, int(end_epoch) - int(first_epoch))
        self.deadline = deadline
        self.warmup_fraction = warmup_fraction
        self.floor_fraction = floor_fraction
        self._started = time.time()
        self._epoch = self.first_epoch
        self._steps: int | None = None

    def rate_at(self, progress: float) -> float:
        """The learning rate at `progress` (0 = phase start, 1 = phase end)."""
        progress = min(max(progress, 0.0), 1.0)
        warmup = min(1.0, progress / self.warmup_fraction) if self.warmup_fraction > 0 else 1.0
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_rate * max(warmup * cosine, self.floor_fraction)

    def progress(self, batch: int) -> float:
        within_epoch = batch / self._steps if self._steps else 0.0
        by_epochs = (self._epoch - self.first_epoch + within_epoch) / self.span
        by_time = 0.0
        if self.deadline is not None:
            by_time = (time.time() - self._started) / max(self.deadline - self._started, 1e-9)
        return max(by_epochs, by_time)

    def on_train_begin(self, logs=None):
        self._started = time.time()
        steps = (self.params or {}).get("steps")
        self._steps = int(steps) if steps else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.rate_at(self.progress(batch))

    def annealed(self) -> bool:
        """Past the schedule's half-way point. Early stopping waits for it: the high-rate first
        half has erratic validation scores by design (long runs without a new best are normal)."""
        return self.progress(0) >= 0.5


def schedule_callbacks(config: TrainConfig, phase: str, first_epoch: int, end_epoch: int,
                       deadline: float | None) -> list[keras.callbacks.Callback]:
    """The learning-rate callbacks of one phase (none for a constant rate)."""
    if config.lr_schedule == "constant":
        return []
    return [CosineSchedule(phase_learning_rate(phase, config), first_epoch, end_epoch, deadline=deadline,
                           warmup_fraction=config.lr_warmup_fraction)]


class CheckpointManager:
    """Per-epoch checkpoints in the bucket plus `state.json`, keeping the last N and the best."""

    def __init__(self, store, run_id: str, architecture: str, local_dir: Path, keep: int):
        self.store = store
        self.prefix = f"runs/{run_id}/checkpoints/{architecture}/"
        self.state_key = self.prefix + "state.json"
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.state: dict = {
            "status": "running", "epoch": 0, "phase": None, "phase_start_epoch": 0,
            "best_score": None, "best_epoch": None, "best_key": None, "checkpoints": [], "history": {},
        }

    def load(self) -> dict | None:
        if not self.store.exists(self.state_key):
            return None
        self.state = self.store.get_json(self.state_key)
        return self.state

    def key_for(self, epoch: int) -> str:
        return f"{self.prefix}epoch-{epoch:03d}.keras"

    def local_path(self, key: str) -> Path:
        return self.local_dir / Path(key).name

    def fetch(self, key: str) -> Path:
        path = self.local_path(key)
        if not path.exists():
            self.store.download_file(key, path)
        return path

    def record_epoch(self, model: keras.Model, epoch: int, phase: str, logs: dict, seconds: float) -> bool:
        """Save and upload epoch `epoch` (1-based), update state.json; True when it is the best."""
        key = self.key_for(epoch)
        path = self.local_path(key)
        model.save(path)
        self.store.put_file(key, path)
        row = {"epoch": epoch, "phase": phase, "seconds": round(seconds, 3), **_scalars(logs)}
        history = self.state.setdefault("history", {})
        length = len(history.get("epoch", []))
        for name in sorted(set(history) | set(row)):
            history.setdefault(name, [None] * length).append(row.get(name))
        score = float(logs.get("val_weighted_f1", float("nan")))
        improved = not math.isnan(score) and (self.state["best_score"] is None or score > self.state["best_score"])
        if improved:
            self.state.update(best_score=score, best_epoch=epoch, best_key=key)
        self.state["checkpoints"] = [k for k in self.state["checkpoints"] if k != key] + [key]
        self.state.update(epoch=epoch, phase=phase)
        # state.json is written after the checkpoint it names exists, and before pruning.
        self.store.put_json(self.state_key, self.state)
        self._prune()
        return improved

    def _prune(self) -> None:
        keep = set(self.state["checkpoints"][-self.keep :])
        if self.state["best_key"]:
            keep.add(self.state["best_key"])
        stale = [k for k in self.state["checkpoints"] if k not in keep]
        if not stale:
            return
        self.state["checkpoints"] = [k for k in self.state["checkpoints"] if k in keep]
        self.store.put_json(self.state_key, self.state)
        for key in stale:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=key)
            self.local_path(key).unlink(missing_ok=True)

    def save_state(self, **updates) -> None:
        self.state.update(updates)
        self.store.put_json(self.state_key, self.state)


def _scalars(logs: dict | None) -> dict:
    out = {}
    for name, value in (logs or {}).items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class EpochCheckpoint(keras.callbacks.Callback):
    """Checkpoints every epoch, tracks the best val weighted F1, stops after `patience`
    epochs without improvement in the current phase (once `may_stop()` allows it), and
    reports progress."""

    def __init__(self, manager: CheckpointManager, phase: str, patience: int, progress: Progress | None,
                 total_epochs: int, architecture: str, may_stop: Callable[[], bool] | None = None):
        super().__init__()
        self.may_stop = may_stop
        self.manager = manager
        self.phase = phase
        self.patience = patience
        self.progress = progress
        self.total_epochs = total_epochs
        self.architecture = architecture
        self.early_stopped = False
        self._started = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        try:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate.value))
        except Exception:  # noqa: BLE001 - a schedule object; not worth failing over
            pass
        number = epoch + 1
        improved = self.manager.record_epoch(self.model, number, self.phase, logs, time.time() - self._started)
        state = self.manager.state
        since = number - max(state["best_epoch"] or 0, state.get("phase_start_epoch", 0))
        if since >= self.patience and (self.may_stop is None or self.may_stop()):
            self.early_stopped = True
            self.model.stop_training = True
        log.info(
            "%s %s epoch %d/%d: loss %.4f val_weighted_f1 %.4f%s",
            self.architecture, self.phase, number, self.total_epochs, logs.get("loss", float("nan")),
            logs.get("val_weighted_f1", float("nan")), " (best)" if improved else "",
        )
        if self.progress:
            self.progress({
                "event": "epoch_end", "architecture": self.architecture, "phase": self.phase, "epoch": number,
                "epochs": self.total_epochs, "logs": _scalars(logs), "improved": improved,
                "best_score": state["best_score"], "best_epoch": state["best_epoch"],
                "checkpoint_key": self.manager.key_for(number),
            })


# --------------------------------------------------------------------------- the entry point


def _phases(config: TrainConfig, pretrained: bool) -> list[tuple[str, int, int]]:
    """(phase, first epoch index, end epoch index) with 0-based half-open epoch ranges."""
    if not pretrained:
        return [("full", 0, config.epochs)]
    warmup = min(max(config.warmup_epochs, 0), config.epochs)
    phases = [("warmup", 0, warmup)] if warmup else []
    if config.epochs > warmup:
        phases.append(("finetune", warmup, config.epochs))
    return phases


def training_phases(config: TrainConfig) -> list[tuple[str, int, int]]:
    """The phases of `config`'s architecture: [(phase, first epoch index, end index)], 0-based
    half-open; `warmup` + `finetune` for a pretrained backbone, `full` for a model from scratch."""
    return _phases(config, models.get_spec(config.architecture).pretrained)


def configure_phase(model: keras.Model, phase: str, config: TrainConfig, *, jit_compile: bool) -> None:
    """Set what is trainable for `phase` and compile with that phase's learning rate."""
    if phase == "warmup":
        models.freeze_backbone(model)
    elif phase == "finetune":
        models.unfreeze_top(model, fraction=config.fine_tune_fraction, blocks=config.fine_tune_blocks)
    else:
        model.trainable = True
    compile_model(model, config, phase_learning_rate(phase, config), jit_compile=jit_compile)


def phase_learning_rate(phase: str, config: TrainConfig) -> float:
    """The (peak) learning rate of `phase`: the lower fine-tune rate for a pretrained backbone."""
    return config.fine_tune_learning_rate if phase == "finetune" else config.learning_rate


def check_training_data(frame, min_train_images: int) -> list[str]:
    """The class names (sorted train labels); TrainingError if the split cannot be trained on."""
    for column in ("md5hash", "label", "split"):
        if column not in frame.columns:
            raise TrainingError(f"split manifest lacks column {column!r}")
    train = frame[frame["split"] == "train"]
    if len(train) < min_train_images:
        raise TrainingError(
            f"the training split has {len(train)} images; at least {min_train_images} are needed"
        )
    class_names = sorted(train["label"].unique())
    if len(class_names) < 2:
        raise TrainingError(f"the training split has {len(class_names)} class(es); at least 2 are needed")
    used = frame[frame["split"].isin(data_lib.USED_SPLITS)]
    missing = sorted(set(used["label"]) - set(class_names))
    if missing:
        where = used[used["label"].isin(missing)].groupby("label")["split"].first().to_dict()
        raise TrainingError(
            "class(es) missing from the training split: "
            + ", ".join(f"{name!r} (found in {where[name]})" for name in missing[:10])
        )
    if not (frame["split"] == "val").any():
        raise TrainingError("the split manifest has no 'val' rows; validation F1 drives model selection")
    return class_names


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
        phases = _phases(config, spec.pretrained)
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
