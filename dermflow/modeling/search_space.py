"""The hyperparameter search space (the ONLY place it is defined) and the search's objective.

`sample_config(hp, architecture)` samples one point as `TrainConfig` fields, so the best
trial's values are an override the final training takes as is. The objective is
`val_weighted_f1` (`dermflow.modeling.callbacks.ValWeightedF1`: the whole validation split,
once per epoch), maximised.
"""

from __future__ import annotations

from typing import Any

import keras_tuner

from dermflow.modeling import models

OBJECTIVE_NAME = "val_weighted_f1"
SEARCH_SPACE_VERSION = 3


def objective() -> keras_tuner.Objective:
    return keras_tuner.Objective(OBJECTIVE_NAME, direction="max")


def sample_config(hp: keras_tuner.HyperParameters, architecture: str) -> dict[str, Any]:
    """Sample one point of the search space as `TrainConfig` fields (the ONLY place it is defined).

    Defaults are a strong small-data recipe; `random`/`bayesian` searches start from them.
    """
    spec = models.get_spec(architecture)
    # Defaults measured on atlas20 at 128 px from scratch on 2 CPU cores, 6 minutes of training
    # each (held-out weighted F1): a cosine-annealed rate 0.42-0.43 vs 0.23 at a constant one;
    # with flips 0.37, flips + translation 0.40, flips + mixup 0.38; width 1.0 0.30 (fewer
    # epochs fit). Batch norm with small batches learns fastest per second.
    # The ranges stay near that recipe (issue 17): a short budget has room for two or three
    # trials, and the wide space of version 2 spent them on useless points (rmsprop at 1.3e-4
    # with width 1.5: 0.04; adam at 0.08 without batch norm: 0.01). The schedule (cosine: the
    # constant rate lost by 0.2) and batch norm are fixed; widths over 1.0 fit too few epochs.
    config: dict[str, Any] = {
        "optimizer": hp.Choice("optimizer", ["adam", "adamw"], default="adam"),
        "learning_rate": hp.Float("learning_rate", 3e-4, 3e-3, sampling="log", default=1e-3),
        "lr_schedule": hp.Fixed("lr_schedule", "cosine"),
        "batch_size": hp.Choice("batch_size", [16, 32], default=16),
        "dropout": hp.Float("dropout", 0.1, 0.4, step=0.1, default=0.3),
        "head_width": hp.Choice("head_width", [128, 256], default=256),
        "label_smoothing": hp.Choice("label_smoothing", [0.0, 0.1], default=0.1),
        "class_weights": hp.Boolean("class_weights", default=True),
        "augment": hp.Boolean("augment", default=False),
        # Not searched: early stopping waits for the annealed schedule anyway
        # (`AnnealedEarlyStopping`), so patience only matters after it.
        "patience": hp.Fixed("patience", 10),
    }
    if spec.pretrained:
        # How many backbone blocks to fine-tune after the head warm-up, and how gently.
        config["fine_tune_blocks"] = hp.Int("fine_tune_blocks", 1, 4, default=2)
        config["fine_tune_learning_rate"] = hp.Float(
            "fine_tune_learning_rate", 1e-6, 1e-4, sampling="log", default=1e-5
        )
    else:
        config["arch_options"] = {
            "width_multiplier": hp.Choice("width_multiplier", [0.5, 0.75], default=0.5),
            "depth": hp.Int("depth", 4, 5, default=4),
            "batch_norm": hp.Fixed("batch_norm", True),
        }
    return config


def search_space_signature(architecture: str) -> dict:
    """A JSON description of the space (names, kinds, ranges): part of the default tuning id."""
    hp = keras_tuner.HyperParameters()
    sample_config(hp, architecture)
    return {"version": SEARCH_SPACE_VERSION, "space": [p.get_config() for p in hp.space]}


def config_from_values(architecture: str, values: dict[str, Any]) -> dict[str, Any]:
    """A trial's recorded hyperparameter values -> `TrainConfig` fields (tuner/* keys dropped)."""
    hp = keras_tuner.HyperParameters()
    sample_config(hp, architecture)
    known = {p.name for p in hp.space}
    hp.values.update({k: v for k, v in values.items() if k in known})
    return sample_config(hp, architecture)
