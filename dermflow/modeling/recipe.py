"""The transfer-learning recipe: optimizers, learning rates and phases of one training, and
the checks a split must pass before training.

A pretrained backbone trains in two phases: a head warm-up on the frozen backbone, then the
top of the backbone at a lower learning rate with BatchNormalization frozen; `baseline_cnn`
trains whole in one phase. Used by the final training (`dermflow.modeling.train`) and by every
tuning trial (`dermflow.modeling.tuning`), so both train the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import keras

from dermflow import layout
from dermflow.config import LRScheduleName, TrainConfig
from dermflow.dataset import arrays as data_lib
from dermflow.errors import DermflowError
from dermflow.modeling import models


class TrainingError(DermflowError, RuntimeError):
    """Training cannot start or continue for a reason the caller can fix (data, config):
    permanent, so a task does not retry it."""


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


def phases_for(config: TrainConfig, pretrained: bool) -> list[tuple[str, int, int]]:
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
    return phases_for(config, models.get_spec(config.architecture).pretrained)


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


def load_split_arrays(store, frame, image_size: int, settings, class_names: list[str]) -> data_lib.SplitArrays:
    """The images of a (checked) split manifest, from the bucket through the local cache into one
    cached uint8 array: what the final training and every tuning trial read."""
    used = frame[frame["split"].isin(data_lib.USED_SPLITS)]
    stored_keys = used["key"] if "key" in used.columns else [""] * len(used)
    keys = {md5: (key or layout.image_key(md5)) for md5, key in zip(used["md5hash"], stored_keys)}
    paths = data_lib.cache_images_from_store(store, keys, settings.local_cache_dir)
    try:
        return data_lib.prepare_split_arrays(frame, paths.__getitem__, image_size, settings.local_cache_dir,
                                             class_names)
    except data_lib.DataError as error:
        raise TrainingError(str(error)) from error
