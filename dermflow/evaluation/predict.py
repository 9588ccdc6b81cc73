"""Inference with trained models: image decoding shared with training, loading a registered
model, predicting images (files or URLs), and evaluating a labelled set the user brings.

`dermflow.ingestion.images.load_image_array` is THE decoder: training and inference both use it, so a
model sees images prepared the same way in both. Models take float images 0-255 of shape
(size, size, 3) and do their own preprocessing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermflow.errors import DermflowError
from dermflow.ingestion.images import ImageDecodeError, load_image_array  # noqa: F401 - re-exported
from dermflow.ingestion.ingest import fitzpatrick_range
from dermflow.layout import image_key
from dermflow.metrics import classification_metrics
from dermflow.registry.runs import resolve_model
from dermflow.runs import check_run_id
from dermflow.storage import ObjectStore, StorageError

if TYPE_CHECKING:
    import pandas as pd

ProgressCallback = Callable[[int, int], None]  # (done, total)

REQUIRED_EVAL_COLUMNS = ("md5hash", "label", "fitzpatrick_scale")
_DECODE_THREADS = 4
PREDICT_BATCH_SIZE = 32  # images per forward pass of the predict and evaluate commands
ARCH_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class EvaluationError(DermflowError, ValueError):
    """A labelled set that cannot be evaluated (bad CSV, nothing usable), or images or a model
    output of the wrong shape."""


# --- models ---------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    """A loaded model and what is needed to use it."""

    model: Any
    run_id: str
    arch: str
    class_names: list[str]
    image_size: int
    params: dict = field(default_factory=dict)
    model_path: Path | None = None
    model_key: str | None = None

    def describe(self) -> dict:
        return {
            "run_id": self.run_id,
            "arch": self.arch,
            "model_key": self.model_key,
            "image_size": self.image_size,
            "n_classes": len(self.class_names),
        }


def load_keras_model(path: Path | str):
    """`keras.saving.load_model` after registering dermflow's custom layers."""
    import keras

    try:
        import dermflow.modeling.models  # noqa: F401 - registers custom layers/objects for deserialization
    except ModuleNotFoundError as error:
        if error.name != "dermflow.modeling.models":
            raise
    return keras.saving.load_model(str(path), compile=False)


def bundle_from_model(model: Any, params: dict, *, run_id: str = "local", arch: str = "model") -> ModelBundle:
    """A bundle around an in-memory model (tests, the training flow's evaluation)."""
    class_names = [str(name) for name in params["class_names"]]
    return ModelBundle(
        model=model,
        run_id=run_id,
        arch=arch,
        class_names=class_names,
        image_size=int(params["image_size"]),
        params=dict(params),
    )


def load_model_bundle(
    store: ObjectStore,
    run: str | None = None,
    arch: str | None = None,
    cache_dir: Path | str | None = None,
) -> ModelBundle:
    """Resolve a model (see `registry.resolve_model`), download its model.keras into
    `cache_dir/<run_id>/<arch>/` once, and load it."""
    run_id, arch, key, params = resolve_model(store, run, arch)
    check_run_id(run_id)  # both become local directories below
    if not ARCH_NAME_PATTERN.fullmatch(arch):
        raise EvaluationError(f"invalid architecture name {arch[:64]!r}: letters, digits, '_' and '-' only")
    if cache_dir is None:
        from dermflow.settings import get_settings

        cache_dir = get_settings().local_cache_dir / "models"
    local = Path(cache_dir) / run_id / arch / "model.keras"
    if not local.exists():
        store.download_file(key, local)  # atomic: an interrupted download leaves no model.keras
    bundle = bundle_from_model(load_keras_model(local), params, run_id=run_id, arch=arch)
    bundle.model_path = local
    bundle.model_key = key
    return bundle


def _softmax_if_needed(outputs: np.ndarray) -> np.ndarray:
    """Models end in softmax; if one returns logits instead, normalise them."""
    outputs = np.asarray(outputs, dtype=np.float64)
    rows_sum = outputs.sum(axis=1)
    if outputs.size and (outputs.min() < -1e-6 or not np.allclose(rows_sum, 1.0, atol=1e-3)):
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        outputs = exp / exp.sum(axis=1, keepdims=True)
    return outputs


def predict_arrays(bundle: ModelBundle, images: np.ndarray, *, tta: bool = False) -> np.ndarray:
    """Class probabilities (n, classes) for a batch of uint8 images (n, size, size, 3).
    `tta`: average with the horizontally flipped images."""
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (bundle.image_size, bundle.image_size, 3):
        raise EvaluationError(
            f"images have shape {batch.shape}; the model takes (n, {bundle.image_size}, {bundle.image_size}, 3)"
        )
    probs = np.asarray(bundle.model.predict_on_batch(batch))
    if tta:
        probs = (probs + np.asarray(bundle.model.predict_on_batch(batch[:, :, ::-1, :].copy()))) / 2.0
    probs = _softmax_if_needed(probs)
    if probs.shape != (len(batch), len(bundle.class_names)):
        raise EvaluationError(
            f"model output has shape {probs.shape}; params.json lists {len(bundle.class_names)} classes"
        )
    return probs


def _batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- predicting sources ---------------------------------------------------------------------
def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def make_http_client():
    """A guarded URL reader (`dermflow.ingestion.http.URLReader`): the SSRF guard, timeouts,
    redirects checked hop by hop, a size cap, dermflow's User-Agent; one pool for many reads."""
    from dermflow.ingestion.http import MAX_PREDICT_IMAGE_BYTES, ReadPolicy, URLReader

    policy = ReadPolicy(max_bytes=MAX_PREDICT_IMAGE_BYTES, connect_timeout=5.0, read_timeout=20.0, total_timeout=60.0)
    return URLReader(policy, accept="image/*,*/*;q=0.8")


def read_source(source: str, http_client=None) -> bytes:
    """The bytes of a local path or an http(s) URL (through the guarded reader `http_client`,
    or one made for this call). A URL that cannot be read raises `URLReadError`, an OSError."""
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {source}")
        return path.read_bytes()
    reader = http_client or make_http_client()
    try:
        return reader.read(source)
    finally:
        if http_client is None:
            reader.close()


def top_k_labels(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(class_names)))]
    return [{"label": class_names[i], "probability": float(probs[i])} for i in order]


def predict_images(
    bundle: ModelBundle,
    sources: list[str],
    top_k: int = 5,
    http_client=None,
    *,
    batch_size: int = PREDICT_BATCH_SIZE,
    tta: bool = False,
    progress: ProgressCallback | None = None,
) -> list[dict]:
    """Predict local image files or http(s) URLs, in the order given.

    Each result: `{"source", "top": [{"label", "probability"}...] (the top_k most probable),
    "error"}`; a source that cannot be read or decoded gets `top: []` and `error` saying why
    (the others still run).
    """
    results: list[dict] = [{"source": s, "top": [], "error": None} for s in sources]
    own_client = None
    if http_client is None and any(is_url(s) for s in sources):
        own_client = http_client = make_http_client()  # one connection pool for the call

    def decode(index: int) -> tuple[int, np.ndarray | None]:
        try:
            return index, load_image_array(read_source(sources[index], http_client), bundle.image_size)
        except (OSError, ValueError) as error:
            results[index]["error"] = str(error)
            return index, None

    done = 0
    try:
        with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
            for chunk in _batched(list(range(len(sources))), batch_size):
                decoded = [(i, array) for i, array in pool.map(decode, chunk) if array is not None]
                if decoded:
                    probs = predict_arrays(bundle, np.stack([array for _, array in decoded]), tta=tta)
                    for (i, _), row in zip(decoded, probs):
                        results[i]["top"] = top_k_labels(row, bundle.class_names, top_k)
                done += len(chunk)
                if progress:
                    progress(done, len(sources))
    finally:
        if own_client is not None:
            own_client.close()
    return results


def explain_image(
    bundle: ModelBundle,
    source: str,
    out_path: Path | str,
    *,
    class_index: int | None = None,
    http_client=None,
) -> dict:
    """Write a PNG of the image (as the model sees it) with its Grad-CAM heatmap for
    `class_index` (default: the predicted class). Returns `{"path", "label", "class_index"}`."""
    from dermflow.evaluation.saliency import grad_cam, overlay_heatmap

    image = load_image_array(read_source(source, http_client), bundle.image_size)
    if class_index is None:
        class_index = int(predict_arrays(bundle, image[None])[0].argmax())
    heatmap = grad_cam(bundle.model, image, class_index=class_index)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(overlay_heatmap(image, heatmap))
    return {"path": str(out_path), "label": bundle.class_names[class_index], "class_index": class_index}


# --- evaluating a labelled set --------------------------------------------------------------
def index_images(images_dir: Path | str) -> dict[str, Path]:
    """`<md5hash>` (lower case, any extension or none) -> file, for the files in images_dir."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise EvaluationError(f"images directory {images_dir} does not exist")
    index: dict[str, Path] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            if entry.is_file() and not entry.name.startswith("."):
                index.setdefault(entry.name.split(".", 1)[0].lower(), Path(entry.path))
    return index


def _score_rows(
    bundle: ModelBundle,
    read_bytes: Callable[[int], bytes],
    n_rows: int,
    *,
    batch_size: int,
    tta: bool,
    progress: ProgressCallback | None,
) -> tuple[list[int], np.ndarray, dict[int, str]]:
    """Decode and predict rows 0..n_rows-1 in batches -> (scored row indices, probs,
    {unreadable row index: why}). One bad image (undecodable, over the pixel cap) is skipped,
    never the batch."""
    scored: list[int] = []
    unreadable: dict[int, str] = {}
    probs: list[np.ndarray] = []

    def decode(i: int) -> tuple[int, np.ndarray | None]:
        try:
            return i, load_image_array(read_bytes(i), bundle.image_size)
        except (OSError, ValueError, StorageError) as error:
            unreadable[i] = str(error)
            return i, None

    done = 0
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
        for chunk in _batched(list(range(n_rows)), batch_size):
            decoded = list(pool.map(decode, chunk))
            good = [(i, array) for i, array in decoded if array is not None]
            if good:
                probs.append(predict_arrays(bundle, np.stack([a for _, a in good]), tta=tta))
                scored += [i for i, _ in good]
            done += len(chunk)
            if progress:
                progress(done, n_rows)
    y_prob = np.concatenate(probs) if probs else np.zeros((0, len(bundle.class_names)))
    return scored, y_prob, unreadable


def read_labelled_csv(csv_path: Path) -> pd.DataFrame:
    """A labelled set in the Fitzpatrick 17k schema, as strings, parsed as strictly as the
    dataset CSV (`dermflow.ingestion.ingest.read_csv_source`); EvaluationError when it cannot
    be read or lacks a required column."""
    from dermflow.ingestion.ingest import DatasetError, DatasetSourceError, read_csv_source

    try:
        frame = read_csv_source(Path(csv_path))
    except (DatasetError, DatasetSourceError) as error:
        raise EvaluationError(f"cannot read {csv_path}: {error}") from error
    missing_columns = [c for c in REQUIRED_EVAL_COLUMNS if c not in frame.columns]
    if missing_columns:
        raise EvaluationError(
            f"{csv_path} lacks column(s) {missing_columns}; it has {list(frame.columns)}"
        )
    return frame


@dataclass
class LabelledRows:
    """The rows of a labelled set a model can score, and why the others were skipped."""

    usable: list[tuple[str, int, str, Path]] = field(default_factory=list)  # md5hash, class, range, path
    skipped: dict[str, list[str]] = field(
        default_factory=lambda: {"missing_image": [], "unknown_label": [], "unreadable_image": []}
    )
    unknown_labels: dict[str, int] = field(default_factory=dict)


def sort_labelled_rows(frame: pd.DataFrame, images: dict[str, Path], class_names: Sequence[str]) -> LabelledRows:
    """Which rows have a known label and an image file; the rest are counted, never dropped."""
    class_index = {name: i for i, name in enumerate(class_names)}
    rows = LabelledRows()
    for row in frame.itertuples(index=False):
        md5hash = str(row.md5hash).strip().lower()
        label = str(row.label).strip()
        if label not in class_index:
            rows.skipped["unknown_label"].append(md5hash)
            rows.unknown_labels[label] = rows.unknown_labels.get(label, 0) + 1
            continue
        path = images.get(md5hash)
        if path is None:
            rows.skipped["missing_image"].append(md5hash)
            continue
        rows.usable.append((md5hash, class_index[label], fitzpatrick_range(row.fitzpatrick_scale), path))
    return rows


def evaluate_dataset(
    bundle: ModelBundle,
    csv_path: Path | str,
    images_dir: Path | str,
    *,
    batch_size: int = PREDICT_BATCH_SIZE,
    tta: bool = False,
    progress: ProgressCallback | None = None,
    max_examples: int = 10,
) -> dict:
    """Evaluate a model on a labelled set in the Fitzpatrick 17k schema.

    Images are `<md5hash>.<any ext>` in `images_dir`. Rows whose image is missing or
    unreadable, or whose label the model does not know, are counted under `skipped` (with
    example md5hashes), never silently dropped. Returns `classification_metrics` keys at top
    level (accuracy, weighted_f1, macro_f1, top3_accuracy, top5_accuracy, per_class,
    per_range, range_gap_weighted_f1, n) plus `model`, `rows`, `evaluated`, `skipped`,
    `skipped_examples`, `unreadable_errors` ({md5hash: why}, the first examples),
    `unknown_labels`, `tta`.
    """
    csv_path = Path(csv_path)
    frame = read_labelled_csv(csv_path)
    rows = sort_labelled_rows(frame, index_images(images_dir), bundle.class_names)
    usable = rows.usable
    scored, y_prob, unreadable = _score_rows(
        bundle, lambda i: usable[i][3].read_bytes(), len(usable),
        batch_size=batch_size, tta=tta, progress=progress,
    )
    rows.skipped["unreadable_image"] = [usable[i][0] for i in sorted(unreadable)]
    counts = {reason: len(hashes) for reason, hashes in rows.skipped.items()}
    if not scored:
        raise EvaluationError(
            f"none of the {len(frame)} rows of {csv_path} could be evaluated: "
            f"{counts['missing_image']} without an image in {images_dir}, "
            f"{counts['unknown_label']} with a label the model does not know, "
            f"{counts['unreadable_image']} unreadable images"
        )
    metrics = classification_metrics(
        [usable[i][1] for i in scored], y_prob, bundle.class_names, ranges=[usable[i][2] for i in scored],
    )
    return {
        **metrics,
        "model": bundle.describe(),
        "csv": str(csv_path),
        "images_dir": str(images_dir),
        "rows": int(len(frame)),
        "evaluated": len(scored),
        "skipped": counts,
        "skipped_examples": {reason: hashes[:max_examples] for reason, hashes in rows.skipped.items()},
        "unreadable_errors": {usable[i][0]: unreadable[i] for i in sorted(unreadable)[:max_examples]},
        "unknown_labels": dict(sorted(rows.unknown_labels.items(), key=lambda kv: -kv[1])),
        "tta": tta,
    }


def evaluate_split(
    bundle: ModelBundle,
    store: ObjectStore,
    split_key: str,
    split: str = "test",
    *,
    batch_size: int = PREDICT_BATCH_SIZE,
    tta: bool = False,
    progress: ProgressCallback | None = None,
) -> dict:
    """Score a model on one split of a split manifest in the bucket (`layout.split_manifest_key`),
    e.g. to re-score a champion on a challenger's test split before deciding a promotion.
    Rows whose label the model does not know are counted in `skipped.unknown_label`."""
    frame = store.get_dataframe_csv(split_key)
    frame = frame[frame["split"] == split]
    class_index = {name: i for i, name in enumerate(bundle.class_names)}
    known = frame[frame["label"].isin(class_index)].reset_index(drop=True)
    keys = [key or image_key(md5) for key, md5 in zip(known["key"], known["md5hash"])]
    scored, y_prob, unreadable = _score_rows(
        bundle, lambda i: store.get_bytes(keys[i]), len(known), batch_size=batch_size, tta=tta, progress=progress
    )
    if not scored:
        raise EvaluationError(f"no row of split {split!r} in {split_key} could be scored")
    metrics = classification_metrics(
        [class_index[known["label"][i]] for i in scored],
        y_prob,
        bundle.class_names,
        ranges=[known["fitzpatrick_range"][i] for i in scored],
    )
    return {
        **metrics,
        "split_key": split_key,
        "split": split,
        "skipped": {"unknown_label": int(len(frame) - len(known)), "unreadable_image": len(unreadable)},
    }
