"""What a run report is built from and what it gives: one split's predictions (and the reader of
`predictions.npz`), one architecture's outcome, the report's inputs and the built report."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermflow.errors import DermflowError


class ReportInputError(DermflowError, ValueError):
    """Predictions or outcomes a report cannot be built from (wrong shapes, missing arrays).
    Permanent: building the same report again fails the same way."""


@dataclass
class Predictions:
    """One split's predictions: class indices, probabilities (n x classes), image ids, ranges.

    `md5hash` may be None (no thumbnails then); `fitzpatrick_range` may be None (no per-range metrics).
    """

    y_true: np.ndarray
    y_prob: np.ndarray
    md5hash: np.ndarray | None = None
    fitzpatrick_range: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=int)
        self.y_prob = np.asarray(self.y_prob, dtype=float)
        n = len(self.y_true)
        self.md5hash = np.asarray(self.md5hash if self.md5hash is not None else [""] * n, dtype=str)
        if self.fitzpatrick_range is not None:
            self.fitzpatrick_range = np.asarray(self.fitzpatrick_range, dtype=str)
        for name in ("md5hash", "fitzpatrick_range"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ReportInputError(f"predictions: {name} has {len(value)} rows; y_true has {n}")
        if self.y_prob.ndim != 2 or self.y_prob.shape[0] != n:
            raise ReportInputError(f"predictions: y_prob has shape {self.y_prob.shape}; expected ({n}, classes)")

    @property
    def y_pred(self) -> np.ndarray:
        return self.y_prob.argmax(axis=1) if len(self.y_true) else np.zeros(0, dtype=int)


def predictions_from_npz(data: bytes | Mapping[str, np.ndarray]) -> dict[str, Predictions]:
    """`predictions.npz` (bytes or loaded arrays; see DESIGN.md) -> {split: Predictions}."""
    arrays = np.load(io.BytesIO(data), allow_pickle=False) if isinstance(data, (bytes, bytearray)) else data
    missing = {"md5hash", "split", "y_true", "y_prob", "fitzpatrick_range"} - set(arrays.keys())
    if missing:
        raise ReportInputError(f"predictions.npz lacks arrays: {sorted(missing)}")
    split = np.asarray(arrays["split"]).astype(str)
    return {
        name: Predictions(
            y_true=np.asarray(arrays["y_true"])[split == name],
            y_prob=np.asarray(arrays["y_prob"])[split == name],
            md5hash=np.asarray(arrays["md5hash"])[split == name],
            fitzpatrick_range=np.asarray(arrays["fitzpatrick_range"])[split == name],
        )
        for name in dict.fromkeys(split.tolist())
    }


@dataclass
class ArchResult:
    """One architecture's outcome.

    `status` "ok" needs `class_names` and the test predictions (`y_true`, `y_prob`, `md5hash`,
    `fitzpatrick_range`); the `verified_*` arrays are optional. "failed" needs `error`.
    """

    status: str
    error: str | None = None
    class_names: Sequence[str] = ()
    y_true: np.ndarray | None = None
    y_prob: np.ndarray | None = None
    md5hash: np.ndarray | None = None
    fitzpatrick_range: np.ndarray | None = None
    verified_y_true: np.ndarray | None = None
    verified_y_prob: np.ndarray | None = None
    verified_md5hash: np.ndarray | None = None
    verified_fitzpatrick_range: np.ndarray | None = None
    history: Mapping[str, Sequence[float]] = field(default_factory=dict)
    seconds: float | None = None
    # where it trained: {"device", "backend", "train_images_per_second", "inference_images_per_second",
    # "oom_retry", "warnings"} (from the model's params.json; None for an older model)
    placement: Mapping[str, Any] | None = None

    @property
    def test(self) -> Predictions | None:
        if self.y_true is None or self.y_prob is None:
            return None
        return Predictions(self.y_true, self.y_prob, self.md5hash, self.fitzpatrick_range)

    @property
    def verified_test(self) -> Predictions | None:
        if self.verified_y_true is None or self.verified_y_prob is None:
            return None
        return Predictions(self.verified_y_true, self.verified_y_prob, self.verified_md5hash,
                           self.verified_fitzpatrick_range)

    @classmethod
    def from_predictions(cls, class_names: Sequence[str], test: Predictions, verified_test: Predictions | None = None,
                         **fields: Any) -> "ArchResult":
        """An "ok" result from `Predictions` (e.g. from `predictions_from_npz`)."""
        verified: dict[str, Any] = {}
        if verified_test is not None:
            verified = {"verified_y_true": verified_test.y_true, "verified_y_prob": verified_test.y_prob,
                        "verified_md5hash": verified_test.md5hash,
                        "verified_fitzpatrick_range": verified_test.fitzpatrick_range}
        return cls(status="ok", class_names=list(class_names), y_true=test.y_true, y_prob=test.y_prob,
                   md5hash=test.md5hash, fitzpatrick_range=test.fitzpatrick_range, **verified, **fields)


@dataclass
class ReportInputs:
    """Everything one run's report is built from; the callables are optional extras (thumbnails, saliency)."""

    run_id: str
    params: Mapping[str, Any]
    data_summary: Mapping[str, Any]
    architectures: Mapping[str, ArchResult]
    tuning_trials: Sequence[Mapping[str, Any]] | None = None  # {trial_id, hyperparameters, score}
    retrain_decision: Mapping[str, Any] | None = None  # {champion_score, challenger_score, promoted, reason}
    load_image: Callable[[str], bytes] | None = None  # md5hash -> image bytes (thumbnails)
    saliency: Callable[[str], np.ndarray | None] | None = None  # md5hash -> heatmap in [0, 1]
    label_groups: Mapping[str, str] | None = None  # label -> group (e.g. nine_partition_label)


@dataclass
class Report:
    """A built report: the page, its figures (name -> PNG), metrics.json, and the Prefect artifacts' content."""

    html: str
    figures: dict[str, bytes]
    metrics: dict
    summary_markdown: str
    table_rows: list[dict]
