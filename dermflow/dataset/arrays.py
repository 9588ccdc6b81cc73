"""The training input pipeline: bucket -> local image cache -> one uint8 array -> batches.

1. Images are copied from the bucket once into `<cache>/images/<md5hash>` (atomic rename of a
   unique temporary file; a file lock makes concurrent runs wait for one another instead of
   downloading twice).
2. They are decoded and resized ONCE per (split manifest, image size) into one uint8 `.npy`
   array `<cache>/arrays/<manifest digest>-<size>px.npy`, built under a file lock and renamed
   into place, then opened with `mmap_mode="r"` so concurrent training processes share the
   page cache instead of each holding a copy.
3. Batches are gathered from the memmap by index: `tf.data` (shuffle, batch, gather, prefetch)
   under the TensorFlow backend, a `keras.utils.PyDataset` under any other Keras backend.

Resizing keeps the aspect ratio with a CENTER CROP to a square, then resizes. Clinical photos
frame the lesion in the middle, and padding would spend up to a quarter of a small input's
pixels on constant borders (and teach the model the border shape of each source); a crop of a
4:3 photo loses only the outer eighth of each long side.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermflow.errors import DermflowError, is_transient

USED_SPLITS = ("train", "val", "test", "verified_test")
# Part of every array file name: bump it when decoding changes, so old caches are not reused.
ARRAY_FORMAT_VERSION = 2


class DataError(DermflowError, RuntimeError):
    """An image could not be fetched or decoded, or the manifest is unusable. Permanent, except
    a bucket read that failed for a reason other than a missing object."""


def _retry_may_help(error: Exception) -> bool:
    """Whether reading an image from the bucket may succeed later (not when it is missing:
    `ObjectStore.get_bytes` raises a permanent StorageError for that)."""
    return is_transient(error)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the block; released when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def manifest_digest(frame) -> str:
    """A content hash (12 hex) of the manifest columns that decide the arrays' rows."""
    columns = [c for c in ("md5hash", "label", "split", "fitzpatrick_range", "key") if c in frame.columns]
    payload = frame[columns].to_csv(index=False).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def cache_images_from_store(
    store, keys_by_md5: Mapping[str, str], cache_dir: Path, *, workers: int = 16
) -> dict[str, Path]:
    """Copy each `md5 -> bucket key` image into `<cache_dir>/images/<md5>` unless already there."""
    image_dir = Path(cache_dir) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = {md5: image_dir / md5 for md5 in keys_by_md5}
    missing = [md5 for md5, path in paths.items() if not path.exists()]
    if missing:
        # One lock for the fill: a concurrent run on the same images waits, then finds them present.
        with file_lock(image_dir / ".lock"):
            missing = [md5 for md5 in missing if not paths[md5].exists()]

            def fetch(md5: str) -> None:
                try:
                    data = store.get_bytes(keys_by_md5[md5])
                except Exception as error:  # noqa: BLE001 - reported with the image's name
                    raise DataError(f"image {md5}: cannot read {keys_by_md5[md5]!r} from the bucket: {error}",
                                    transient=_retry_may_help(error)) from error
                _atomic_write_bytes(paths[md5], data)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(fetch, missing))
    return paths


def decode_image(source: Path | bytes, size: int) -> np.ndarray:
    """`dermflow.ingestion.images.load_image_array` of a file or bytes, with a `DataError` naming it."""
    from dermflow.ingestion.images import ImageDecodeError, load_image_array

    try:
        return load_image_array(source if isinstance(source, bytes) else Path(source).read_bytes(), size)
    except (ImageDecodeError, OSError) as error:
        raise DataError(f"cannot decode image {source if isinstance(source, Path) else '<bytes>'}: {error}") from error


def build_image_array(paths: Sequence[Path], size: int, out_path: Path, *, workers: int | None = None) -> Path:
    """Decode `paths` into one uint8 (n, size, size, 3) `.npy` at `out_path`, once.

    Built under a file lock into a temporary file and renamed into place, so concurrent
    processes build it once and readers never see a partial array.
    """
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    with file_lock(out_path.with_name(out_path.name + ".lock")):
        if out_path.exists():
            return out_path
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.part.npy")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))

        def fill(index: int) -> None:
            array[index] = decode_image(Path(paths[index]), size)

        with ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2)) as pool:
            list(pool.map(fill, range(len(paths))))
        array.flush()
        del array
        os.replace(tmp, out_path)
    return out_path


@dataclass
class SplitArrays:
    """The usable rows of a split manifest with their pixels (a read-only memmap)."""

    images: np.ndarray  # (n, size, size, 3) uint8, memmap
    labels: np.ndarray  # (n,) int, index into class_names
    md5hash: np.ndarray  # (n,) str
    split: np.ndarray  # (n,) str
    fitzpatrick_range: np.ndarray  # (n,) str
    class_names: list[str]
    image_size: int
    array_path: Path
    digest: str

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def prepare_split_arrays(
    frame,
    image_path_of: Callable[[str], Path],
    image_size: int,
    cache_dir: Path,
    class_names: Sequence[str] | None = None,
) -> SplitArrays:
    """Rows of `frame` whose split is train/val/test/verified_test, as arrays.

    `image_path_of(md5hash)` gives the local image file. `class_names` defaults to the sorted
    labels of the train rows.
    """
    missing = {"md5hash", "label", "split"} - set(frame.columns)
    if missing:
        raise DataError(f"split manifest lacks column(s) {sorted(missing)}")
    rows = frame[frame["split"].isin(USED_SPLITS)].reset_index(drop=True)
    if class_names is None:
        class_names = sorted(rows.loc[rows["split"] == "train", "label"].unique())
    class_index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(rows["label"]) - set(class_index))
    if unknown:
        raise DataError(f"label(s) {unknown[:5]} are not among the {len(class_names)} classes")
    digest = manifest_digest(rows)
    array_dir = Path(cache_dir) / "arrays"
    array_dir.mkdir(parents=True, exist_ok=True)
    array_path = array_dir / f"{digest}-{image_size}px-v{ARRAY_FORMAT_VERSION}.npy"
    build_image_array([image_path_of(md5) for md5 in rows["md5hash"]], image_size, array_path)
    images = np.load(array_path, mmap_mode="r")
    if images.shape != (len(rows), image_size, image_size, 3):
        raise DataError(f"{array_path} has shape {images.shape}; expected {(len(rows), image_size, image_size, 3)}")
    ranges = rows["fitzpatrick_range"] if "fitzpatrick_range" in rows.columns else ["unknown"] * len(rows)
    arrays = SplitArrays(
        images=images,
        labels=rows["label"].map(class_index).to_numpy(dtype=np.int64),
        md5hash=rows["md5hash"].to_numpy(dtype=str),
        split=rows["split"].to_numpy(dtype=str),
        fitzpatrick_range=np.asarray(ranges, dtype=str),
        class_names=list(class_names),
        image_size=image_size,
        array_path=array_path,
        digest=digest,
    )
    write_array_index(arrays)
    return arrays


def class_weights_from_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """"Balanced" weights n / (k * n_c) from the training labels (k = classes present)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


class BatchGatherer:
    """Gathers a batch (pixels, one-hot labels, sample weights) from the memmap by indices."""

    def __init__(self, arrays: SplitArrays, class_weights: np.ndarray | None = None):
        self.images = arrays.images
        self.labels = arrays.labels
        self.eye = np.eye(len(arrays.class_names), dtype=np.float32)
        self.class_weights = None if class_weights is None else np.asarray(class_weights, dtype=np.float32)

    def __call__(self, batch_indices: np.ndarray):
        # Sorted reads walk the memmap forwards; order inside a batch does not matter.
        batch_indices = np.sort(np.asarray(batch_indices, dtype=np.int64))
        pixels = np.asarray(self.images[batch_indices], dtype=np.float32)
        labels = self.labels[batch_indices]
        one_hot = self.eye[labels]
        if self.class_weights is None:
            return pixels, one_hot
        return pixels, one_hot, self.class_weights[labels]


def make_tf_dataset(
    arrays: SplitArrays,
    indices: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    class_weights: np.ndarray | None = None,
):
    """tf.data over `indices`: shuffle (each epoch), batch indices, gather from the memmap, prefetch."""
    import tensorflow as tf

    gather = BatchGatherer(arrays, class_weights)
    size = arrays.image_size
    num_classes = len(arrays.class_names)
    weighted = class_weights is not None
    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, dtype=np.int64))
    if shuffle:
        dataset = dataset.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    out_types = [tf.float32, tf.float32] + ([tf.float32] if weighted else [])

    def load(batch_indices):
        tensors = tf.numpy_function(gather, [batch_indices], out_types, stateful=False)
        tensors[0].set_shape([None, size, size, 3])
        tensors[1].set_shape([None, num_classes])
        if weighted:
            tensors[2].set_shape([None])
        return tuple(tensors)

    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _py_dataset_class():
    import keras

    class ArrayBatches(keras.utils.PyDataset):
        """Backend-neutral batches from the memmap (used when Keras does not run on TensorFlow)."""

        def __init__(self, arrays, indices, batch_size, *, shuffle, seed=0, class_weights=None, multiple_of=1,
                     **kwargs):
            super().__init__(**kwargs)
            self.gather = BatchGatherer(arrays, class_weights)
            self.indices = np.asarray(indices, dtype=np.int64)
            self.batch_size = batch_size
            self.shuffle = shuffle
            self.multiple_of = max(1, int(multiple_of))
            self.rng = np.random.default_rng(seed)
            self.order = self.indices.copy()
            if shuffle:
                self.rng.shuffle(self.order)

        def __len__(self):
            if self.shuffle:  # training: a last batch too small to split over the devices is left out
                full, rest = divmod(len(self.indices), self.batch_size)
                return full + int(rest >= self.multiple_of)
            return int(np.ceil(len(self.indices) / self.batch_size))

        def __getitem__(self, index):
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            extra = len(rows) % self.multiple_of
            if extra and self.shuffle:
                rows = rows[: len(rows) - extra]  # a few rows of this epoch's shuffle wait for the next
            elif extra:  # prediction: pad with the last row; the caller keeps the first len(indices)
                rows = np.concatenate([rows, np.repeat(rows[-1:], self.multiple_of - extra)])
            return self.gather(rows)

        def on_epoch_end(self):
            if self.shuffle:
                self.rng.shuffle(self.order)

    return ArrayBatches


def make_py_dataset(arrays, indices, batch_size, *, shuffle, seed=0, class_weights=None, workers: int | None = None):
    """A `keras.utils.PyDataset`; `workers` threads gather batches ahead of the training step."""
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    return _py_dataset_class()(
        arrays, indices, batch_size, shuffle=shuffle, seed=seed, class_weights=class_weights,
        multiple_of=_devices_per_batch(), workers=workers, max_queue_size=8,
    )


def _devices_per_batch() -> int:
    """How many devices each batch is split over: those of a Keras DataParallel in scope, else 1
    (a data-parallel batch must divide evenly between them)."""
    import keras

    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    return int(np.prod(mesh.shape)) if mesh is not None and distribution.__class__.__name__ == "DataParallel" else 1


def make_dataset(
    arrays: SplitArrays,
    indices: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    class_weights: np.ndarray | None = None,
):
    """The batches for `keras.Model.fit/predict`: tf.data on TensorFlow, a PyDataset otherwise."""
    import keras

    maker = make_tf_dataset if keras.backend.backend() == "tensorflow" else make_py_dataset
    return maker(arrays, indices, batch_size, shuffle=shuffle, seed=seed, class_weights=class_weights)


def write_array_index(arrays: SplitArrays) -> Path:
    """A JSON sidecar naming the array's rows, for humans and cache debugging."""
    path = arrays.array_path.with_suffix(".json")
    if not path.exists():
        _atomic_write_bytes(
            path,
            json.dumps({"version": ARRAY_FORMAT_VERSION, "md5hash": arrays.md5hash.tolist(),
                        "split": arrays.split.tolist()}).encode(),
        )
    return path
