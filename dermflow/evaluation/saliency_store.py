"""The Grad-CAM maps of a model's report examples, computed where the model trained and kept in
the bucket (`runs/<run_id>/models/<arch>/saliency.npz`), so the report's process runs no model.

`compute_example_saliency` runs in the `derm-train` flow run after training, on its GPU: it
picks the images the report would show for this model (`report_figures.example_md5hashes`, from
its held-out predictions) and stores one map each (uint8, 0-255). `load_example_saliency`
is what the report reads back.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dermflow import layout
from dermflow.storage import ObjectStore


def _test_result(store: ObjectStore, run_id: str, architecture: str):
    """The model's `test` predictions as the report's ArchResult (None without test rows)."""
    from dermflow.evaluation.report import ArchResult, predictions_from_npz

    params = store.get_json(layout.model_key(run_id, architecture, "params.json"))
    splits = predictions_from_npz(store.get_bytes(layout.model_key(run_id, architecture, "predictions.npz")))
    if "test" not in splits or len(splits["test"].y_true) == 0:
        return None
    return ArchResult.from_predictions(list(params["class_names"]), test=splits["test"])


def compute_example_saliency(store: ObjectStore, run_id: str, architecture: str, cache_dir: Path) -> dict:
    """Grad-CAM of each report example of this model, stored at its saliency key."""
    from dermflow.evaluation.predict import load_image_array, load_model_bundle
    from dermflow.evaluation.report_figures import example_md5hashes
    from dermflow.evaluation.saliency import grad_cam

    result = _test_result(store, run_id, architecture)
    md5s = example_md5hashes(result) if result is not None else []
    maps = []
    if md5s:
        bundle = load_model_bundle(store, run_id, architecture, cache_dir)
        for md5 in md5s:
            image = load_image_array(store.get_bytes(layout.image_key(md5)), bundle.image_size)
            maps.append(np.round(np.clip(grad_cam(bundle.model, image), 0, 1) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, md5hash=np.asarray(md5s, dtype=str),
                        heatmaps=np.stack(maps) if maps else np.zeros((0, 1, 1), dtype=np.uint8))
    key = layout.model_key(run_id, architecture, layout.SALIENCY_FILE)
    store.put_bytes(key, buffer.getvalue())
    return {"key": key, "images": len(md5s)}


def load_example_saliency(store: ObjectStore, run_id: str, architecture: str) -> dict[str, np.ndarray] | None:
    """md5hash -> heatmap in [0, 1], as the trainer stored them; None when it stored none
    (a model trained before the maps moved to the trainer)."""
    key = layout.model_key(run_id, architecture, layout.SALIENCY_FILE)
    if not store.exists(key):
        return None
    with np.load(io.BytesIO(store.get_bytes(key))) as data:
        return {str(md5): heatmap.astype(np.float32) / 255.0 for md5, heatmap in zip(data["md5hash"], data["heatmaps"])}
