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

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from dermflow import layout
from dermflow.config import TrainConfig
from dermflow.dataset import arrays as data_lib
from dermflow.metrics import classification_metrics
from dermflow.modeling import devices, models
from dermflow.modeling.callbacks import (
    EpochCheckpoint,
    EpochTimer,
    Progress,
    TailAverage,
    TimeBudget,
    ValWeightedF1,
    phase_callbacks,
)
from dermflow.modeling.checkpoints import CheckpointManager
from dermflow.modeling.placement import Placement, check_placement, distribution_scope
from dermflow.modeling.recipe import (
    TrainingError,
    accelerator_present,
    check_training_data,
    configure_phase,
    load_split_arrays,
    phases_for,
)
from dermflow.runs import check_run_id
from dermflow.settings import Settings, get_settings

log = logging.getLogger("dermflow.modeling.train")

# The headline metrics a training's summary carries (the full set is in metrics.json).
HEADLINE_METRICS = ("n", "accuracy", "weighted_f1", "macro_f1", "top3_accuracy", "range_gap_weighted_f1")


@dataclass
class PreparedData:
    """The split's images as one cached array, and what training needs to know about them."""

    arrays: data_lib.SplitArrays
    class_names: list[str]
    image_size: int  # the architecture's effective input size
    class_weights: np.ndarray | None


@dataclass(frozen=True)
class Runtime:
    """How this process trains: on an accelerator or not, mixed precision, XLA."""

    accelerator: bool
    mixed_precision: bool
    jit_compile: bool


@dataclass
class StartingPoint:
    """The model training continues from: a fresh one, or the last checkpoint of this run."""

    model: keras.Model
    done_epochs: int  # epochs finished before this call (0 for a fresh start)
    loaded_phase: str | None  # the phase the resumed checkpoint was trained in


@dataclass
class Evaluation:
    """The best epoch's model file and its scores on the held-out splits."""

    best_path: Path
    metrics: dict[str, dict | None]
    predictions: list[tuple[str, np.ndarray, np.ndarray]]  # (split, row indices, probabilities)
    inference_images_per_second: float | None = None
    candidates: dict | None = None  # `candidate_scores`: the averaged and the best-epoch model


# --------------------------------------------------------------------------- the steps


def finished_summary(store, previous: dict | None, run_id: str, architecture: str) -> dict | None:
    """The summary of this run's training of `architecture` if it already finished, else None."""
    done = previous and previous.get("status") == "done" and previous.get("summary")
    if done and store.exists(layout.model_key(run_id, architecture)):
        log.info("%s: run %s already finished; returning its summary", architecture, run_id)
        return previous["summary"]
    return None


def prepare_data(store, split_key: str, config: TrainConfig, settings: Settings) -> PreparedData:
    """Check the split manifest, cache its images locally and load them as one uint8 array."""
    frame = store.get_dataframe_csv(split_key)
    class_names = check_training_data(frame, config.min_train_images)
    image_size = models.effective_image_size(config.architecture, config.image_size)
    arrays = load_split_arrays(store, frame, image_size, settings, class_names)
    class_weights = None
    if config.class_weights:
        class_weights = data_lib.class_weights_from_labels(arrays.labels[arrays.indices("train")], len(class_names))
    return PreparedData(arrays, class_names, image_size, class_weights)


def choose_runtime(config: TrainConfig) -> Runtime:
    """Mixed precision and XLA as the config asks, else by what this machine has."""
    accelerator = accelerator_present()
    mixed = accelerator if config.mixed_precision is None else config.mixed_precision
    # XLA on TensorFlow only pays off on a GPU; a JAX model without jit runs op by op, so
    # there jit is on everywhere.
    auto_jit = accelerator or keras.backend.backend() == "jax"
    jit = auto_jit if config.jit_compile is None else config.jit_compile
    return Runtime(accelerator=bool(accelerator), mixed_precision=bool(mixed), jit_compile=bool(jit))


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool) -> Iterator[None]:
    """Keras' global dtype policy for the block (restored after)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if mixed_precision else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_or_resume(manager: CheckpointManager, previous: dict | None, config: TrainConfig,
                    data: PreparedData, run_id: str) -> StartingPoint:
    """The last checkpoint of this run if there is one, else a freshly built model."""
    if previous and previous.get("checkpoints"):
        done_epochs = int(previous["epoch"])
        last = previous["checkpoints"][-1]
        log.info("%s: resuming run %s after epoch %d from %s", config.architecture, run_id, done_epochs, last)
        model = keras.saving.load_model(manager.fetch(last))
        # the phase the checkpoint was trained in (state["phase"] may already name the next
        # phase if the crash came between configuring it and its first epoch)
        loaded_phase = (previous.get("history", {}).get("phase") or [previous["phase"]])[-1]
        return StartingPoint(model, done_epochs, loaded_phase)
    model = models.create_model(
        config.architecture, len(data.class_names), data.image_size, config.weights, head_width=config.head_width,
        dropout=config.dropout, augment=config.augment, seed=config.seed, edge_mask=config.edge_mask,
        **config.arch_options,
    )
    return StartingPoint(model, 0, None)


def run_phases(start: StartingPoint, manager: CheckpointManager, config: TrainConfig, data: PreparedData, *,
               jit_compile: bool, progress: Progress | None,
               timer: EpochTimer | None = None) -> tuple[str, TailAverage | None]:
    """Train the phases (or their rest) not done yet; returns how training ended (`completed`,
    `early_stopped` or `deadline`) and the last phase's tail average (None if it did not run)."""
    arch, arrays = config.architecture, data.arrays
    train_idx, val_idx = arrays.indices("train"), arrays.indices("val")
    train_data = data_lib.make_dataset(arrays, train_idx, config.batch_size, shuffle=True, seed=config.seed,
                                       class_weights=data.class_weights)
    val_data = data_lib.make_dataset(arrays, val_idx, config.eval_batch_size, shuffle=False)
    f1_callback = ValWeightedF1(val_data, arrays.labels[val_idx])
    budget = TimeBudget(config.deadline)
    model, done_epochs, loaded_phase = start.model, start.done_epochs, start.loaded_phase
    tail = None
    for phase, first, end in phases_for(config, models.get_spec(arch).pretrained):
        if end <= done_epochs:
            continue
        if budget.stopped or (config.deadline is not None and time.time() >= config.deadline):
            return "deadline", tail
        if loaded_phase != phase:
            configure_phase(model, phase, config, jit_compile=jit_compile)
            manager.save_state(phase=phase, phase_start_epoch=max(first, done_epochs))
        loaded_phase = None
        if progress:
            progress({"event": "phase_start", "architecture": arch, "phase": phase, "epoch": done_epochs + 1,
                      "epochs": config.epochs})
        # The warm-up phase is cut short by the deadline only; the last phase anneals by it.
        schedule, stopper, tail = phase_callbacks(config, phase, first, end, config.deadline)
        checkpoint = EpochCheckpoint(manager, phase, progress, config.epochs, arch)
        model.fit(
            train_data, shuffle=False, initial_epoch=max(first, done_epochs), epochs=end,
            callbacks=[*([timer] if timer else []), *schedule, f1_callback, checkpoint, stopper, tail, budget],
            verbose=0,
        )
        done_epochs = int(manager.state["epoch"])
        if budget.stopped:
            return "deadline", tail
        if stopper.stopped and phase != "warmup":
            return "early_stopped", tail
    return "completed", tail


def record_tail_average(model: keras.Model, tail: TailAverage | None, manager: CheckpointManager,
                        config: TrainConfig, data: PreparedData) -> None:
    """Score the tail-averaged weights on validation and keep them as a checkpoint (at least two
    epochs averaged; otherwise the best epoch is the only candidate)."""
    weights = tail.averaged_weights() if tail is not None and tail.count >= 2 else None
    if weights is None:
        return
    from dermflow.metrics import weighted_f1

    model.set_weights(weights)
    val_idx = data.arrays.indices("val")
    probs = model.predict(data_lib.make_dataset(data.arrays, val_idx, config.eval_batch_size, shuffle=False),
                          verbose=0)[: len(val_idx)]  # without a data-parallel pipeline's padding
    score = weighted_f1(data.arrays.labels[val_idx], np.asarray(probs).argmax(axis=1))
    manager.record_averaged(model, score, tail.count)
    log.info("%s: weights averaged over the last %d epochs: val weighted F1 %.4f (best epoch %s: %s)",
             config.architecture, tail.count, score, manager.state["best_epoch"], manager.state["best_score"])


def chosen_model_key(manager: CheckpointManager, config: TrainConfig) -> tuple[str, str]:
    """(checkpoint key, "average" | "best_epoch"): what `config.model_choice` asks for, where it exists."""
    if config.model_choice == "average" and manager.state.get("averaged_key"):
        return manager.state["averaged_key"], "average"
    if manager.state.get("best_key") is None:
        raise TrainingError(f"{config.architecture}: no epoch finished before the deadline; nothing to evaluate")
    return manager.state["best_key"], "best_epoch"


def predict_split(model: keras.Model, config: TrainConfig, data: PreparedData, idx: np.ndarray) -> np.ndarray:
    """Probabilities for rows `idx`; with `config.tta`, averaged with the horizontally flipped images."""
    dataset = data_lib.make_dataset(data.arrays, idx, config.eval_batch_size, shuffle=False)
    # a data-parallel pipeline pads its last batch (dermflow.dataset.arrays): cut the padding off
    probs = np.asarray(model.predict(dataset, verbose=0), dtype=np.float32)[: len(idx)]
    if config.tta:
        flipped = data.arrays.images[idx][:, :, ::-1, :].astype(np.float32)
        padding = (-len(idx)) % config.eval_batch_size  # whole batches, as the pipeline's
        if padding:
            flipped = np.concatenate([flipped, np.zeros((padding, *flipped.shape[1:]), flipped.dtype)])
        flipped_probs = model.predict(flipped, batch_size=config.eval_batch_size, verbose=0)
        probs = (probs + np.asarray(flipped_probs, dtype=np.float32)[: len(idx)]) / 2
    return probs


def evaluate_best_epoch(manager: CheckpointManager, config: TrainConfig, data: PreparedData) -> Evaluation:
    """Load the chosen model (`chosen_model_key`) and score it on `test` and `verified_test`;
    the other candidate's test weighted F1 is recorded too (`Evaluation.candidates`), so the
    choice can be checked, never made, on test."""
    key, choice = chosen_model_key(manager, config)
    best_path = manager.fetch(key)
    best = keras.saving.load_model(best_path)
    arrays = data.arrays
    metrics: dict[str, dict | None] = {}
    predictions = []
    images, seconds = 0, 0.0
    for split in ("test", "verified_test"):
        idx = arrays.indices(split)
        if len(idx) == 0:
            metrics[split] = None
            continue
        began = time.perf_counter()
        probs = predict_split(best, config, data, idx)
        images, seconds = images + len(idx), seconds + time.perf_counter() - began
        metrics[split] = classification_metrics(arrays.labels[idx], probs, data.class_names,
                                                arrays.fitzpatrick_range[idx])
        predictions.append((split, idx, probs))
    rate = round(images / seconds, 2) if images and seconds > 0 else None  # compilation included
    candidates = candidate_scores(manager, config, data, choice, metrics.get("test"))
    return Evaluation(best_path, metrics, predictions, inference_images_per_second=rate, candidates=candidates)


def candidate_scores(manager: CheckpointManager, config: TrainConfig, data: PreparedData, choice: str,
                     chosen_test: dict | None) -> dict:
    """Val and test weighted F1 of the averaged and the best-epoch model, and which was kept."""
    from dermflow.metrics import weighted_f1

    state = manager.state
    out = {"chosen": choice, "tta": config.tta,
           "average": {"key": state.get("averaged_key"), "val_weighted_f1": state.get("averaged_score"),
                       "epochs": state.get("averaged_epochs")},
           "best_epoch": {"key": state.get("best_key"), "val_weighted_f1": state.get("best_score"),
                          "epoch": state.get("best_epoch")}}
    idx = data.arrays.indices("test")
    for name in ("average", "best_epoch"):
        key = out[name]["key"]
        if name == choice:
            out[name]["test_weighted_f1"] = None if chosen_test is None else chosen_test.get("weighted_f1")
        elif key and len(idx):
            other = keras.saving.load_model(manager.fetch(key))
            probs = predict_split(other, config, data, idx)
            out[name]["test_weighted_f1"] = weighted_f1(data.arrays.labels[idx], probs.argmax(axis=1))
    return out


def save_predictions(path: Path, data: PreparedData, evaluation: Evaluation) -> None:
    """The held-out predictions as an npz: md5hash, split, y_true, y_prob, fitzpatrick_range."""
    arrays, parts = data.arrays, evaluation.predictions
    if not parts:
        np.savez_compressed(
            path, md5hash=np.zeros(0, dtype=str), split=np.zeros(0, dtype=str), y_true=np.zeros(0, dtype=np.int64),
            y_prob=np.zeros((0, len(data.class_names)), dtype=np.float32), fitzpatrick_range=np.zeros(0, dtype=str),
        )
        return
    all_idx = np.concatenate([idx for _, idx, _ in parts])
    np.savez_compressed(
        path,
        md5hash=arrays.md5hash[all_idx].astype(str),
        split=np.concatenate([[split] * len(idx) for split, idx, _ in parts]).astype(str),
        y_true=arrays.labels[all_idx].astype(np.int64),
        y_prob=np.concatenate([probs for _, _, probs in parts]).astype(np.float32),
        fitzpatrick_range=arrays.fitzpatrick_range[all_idx].astype(str),
    )


def training_params(config: TrainConfig, run_id: str, split_key: str, data: PreparedData, runtime: Runtime,
                    manager: CheckpointManager, placement: Placement, throughput: dict) -> dict:
    """What decided this model (params.json): the config plus the data, machine and best epoch."""
    return {
        **config.to_dict(),
        "image_size_requested": config.image_size,
        "image_size": data.image_size,
        "run_id": run_id,
        "split_key": split_key,
        "split_digest": data.arrays.digest,
        "class_names": data.class_names,
        "class_weights_values": None if data.class_weights is None else [float(w) for w in data.class_weights],
        "split_sizes": {s: int(len(data.arrays.indices(s))) for s in data_lib.USED_SPLITS},
        "mixed_precision": runtime.mixed_precision,
        "jit_compile": runtime.jit_compile,
        "accelerator": runtime.accelerator,
        "device": placement.device,
        "throughput": throughput,
        "oom_retry": placement.oom_retry,
        "best_epoch": manager.state["best_epoch"],
        "best_val_weighted_f1": manager.state["best_score"],
        **_versions(),
    }


def write_outputs(store, run_id: str, architecture: str, evaluation: Evaluation, history: dict, params: dict,
                  predictions_path: Path) -> dict[str, str]:
    """Upload the model and its reports; returns their keys. The model goes last: its presence
    means the outputs are complete."""
    keys = {name: layout.model_key(run_id, architecture, file) for name, file in (
        ("model", layout.MODEL_FILE), ("metrics", "metrics.json"), ("history", "history.json"),
        ("params", "params.json"), ("predictions", "predictions.npz"))}
    store.put_json(keys["metrics"], evaluation.metrics)
    store.put_json(keys["history"], history)
    store.put_json(keys["params"], params)
    store.put_file(keys["predictions"], predictions_path)
    store.put_file(keys["model"], evaluation.best_path)
    return keys


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
    return {k: metrics.get(k) for k in HEADLINE_METRICS}


def summarize(store, config: TrainConfig, run_id: str, status: str, data: PreparedData, keys: dict[str, str],
              evaluation: Evaluation, manager: CheckpointManager, resumed_from: int, started: float,
              placement: Placement, throughput: dict) -> dict:
    """The JSON-able summary a training returns (and records in its state, for a rerun)."""
    return {
        "architecture": config.architecture,
        "status": status,
        "run_id": run_id,
        "image_size": data.image_size,
        "keys": keys,
        "uris": {name: store.uri(key) for name, key in keys.items()},
        "test": _headline(evaluation.metrics.get("test")),
        "verified_test": _headline(evaluation.metrics.get("verified_test")),
        "best_epoch": manager.state["best_epoch"],
        "best_val_weighted_f1": manager.state["best_score"],
        "model_choice": evaluation.candidates,
        "epochs_run": int(manager.state["epoch"]) - resumed_from,
        "epochs_total": int(manager.state["epoch"]),
        "resumed_from_epoch": resumed_from,
        "seconds": round(time.time() - started, 2),
        "device": placement.device,
        "throughput": throughput,
        "oom_retry": placement.oom_retry,
    }


# --------------------------------------------------------------------------- the OOM retry


def _train_once(manager: CheckpointManager, config: TrainConfig, data: PreparedData, run_id: str,
                runtime: Runtime, placement: Placement, progress: Progress | None):
    """Build (or resume) and train by the recipe, then score the best epoch."""
    with dtype_policy(runtime.mixed_precision), distribution_scope(config, placement):
        keras.utils.set_random_seed(config.seed)
        start = build_or_resume(manager, manager.load(), config, data, run_id)
        status, tail = run_phases(start, manager, config, data, jit_compile=runtime.jit_compile, progress=progress,
                                  timer=placement.timer)
        record_tail_average(start.model, tail, manager, config, data)
        evaluation = evaluate_best_epoch(manager, config, data)
    return start, status, evaluation


def train_with_oom_retry(manager: CheckpointManager, config: TrainConfig, data: PreparedData, run_id: str,
                         runtime: Runtime, placement: Placement, progress: Progress | None):
    """`_train_once`; after an allocation error, once more from the last checkpoint with half
    the batch size (recorded in `placement.oom_retry`). Returns (config used, its results)."""
    try:
        return config, _train_once(manager, config, data, run_id, runtime, placement, progress)
    except Exception as error:  # noqa: BLE001 - only an allocation error is retried, below
        smaller = config.batch_size // 2
        if not devices.is_allocation_error(error) or smaller < 1:
            raise
        log.warning("%s ran out of memory at batch size %d (%s); retrying once at %d", config.architecture,
                    config.batch_size, type(error).__name__, smaller)
        placement.oom_retry = {"batch_size": config.batch_size, "retry_batch_size": smaller,
                               "error": f"{type(error).__name__}: {str(error)[:300]}"}
        if progress:
            progress({"event": "oom_retry", "architecture": config.architecture, **placement.oom_retry})
    keras.backend.clear_session()  # free what the failed attempt held before building again
    config = config.model_copy(update={"batch_size": smaller,
                                       "eval_batch_size": max(1, min(config.eval_batch_size, smaller))})
    return config, _train_once(manager, config, data, run_id, runtime, placement, progress)


# --------------------------------------------------------------------------- the entry point


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
    check_run_id(run_id)  # it becomes a local directory below: no `../` out of the cache
    placement = check_placement(config, progress)  # require_gpu fails here, before any work
    settings = settings or get_settings()
    arch = config.architecture
    work_dir = Path(settings.local_cache_dir) / "runs" / run_id / arch  # local, not a bucket key
    manager = CheckpointManager(store, run_id, arch, work_dir / "checkpoints", settings.keep_checkpoints)
    previous = manager.load()
    finished = finished_summary(store, previous, run_id, arch)
    if finished is not None:
        return finished

    data = prepare_data(store, split_key, config, settings)
    runtime = choose_runtime(config)
    config, (start, status, evaluation) = train_with_oom_retry(manager, config, data, run_id, runtime, placement,
                                                               progress)
    predictions_path = work_dir / "outputs" / "predictions.npz"
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    save_predictions(predictions_path, data, evaluation)
    throughput = placement.throughput(len(data.arrays.indices("train")), evaluation)
    params = training_params(config, run_id, split_key, data, runtime, manager, placement, throughput)
    keys = write_outputs(store, run_id, arch, evaluation, manager.state.get("history", {}), params, predictions_path)
    summary = summarize(store, config, run_id, status, data, keys, evaluation, manager, start.done_epochs, started,
                        placement, throughput)
    manager.save_state(status="done", summary=summary)
    if progress:
        progress({"event": "done", **summary})
    return summary
