"""The Keras callbacks of a training: validation weighted F1, the time budget, the learning-rate
schedule, the early-stopping rule that waits for the schedule to anneal, the average of the
weights over the annealed tail, and the per-epoch checkpoint with progress events.

Only Keras 3 APIs are used, so they work on every backend.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import keras
import numpy as np

from dermflow.config import TrainConfig
from dermflow.metrics import weighted_f1
from dermflow.modeling.checkpoints import CheckpointManager, scalar_logs
from dermflow.modeling.recipe import phase_learning_rate

log = logging.getLogger("dermflow.modeling.train")

Progress = Callable[[dict], None]


class EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch's training steps (put it before ValWeightedF1, whose validation
    pass at the epoch's end should not count): the training throughput."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._began: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self._began is not None:
            self.seconds.append(time.perf_counter() - self._began)
            self._began = None

    def images_per_second(self, images_per_epoch: int) -> float | None:
        """Per epoch's images over the median epoch, the first (XLA compilation) left out when
        others exist."""
        steady = self.seconds[1:] or self.seconds
        if not steady or images_per_epoch <= 0:
            return None
        return round(images_per_epoch / float(np.median(steady)), 2)


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
        probs = probs[: len(self.y_true)]  # a data-parallel pipeline pads its last batch (arrays.py)
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
        self._epoch_started = time.time()
        self._epoch_seconds = 0.0  # the last finished epoch's length

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
            # TimeBudget ends training when another epoch would overrun, so the schedule's end is
            # the end of the last epoch that fits: the deadline less one epoch's length (hence
            # the floor is reached within the last epoch instead of an epoch after training ends).
            end = self.deadline - self._epoch_seconds
            by_time = (time.time() - self._started) / max(end - self._started, 1e-9)
        return max(by_epochs, by_time)

    def on_train_begin(self, logs=None):
        self._started = time.time()
        steps = (self.params or {}).get("steps")
        self._steps = int(steps) if steps else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_seconds = time.time() - self._epoch_started
        self._epoch = epoch + 1

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.rate_at(self.progress(batch))

    def annealed(self) -> bool:
        """The schedule has reached its end (the rate is at its floor, or the next epoch would be
        past the deadline). Early stopping waits for it: before, validation scores are erratic
        by design, and stopping there keeps a model trained at a high rate (issue 17)."""
        if self.deadline is not None and time.time() + self._epoch_seconds >= self.deadline:
            return True
        return self.progress(0) >= 1.0


def schedule_callbacks(config: TrainConfig, phase: str, first_epoch: int, end_epoch: int,
                       deadline: float | None) -> list[keras.callbacks.Callback]:
    """The learning-rate callbacks of one phase (none for a constant rate)."""
    if config.lr_schedule == "constant":
        return []
    return [CosineSchedule(phase_learning_rate(phase, config), first_epoch, end_epoch, deadline=deadline,
                           warmup_fraction=config.lr_warmup_fraction)]


def phase_callbacks(config: TrainConfig, phase: str, first_epoch: int, end_epoch: int, deadline: float | None
                    ) -> tuple[list[keras.callbacks.Callback], AnnealedEarlyStopping, TailAverage]:
    """What trials and final trainings both use for one phase: the schedule, the early-stopping
    rule that waits for it, and the tail average. Order them: schedule, validation F1, stopping."""
    schedule = schedule_callbacks(config, phase, first_epoch, end_epoch, deadline)
    cosine = schedule[0] if schedule else None
    return schedule, AnnealedEarlyStopping(config.patience, cosine), TailAverage(cosine)


class AnnealedEarlyStopping(keras.callbacks.Callback):
    """The one early-stopping rule of trials and final trainings: stop after `patience` epochs
    without a better `monitor` value, but only once the learning-rate schedule has annealed
    (`CosineSchedule.annealed`; at once with a constant rate, `schedule=None`).

    Under a deadline the cosine schedule anneals by the deadline, so a budgeted training runs
    until its budget is used and its rate is at the floor, however noisy validation is. Put it
    after the schedule and the callback that fills `monitor`."""

    def __init__(self, patience: int, schedule: "CosineSchedule | None" = None, monitor: str = "val_weighted_f1"):
        super().__init__()
        self.patience = int(patience)
        self.schedule = schedule
        self.monitor = monitor
        self.stopped = False
        self._best = -math.inf
        self._since = 0

    def on_train_begin(self, logs=None):
        self._best, self._since, self.stopped = -math.inf, 0, False

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.monitor, float("nan")))
        if not math.isnan(value) and value > self._best:
            self._best, self._since = value, 0
        else:
            self._since += 1
        may_stop = self.schedule is None or self.schedule.annealed()
        if self._since >= self.patience and may_stop:
            self.stopped = True
            self.model.stop_training = True


class TailAverage(keras.callbacks.Callback):
    """Stochastic weight averaging over the annealed tail of a schedule: the mean of the model's
    weights (BatchNormalization statistics included) at the end of every epoch from
    `start_progress` of the schedule on (none with a constant rate: it has no annealed tail).

    A robust model choice where validation is noisy: one best epoch on a few hundred validation
    images is a lottery (epoch-to-epoch swings of +-0.15 on atlas20), the tail's average is not.
    `count` is how many epochs went into it; `averaged_weights()` is None before any."""

    def __init__(self, schedule: "CosineSchedule | None", start_progress: float = 0.75):
        super().__init__()
        self.schedule = schedule
        self.start_progress = start_progress
        self.count = 0
        self._sum: list[np.ndarray] | None = None

    def in_tail(self) -> bool:
        if self.schedule is None:  # a constant rate has no annealed tail to average
            return False
        return self.schedule.annealed() or self.schedule.progress(0) >= self.start_progress

    def on_epoch_end(self, epoch, logs=None):
        if not self.in_tail():
            return
        weights = [np.asarray(w, dtype=np.float64) for w in self.model.get_weights()]
        if self._sum is None:
            self._sum = weights
        else:
            self._sum = [total + w for total, w in zip(self._sum, weights)]
        self.count += 1

    def averaged_weights(self) -> list[np.ndarray] | None:
        if self._sum is None:
            return None
        return [total / self.count for total in self._sum]


class EpochCheckpoint(keras.callbacks.Callback):
    """Checkpoints every epoch, tracks the best val weighted F1 and reports progress."""

    def __init__(self, manager: CheckpointManager, phase: str, progress: Progress | None,
                 total_epochs: int, architecture: str):
        super().__init__()
        self.manager = manager
        self.phase = phase
        self.progress = progress
        self.total_epochs = total_epochs
        self.architecture = architecture
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
        log.info(
            "%s %s epoch %d/%d: loss %.4f val_weighted_f1 %.4f%s",
            self.architecture, self.phase, number, self.total_epochs, logs.get("loss", float("nan")),
            logs.get("val_weighted_f1", float("nan")), " (best)" if improved else "",
        )
        if self.progress:
            self.progress({
                "event": "epoch_end", "architecture": self.architecture, "phase": self.phase, "epoch": number,
                "epochs": self.total_epochs, "logs": scalar_logs(logs), "improved": improved,
                "best_score": state["best_score"], "best_epoch": state["best_epoch"],
                "checkpoint_key": self.manager.key_for(number),
            })
