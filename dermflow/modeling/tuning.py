"""Hyperparameter search with keras-tuner: the hypermodel, three tuners, resumable searches.

- The search space lives in ONE place, `dermflow.modeling.search_space.sample_config`; the
  hypermodel only turns its values into `TrainConfig` fields and calls the ordinary builder
  (`dermflow.modeling.models.create_model`) and compile step
  (`dermflow.modeling.recipe.configure_phase`). So the best trial's values are a `TrainConfig`
  override that the final training (`derm-train`) takes as is.
- The objective is `val_weighted_f1`, computed by `dermflow.modeling.callbacks.ValWeightedF1`
  over the WHOLE validation split once per epoch (scikit-learn, not a batch average).
- Tuners: `random`, `hyperband`, `bayesian`. The first trial of every tuner runs the space's
  defaults (a known-good recipe), so even a one-trial budget returns a sound config, and the
  best trial replaces the defaults only when it scored higher (`tuning_results.best_config`).
- Resumable: keras-tuner writes its project to a local directory; `ProjectSync`
  (`dermflow.modeling.tuning_sync`) mirrors it to the search's prefix in the bucket after every
  trial and restores it before a search (`overwrite=False`), so a rerun with the same
  `tuning_id` continues where it stopped.
- Distributed: keras-tuner's chief/worker mode lives in `dermflow.modeling.tuning_distributed`;
  reading a finished search's trials in `dermflow.modeling.tuning_results`.
- Time budget: the tuning window is cut into at most `BUDGET_TRIAL_SLOTS` trial slots; a trial
  anneals by the end of its slot and stops there. Past `deadline` (or with less than most of a
  slot left) the oracle hands out no new trial; a trial the deadline cut short is marked
  `cut_off` and never chosen (`tuning_results`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np
from pydantic import Field

from dermflow import config, inputs
from dermflow.config import DEFAULT_TUNING_SHARE, TRAIN_DEFAULTS, ArchitectureName, TrainConfig
from dermflow.dataset import arrays as data_lib
from dermflow.errors import DermflowError
from dermflow.modeling import models, recipe
from dermflow.modeling.callbacks import TimeBudget, ValWeightedF1, phase_callbacks
from dermflow.modeling.search_space import (
    OBJECTIVE_NAME,
    objective,
    sample_config,
    search_space_signature,
)
from dermflow.modeling.tuners import DermHyperband, DermTuner, dist_role, oracle_class
from dermflow.modeling.tuning_results import annotate_choice, best_config, read_trials
from dermflow.modeling.tuning_sync import ProjectSync
from dermflow.runs import content_hash

log = logging.getLogger("dermflow.modeling.tuning")

# A trial stops after this many epochs without a better validation weighted F1 (once its
# schedule has annealed: `AnnealedEarlyStopping`, the rule the final training follows too).
TRIAL_PATIENCE = 3
# Under a deadline the tuning window is cut into at most this many equal trial slots: a trial
# anneals by the end of its slot and stops there, so one slow trial cannot take the window.
BUDGET_TRIAL_SLOTS = 3
# A trial's score is the mean validation weighted F1 of its last epochs (annealed, so stable),
# not its single best epoch: validation swings of +-0.15 make the best epoch a lottery.
SCORE_EPOCHS = 3
SEARCH_DEFAULTS = config.SearchOptions()
# Where searches keep their keras-tuner project directories, under the local cache (a local
# path; the bucket copy is at `layout.tuning_prefix`).
LOCAL_TUNING_DIR = "tuning"


class TuningError(DermflowError, RuntimeError):
    """A search cannot start or go on for a reason the caller can fix (permanent unless said)."""


@dataclass
class TrialData:
    """What a trial trains and validates on (bound to the hypermodel in training processes)."""

    arrays: data_lib.SplitArrays
    train_indices: np.ndarray
    val_indices: np.ndarray


class DermHyperModel(keras_tuner.HyperModel):
    """`build(hp)`: sample a config, build it with `create_model`, compile it like training does.

    `fit` trains the way `dermflow.modeling.train` does (same datasets, class weights, phases for
    pretrained backbones, validation weighted F1 callback first, time budget).
    `data` may be None where only the space is needed (the chief oracle).
    """

    def __init__(
        self,
        architecture: str,
        num_classes: int,
        image_size: int,
        weights: str = TRAIN_DEFAULTS.weights,
        *,
        batch_size: int = TRAIN_DEFAULTS.batch_size,
        seed: int = TRAIN_DEFAULTS.seed,
        deadline: float | None = None,
        data: TrialData | None = None,
        patience: int = TRIAL_PATIENCE,
        trial_seconds: float | None = None,
    ):
        super().__init__(name=f"derm-{architecture}", tunable=True)
        models.get_spec(architecture)
        self.architecture = architecture
        self.num_classes = int(num_classes)
        self.image_size = models.effective_image_size(architecture, image_size)
        self.weights = weights
        self.batch_size = batch_size
        self.seed = seed
        self.deadline = deadline
        self.data = data
        self.patience = patience
        self.trial_seconds = trial_seconds
        self.last_fit: dict = {}  # how the last trial ended (the tuner writes it to the trial's directory)

    def train_config(self, hp: keras_tuner.HyperParameters, epochs: int = 1) -> TrainConfig:
        fixed = dict(architecture=self.architecture, image_size=self.image_size, epochs=max(1, int(epochs)),
                     batch_size=self.batch_size, weights=self.weights, seed=self.seed, deadline=self.deadline,
                     patience=self.patience)
        return TrainConfig(**{**fixed, **sample_config(hp, self.architecture)})

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        config = self.train_config(hp)
        model = models.create_model(
            self.architecture, self.num_classes, self.image_size, config.weights,
            head_width=config.head_width, dropout=config.dropout, augment=config.augment,
            seed=config.seed, edge_mask=config.edge_mask, **config.arch_options,
        )
        first_phase = "warmup" if models.get_spec(self.architecture).pretrained else "full"
        recipe.configure_phase(model, first_phase, config, jit_compile=False)
        return model

    def trial_deadline(self, started: float) -> tuple[float | None, bool]:
        """(this trial's deadline, whether it is the tuning deadline rather than the trial's slot)."""
        own = started + self.trial_seconds if self.trial_seconds else None
        if self.deadline is None or (own is not None and own <= self.deadline):
            return own, False
        return self.deadline, True

    def fit(self, hp, model, *args, epochs: int = 1, initial_epoch: int = 0, callbacks=None, **kwargs):
        if self.data is None:
            raise TuningError("this hypermodel has no training data bound (a chief only serves the oracle)")
        started = time.time()
        deadline, tuning_bound = self.trial_deadline(started)
        config = self.train_config(hp, epochs).model_copy(update={"deadline": deadline})
        arrays = self.data.arrays
        class_weights = (
            data_lib.class_weights_from_labels(arrays.labels[self.data.train_indices], self.num_classes)
            if config.class_weights else None
        )
        train_data = data_lib.make_dataset(arrays, self.data.train_indices, config.batch_size, shuffle=True,
                                           seed=config.seed, class_weights=class_weights)
        val_data = data_lib.make_dataset(arrays, self.data.val_indices, config.eval_batch_size, shuffle=False)
        # ValWeightedF1 first: keras-tuner's own callbacks (after it) read the value from the logs.
        f1 = ValWeightedF1(val_data, arrays.labels[self.data.val_indices])
        budget = TimeBudget(deadline)
        merged: dict[str, list] = {}
        pretrained = models.get_spec(self.architecture).pretrained
        for phase, first, end in recipe.phases_for(config, pretrained):
            if end <= initial_epoch or budget.stopped:
                continue
            if phase == "finetune":
                recipe.configure_phase(model, phase, config, jit_compile=False)
            # A trial anneals by its last epoch or the end of its slot, whichever comes first.
            schedule, stop, _ = phase_callbacks(config, phase, first, end, deadline)
            history = model.fit(train_data, initial_epoch=max(first, initial_epoch), epochs=end,
                                callbacks=[*schedule, f1, *(callbacks or []), stop, budget], verbose=0)
            for name, values in history.history.items():
                merged.setdefault(name, []).extend(values)
        scores = [v for v in merged.get(OBJECTIVE_NAME, []) if not np.isnan(v)]
        # Cut off: the tuning deadline (not the trial's own slot or epochs) ended it early.
        self.last_fit = {"cut_off": bool(budget.stopped and tuning_bound), "epochs": len(scores),
                         "seconds": round(time.time() - started, 1)}
        if not scores:
            raise keras_tuner.errors.FailedTrialError("no epoch finished (deadline already passed)")
        return {OBJECTIVE_NAME: float(np.mean(scores[-SCORE_EPOCHS:]))}


class SearchSpec(config.ModelInput, config.SearchOptions):
    """Everything that decides one search (JSON-able; the chief and workers get the same).

    Input size, batch size, weights, tuner and trial count, with their defaults and bounds, come
    from `dermflow.config`; a bad value raises pydantic's ValidationError (a ValueError)."""

    architecture: ArchitectureName
    num_classes: int = Field(ge=2)
    trial_epochs: int = Field(5, ge=1, le=config.MAX_EPOCHS)
    seed: config.Seed = TRAIN_DEFAULTS.seed
    deadline: float | None = None
    # It names a local directory and a bucket prefix: no separators, no `..`.
    tuning_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    directory: str = Field(min_length=1, description="local parent of the keras-tuner project directory")
    patience: int = Field(TRIAL_PATIENCE, ge=1)
    trial_seconds: float | None = Field(None, gt=0, description="each trial's time cap (None: no cap)")

    @classmethod
    def from_dict(cls, values: dict) -> "SearchSpec":
        """A spec from its JSON form; a bad or unknown field is a TuningError naming it."""
        try:
            return cls.model_validate(dict(values))
        except ValueError as error:
            raise TuningError(f"bad search spec: {error}") from error

    @property
    def project_dir(self) -> Path:
        return Path(self.directory) / self.tuning_id

    def on_this_host(self, settings) -> "SearchSpec":
        """This spec with its project directory in this host's cache: a worker on another host
        gets the chief's spec, whose `directory` is a folder of the chief's host (the project
        itself travels through the bucket, `tuning/<tuning_id>/`)."""
        return self.model_copy(update={"directory": local_tuning_dir(settings)})

    def with_local_weights(self, store, settings) -> "SearchSpec":
        """This spec with `s3://` weights as a file in this host's cache (the tuning id, made
        from the URI, stays the same on every host)."""
        weights = inputs.weights_on_this_host(store, self.weights, settings.local_cache_dir)
        return self.model_copy(update={"weights": weights})


def local_tuning_dir(settings) -> str:
    """The parent of this host's keras-tuner project directories."""
    return str(Path(settings.local_cache_dir) / LOCAL_TUNING_DIR)


def make_tuner(spec: SearchSpec, data: TrialData | None = None, sync: ProjectSync | None = None):
    """The keras-tuner tuner for `spec`, restored from its project directory if one exists."""
    oracle_kwargs: dict[str, Any] = dict(objective=objective(), seed=spec.seed, max_consecutive_failed_trials=3)
    if spec.tuner == "hyperband":
        # Hyperband sizes its own trials; max_trials caps their number on top.
        oracle_kwargs.update(max_epochs=spec.trial_epochs, factor=3)
    else:
        oracle_kwargs.update(max_trials=spec.max_trials)
    oracle = oracle_class(spec.tuner)(**oracle_kwargs)
    oracle.deadline = spec.deadline
    oracle.trial_seconds = spec.trial_seconds
    oracle.start_with_defaults = True
    if spec.tuner == "hyperband":
        oracle.max_trials = spec.max_trials
    if sync is not None and dist_role() == "chief":
        oracle.after_end_trial = sync.push
    hypermodel = DermHyperModel(
        spec.architecture, spec.num_classes, spec.image_size, spec.weights, batch_size=spec.batch_size,
        seed=spec.seed, deadline=spec.deadline, data=data, patience=spec.patience,
        trial_seconds=spec.trial_seconds,
    )
    tuner_class = DermHyperband if spec.tuner == "hyperband" else DermTuner
    tuner = tuner_class(oracle=oracle, hypermodel=hypermodel, directory=spec.directory,
                        project_name=spec.tuning_id, overwrite=False)
    # A resumed oracle keeps the state it saved; the budget is this run's.
    tuner.oracle.deadline = spec.deadline
    tuner.oracle.trial_seconds = spec.trial_seconds
    tuner.oracle.max_trials = spec.max_trials
    tuner.project_sync = sync
    return tuner


# --------------------------------------------------------------------------- entry points


def default_tuning_id(architecture: str, split_key: str, tuner: str, image_size: int, weights: str) -> str:
    """Same architecture, data, tuner and space -> same id, so a rerun continues the search."""
    digest = content_hash(architecture, split_key, tuner, int(image_size), str(weights),
                          search_space_signature(architecture))[:12]
    return f"{architecture}-{tuner}-{digest}"


def load_training_arrays(store, split_key: str, image_size: int, settings) -> data_lib.SplitArrays:
    """The split manifest's images as cached arrays (the same cache `dermflow.modeling.train` uses)."""
    frame = store.get_dataframe_csv(split_key)
    class_names = recipe.check_training_data(frame, 2)
    return recipe.load_split_arrays(store, frame, image_size, settings, class_names)


def class_count(store, split_key: str) -> int:
    """The number of classes of a split manifest (no images read): what the chief needs."""
    return len(recipe.check_training_data(store.get_dataframe_csv(split_key), 2))


def trial_data(arrays: data_lib.SplitArrays) -> TrialData:
    val = arrays.indices("val")
    if len(val) == 0:
        raise TuningError("the split has no 'val' rows: the objective is the validation weighted F1")
    return TrialData(arrays, arrays.indices("train"), val)


def search(spec: SearchSpec, data: TrialData, sync: ProjectSync | None = None) -> dict:
    """Run (or continue) a search in this process; returns {"trials": [...], "best": {...}|None}."""
    if sync is not None:
        sync.pull()
    keras.utils.set_random_seed(spec.seed)
    tuner = make_tuner(spec, data, sync)
    before = len(tuner.oracle.trials)
    tuner.search(epochs=spec.trial_epochs)
    if sync is not None:
        sync.push()
    trials = read_trials(spec.project_dir, spec.architecture)
    log.info("%s: %d trial(s) (%d this run)", spec.tuning_id, len(trials), len(trials) - before)
    why = annotate_choice(trials)
    log.info("%s: the final training takes %s", spec.tuning_id, why)
    return {"trials": trials, "best": best_config(trials), "chosen": why}


def default_trial_epochs(epochs: int) -> int:
    """Epochs per trial: a sixth of the final training's, at least 2, at most 10."""
    return max(1, min(epochs, max(2, min(10, epochs // 6))))


def tune_architecture(
    store,
    split_key: str,
    architecture: str,
    *,
    tuner: str = SEARCH_DEFAULTS.tuner,
    max_trials: int = SEARCH_DEFAULTS.max_trials,
    trial_epochs: int | None = None,
    epochs: int = TRAIN_DEFAULTS.epochs,
    image_size: int = TRAIN_DEFAULTS.image_size,
    batch_size: int = TRAIN_DEFAULTS.batch_size,
    weights: str = TRAIN_DEFAULTS.weights,
    seed: int = TRAIN_DEFAULTS.seed,
    deadline: float | None = None,
    tuning_id: str | None = None,
    settings=None,
) -> dict:
    """Search (or continue searching) `architecture` on a split manifest, in this process.

    `deadline` is the tuning deadline (unix time; see `tuning_deadline`). The project is
    synced to `tuning/<tuning_id>/` after every trial. Returns `{"tuning_id", "trials",
    "best"}`; `best` is a TrainConfig override (None when no trial completed).
    """
    from dermflow.settings import get_settings

    settings = settings or get_settings()
    spec = make_spec(store, split_key, architecture, tuner=tuner, max_trials=max_trials, trial_epochs=trial_epochs,
                     epochs=epochs, image_size=image_size, batch_size=batch_size, weights=weights, seed=seed,
                     deadline=deadline, tuning_id=tuning_id, settings=settings)
    spec = spec.with_local_weights(store, settings)
    arrays = load_training_arrays(store, split_key, spec.image_size, settings)
    sync = ProjectSync(store, spec.tuning_id, spec.project_dir)
    result = search(spec, trial_data(arrays), sync)
    return {"tuning_id": spec.tuning_id, **result}


def make_spec(store, split_key: str, architecture: str, *, tuner: str = SEARCH_DEFAULTS.tuner,
              max_trials: int = SEARCH_DEFAULTS.max_trials, trial_epochs: int | None = None,
              epochs: int = TRAIN_DEFAULTS.epochs, image_size: int = TRAIN_DEFAULTS.image_size,
              batch_size: int = TRAIN_DEFAULTS.batch_size, weights: str = TRAIN_DEFAULTS.weights,
              seed: int = TRAIN_DEFAULTS.seed, deadline: float | None = None,
              tuning_id: str | None = None, settings=None) -> SearchSpec:
    """The SearchSpec of a search on a split manifest (class count read from the manifest)."""
    from dermflow.settings import get_settings

    settings = settings or get_settings()
    image_size = models.effective_image_size(architecture, image_size)
    tuning_id = tuning_id or default_tuning_id(architecture, split_key, tuner, image_size, weights)
    return SearchSpec(
        architecture=architecture, num_classes=class_count(store, split_key), image_size=image_size,
        weights=weights, tuner=tuner, max_trials=max_trials,
        trial_epochs=trial_epochs or default_trial_epochs(epochs), batch_size=batch_size, seed=seed,
        deadline=deadline, tuning_id=tuning_id, directory=local_tuning_dir(settings),
        trial_seconds=trial_slot_seconds(deadline, max_trials),
    )


def trial_slot_seconds(deadline: float | None, max_trials: int, now: float | None = None) -> float | None:
    """Each trial's time cap under a tuning deadline: the window cut into at most
    `BUDGET_TRIAL_SLOTS` equal slots (None without a deadline)."""
    if deadline is None:
        return None
    now = time.time() if now is None else now
    return max(1.0, deadline - now) / max(1, min(max_trials, BUDGET_TRIAL_SLOTS))


def tuning_deadline(deadline: float | None, share: float = DEFAULT_TUNING_SHARE, now: float | None = None) -> float | None:
    """The part of a whole-run deadline given to tuning (the rest is the final training's)."""
    if deadline is None:
        return None
    if not 0 < share <= 1:
        raise TuningError(f"tuning share must be within (0, 1], got {share}")
    now = time.time() if now is None else now
    return now + max(0.0, deadline - now) * share


def arrays_from_npz(path: Path) -> data_lib.SplitArrays:
    """SplitArrays from an `.npz` holding `images`, `labels`, `split`, `class_names` (tests, benches)."""
    with np.load(path, allow_pickle=False) as npz:
        images, labels, split, names = npz["images"], npz["labels"], npz["split"], npz["class_names"]
    return data_lib.SplitArrays(
        images=images, labels=labels.astype(np.int64), md5hash=np.array([str(i) for i in range(len(labels))]),
        split=split.astype(str), fitzpatrick_range=np.array(["unknown"] * len(labels)),
        class_names=[str(n) for n in names], image_size=int(images.shape[1]), array_path=path, digest="npz",
    )


def spec_payload(spec: SearchSpec, split_key: str | None = None) -> dict:
    return {"spec": spec.model_dump(), "split_key": split_key}
