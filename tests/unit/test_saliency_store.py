"""The report's Grad-CAM maps are computed by the trainer (`derm-train`) and read back by the
report from the bucket (issue 16: the report's process runs no model)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.unit

keras = pytest.importorskip("keras")

from dermflow import layout  # noqa: E402
from dermflow.evaluation.report import ArchResult, predictions_from_npz  # noqa: E402
from dermflow.evaluation.report_figures import example_md5hashes  # noqa: E402
from dermflow.evaluation.saliency_store import compute_example_saliency, load_example_saliency  # noqa: E402
from dermflow.modeling import train  # noqa: E402
from tests.unit.test_train_steps import SPLIT_KEY, setup, tiny_config  # noqa: E402,F401

RUN_ID = "20260101-000000-cam"


def test_the_trainer_stores_a_map_per_report_example_and_the_report_reads_them(setup, monkeypatch):
    import tasks.report as report_task

    store, settings = setup
    train.train_architecture(store, SPLIT_KEY, tiny_config(epochs=1), RUN_ID, settings)
    assert load_example_saliency(store, RUN_ID, "baseline_cnn") is None  # not computed yet

    stored = compute_example_saliency(store, RUN_ID, "baseline_cnn", settings.local_cache_dir / "models")
    assert stored["key"] == layout.model_key(RUN_ID, "baseline_cnn", layout.SALIENCY_FILE)
    params = store.get_json(layout.model_key(RUN_ID, "baseline_cnn", "params.json"))
    test = predictions_from_npz(store.get_bytes(layout.model_key(RUN_ID, "baseline_cnn", "predictions.npz")))["test"]
    expected = example_md5hashes(ArchResult.from_predictions(params["class_names"], test=test))
    maps = load_example_saliency(store, RUN_ID, "baseline_cnn")
    assert expected and list(maps) == expected and stored["images"] == len(expected)
    assert all(m.ndim == 2 and 0 <= m.min() and m.max() <= 1 for m in maps.values())

    # the report task looks the maps up; it loads no model (Keras' loader would fail here)
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: pytest.fail("the report loaded a model"))
    monkeypatch.setattr(report_task, "get_run_logger", lambda: None)
    outcome = {"architecture": "baseline_cnn", "status": "ok", "run_id": RUN_ID, "test": {"weighted_f1": 0.5}}
    saliency = report_task._best_model_saliency(store, RUN_ID, [outcome])
    np.testing.assert_array_equal(saliency(expected[0]), maps[expected[0]])
    assert saliency("not-an-example") is None
