"""Typed vocabulary of the flows' parameters, light enough to import anywhere (no Keras).

`ArchitectureName` mirrors the registry in `dermflow.models` (a unit test keeps them equal), so
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
