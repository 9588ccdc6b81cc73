"""Typed vocabulary of the flows' parameters, light enough to import anywhere (no Keras).

`ArchitectureName` mirrors the registry in `dermflow.modeling.models` (a unit test keeps them equal), so
the Prefect UI offers a dropdown and a typo fails parameter validation before any work starts.
"""

from __future__ import annotations

from typing import Literal

DEFAULT_CSV_URL = "https://raw.githubusercontent.com/mattgroh/fitzpatrick17k/main/fitzpatrick17k.csv"

ArchitectureName = Literal[
    "baseline_cnn",
    "vgg16",
    "vgg19",
    "resnet50v2",
    "inception_v3",
    "efficientnetv2_b0",
    "convnext_tiny",
]
# The five architectures the student report compared.
REPORT_ARCHITECTURES: list[str] = ["baseline_cnn", "vgg16", "vgg19", "resnet50v2", "inception_v3"]

Mode = Literal["full", "fetch", "refetch", "retrain"]
TunerName = Literal["random", "hyperband", "bayesian"]
TaskRunnerName = Literal["threads", "dask"]

DEFAULT_EPOCHS = 30
MAX_EPOCHS = 1000


def resolve_epochs(epochs: int | None, budget_minutes: float | None) -> int:
    """The final training's epochs: as given; else 30, or, under a time budget, as many as the
    budget allows (`MAX_EPOCHS` as the cap; the learning rate anneals by the budget's end)."""
    if epochs is not None:
        return epochs
    return MAX_EPOCHS if budget_minutes else DEFAULT_EPOCHS
