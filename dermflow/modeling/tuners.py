"""keras-tuner's oracles and tuners as dermflow's searches use them (`dermflow.modeling.tuning`).

- `oracle_class(kind)`: keras-tuner's random, Hyperband or Bayesian oracle with the budget
  rules: no new trial past the deadline or with less than most of a trial slot left, the
  space's defaults as the first trial of every tuner, and a hook after every finished trial
  (the chief's bucket sync).
- `DermTuner` / `DermHyperband`: keras-tuner's tuners that pull the project before a trial
  (workers) and push it after, and write how each trial ended (`cut_off` or not) next to its
  `trial.json` for the trial table.
- `dist_role()`: chief, worker or local, from keras-tuner's environment variables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import keras_tuner
from keras_tuner.src.engine.trial import TrialStatus

from dermflow.modeling.tuning_results import TRIAL_INFO_FILE
from dermflow.modeling.tuning_sync import ProjectSync

log = logging.getLogger("dermflow.modeling.tuning")


class _BudgetedOracle:
    """Oracle mixin: no new trial past `deadline` (nor when less than most of a trial slot is
    left); the first trial of every tuner runs the space's defaults (a known-good recipe, so
    even a one-trial budget returns a sound config); `after_end_trial` (the chief's bucket
    sync) runs after every finished trial."""

    deadline: float | None = None
    trial_seconds: float | None = None
    start_with_defaults: bool = False
    after_end_trial: Callable[[], Any] | None = None

    def populate_space(self, trial_id):
        left = None if self.deadline is None else self.deadline - time.time()
        # A trial started with little of its slot left would only be cut off (and not count).
        if left is not None and (left <= 0 or (self.trial_seconds and left < 0.8 * self.trial_seconds)):
            log.info("tuning deadline reached: no new trial")
            return {"status": TrialStatus.STOPPED, "values": None}
        return super().populate_space(trial_id)

    def _random_values(self):
        # Every tuner draws its new points here (random, Bayesian's initial points, Hyperband's
        # first round): the very first point is the space's defaults.
        if self.start_with_defaults and not self.trials:
            return default_values(self.hyperparameters)
        return super()._random_values()

    def end_trial(self, trial):
        result = super().end_trial(trial)
        if self.after_end_trial is not None:
            try:
                self.after_end_trial()
            except Exception as error:  # noqa: BLE001 - a failed sync must not kill the search
                log.warning("tuning sync after trial %s failed: %s", trial.trial_id, error)
        return result


def default_values(space: keras_tuner.HyperParameters) -> dict:
    """The default of every active hyperparameter of `space`."""
    hps = keras_tuner.HyperParameters()
    values = {}
    for hp in space.space:
        hps.merge([hp])
        if hps.is_active(hp):
            values[hp.name] = hp.default
            hps.values[hp.name] = hp.default
    return values


def oracle_class(kind: str) -> type:
    """keras-tuner's oracle of `kind` (random, hyperband, bayesian) with the budget rules above."""
    base = {
        "random": keras_tuner.oracles.RandomSearchOracle,
        "hyperband": keras_tuner.oracles.HyperbandOracle,
        "bayesian": keras_tuner.oracles.BayesianOptimizationOracle,
    }[kind]
    return type(f"Budgeted{base.__name__}", (_BudgetedOracle, base), {})


class _SyncingTunerMixin:
    """Tuner mixin: pull the project before each trial (Hyperband continues other workers'
    trials), push it after each trial."""

    project_sync: ProjectSync | None = None

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        # keras-tuner imports tensorboard (not installed with tensorflow-cpu) even when no
        # TensorBoard callback is present; only do its per-trial log dirs when one is.
        if any(isinstance(callback, keras.callbacks.TensorBoard) for callback in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)

    def on_trial_begin(self, trial):
        if self.project_sync is not None and dist_role() == "worker":
            with contextlib.suppress(Exception):
                self.project_sync.pull()
        return super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        # How the trial ended (cut off by the tuning deadline or not), next to keras-tuner's
        # trial.json, so the trial table can mark it and `best_config` can pass it over.
        info = getattr(self.hypermodel, "last_fit", None)
        if info:
            path = Path(self.get_trial_dir(trial.trial_id)) / TRIAL_INFO_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(info))
            self.hypermodel.last_fit = {}
        super().on_trial_end(trial)
        if self.project_sync is not None:
            try:
                self.project_sync.push()
            except Exception as error:  # noqa: BLE001 - the next push retries the same files
                log.warning("tuning sync after trial %s failed: %s", trial.trial_id, error)


class DermTuner(_SyncingTunerMixin, keras_tuner.Tuner):
    """Random search and Bayesian optimization (the oracle decides)."""


class DermHyperband(_SyncingTunerMixin, keras_tuner.Hyperband):
    """Hyperband: keras-tuner's epoch bookkeeping and checkpoint reloads, with the sync."""

    def __init__(self, oracle, hypermodel, **kwargs):
        keras_tuner.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)


def dist_role() -> str:
    """"chief", "worker" or "local", from keras-tuner's environment variables."""
    from keras_tuner.src.distribute import utils as dist_utils

    if not dist_utils.has_chief_oracle():
        return "local"
    return "chief" if dist_utils.is_chief_oracle() else "worker"
