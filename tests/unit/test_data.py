"""The input pipeline: center-crop decoding, the one-time array build, the image cache and
batches from the memmap (tf.data and PyDataset)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.unit

from dermflow.dataset import arrays as data  # noqa: E402


def write_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(pixels.astype(np.uint8)).save(path, format="PNG")
    return path


def banded_image(width: int = 120, height: int = 60) -> np.ndarray:
    """Blue left/right quarters around a red centre square: a center crop keeps only red."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    left = (width - height) // 2
    pixels[:, left : left + height] = (255, 0, 0)
    return pixels


def test_decode_center_crops_to_a_square_then_resizes(tmp_path):
    out = data.decode_image(write_png(tmp_path / "wide.png", banded_image()), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[..., 0].min() > 200 and out[..., 2].max() < 60  # no blue border survives

    tall = data.decode_image(write_png(tmp_path / "tall.png", banded_image().transpose(1, 0, 2)), 8)
    assert tall.shape == (8, 8, 3) and tall[..., 2].max() < 60


def test_decode_error_names_the_file(tmp_path):
    bad = tmp_path / "broken"
    bad.write_bytes(b"not an image")
    with pytest.raises(data.DataError, match="broken"):
        data.decode_image(bad, 8)


def test_array_is_built_once_atomically_even_when_raced(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = [write_png(tmp_path / f"{i}.png", rng.integers(0, 255, (10, 12, 3))) for i in range(5)]
    calls = []
    original = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda p, s: calls.append(p) or original(p, s))
    out = tmp_path / "arrays" / "x-8px.npy"
    threads = [threading.Thread(target=data.build_image_array, args=(paths, 8, out)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    array = np.load(out, mmap_mode="r")
    assert array.shape == (5, 8, 8, 3) and len(calls) == 5  # decoded once, not three times
    np.testing.assert_array_equal(array[3], original(paths[3], 8))
    assert not list(out.parent.glob(".*part*"))


class FakeStore:
    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.reads: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        if key not in self.objects:
            raise KeyError(key)
        return self.objects[key]


def test_image_cache_copies_each_image_once(tmp_path):
    store = FakeStore({"images/a": b"A", "images/b": b"B"})
    paths = data.cache_images_from_store(store, {"a": "images/a", "b": "images/b"}, tmp_path)
    assert paths["a"] == tmp_path / "images" / "a" and paths["a"].read_bytes() == b"A"
    data.cache_images_from_store(store, {"a": "images/a", "b": "images/b"}, tmp_path)
    assert sorted(store.reads) == ["images/a", "images/b"]
    with pytest.raises(data.DataError, match="image c: cannot read 'images/c'"):
        data.cache_images_from_store(store, {"c": "images/c"}, tmp_path)


def make_arrays(tmp_path, labels=("a", "b", "a", "c", "a", "b", "a"), splits=None, size=8):
    rng = np.random.default_rng(1)
    splits = splits or ["train"] * len(labels)
    frame = pd.DataFrame({
        "md5hash": [f"m{i}" for i in range(len(labels))], "label": list(labels), "split": splits,
        "fitzpatrick_range": ["I-II"] * len(labels),
    })
    for md5 in frame["md5hash"]:
        write_png(tmp_path / md5, rng.integers(0, 255, (size + 4, size + 2, 3)))
    return data.prepare_split_arrays(frame, lambda md5: tmp_path / md5, size, tmp_path / "cache")


def test_prepare_split_arrays_drops_excluded_rows_and_keys_by_manifest(tmp_path):
    arrays = make_arrays(tmp_path, labels=("a", "b", "a", "b"), splits=["train", "excluded", "val", "train"])
    assert arrays.class_names == ["a", "b"]
    assert list(arrays.md5hash) == ["m0", "m2", "m3"] and list(arrays.labels) == [0, 0, 1]
    assert arrays.images.shape == (3, 8, 8, 3) and isinstance(arrays.images, np.memmap)
    assert arrays.array_path.name == f"{arrays.digest}-8px-v{data.ARRAY_FORMAT_VERSION}.npy"
    assert arrays.array_path.with_suffix(".json").exists()
    assert list(arrays.indices("val")) == [1]


def test_class_weights_are_balanced_inverse_frequencies():
    weights = data.class_weights_from_labels(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(weights, [4 / (2 * 3), 4 / (2 * 1), 0.0])


@pytest.mark.parametrize("maker", ["make_tf_dataset", "make_py_dataset"])
def test_batches_cover_every_index_once_with_matching_labels_and_weights(tmp_path, maker):
    arrays = make_arrays(tmp_path)
    weights = data.class_weights_from_labels(arrays.labels, 3)
    indices = np.array([0, 2, 3, 5, 6])
    batches = getattr(data, maker)(arrays, indices, 2, shuffle=True, seed=3, class_weights=weights)
    seen = []
    for epoch in range(2):
        pixels_all, labels_all = [], []
        for x, y, w in (batches if maker == "make_tf_dataset" else (batches[i] for i in range(len(batches)))):
            x, y, w = np.asarray(x), np.asarray(y), np.asarray(w)
            assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 3) and y.shape[1] == 3
            np.testing.assert_allclose(w, weights[y.argmax(axis=1)])
            pixels_all.append(x)
            labels_all.append(y.argmax(axis=1))
        if maker == "make_py_dataset":
            batches.on_epoch_end()
        pixels = np.concatenate(pixels_all)
        # map every batch row back to its source row by its pixels
        rows = [int(np.flatnonzero((arrays.images[indices] == p).all(axis=(1, 2, 3)))[0]) for p in pixels]
        assert sorted(rows) == list(range(len(indices)))
        np.testing.assert_array_equal(np.concatenate(labels_all), arrays.labels[indices][rows])
        seen.append(rows)
    assert len(seen) == 2


def test_make_dataset_without_weights_yields_pairs(tmp_path):
    arrays = make_arrays(tmp_path)
    x, y = next(iter(data.make_dataset(arrays, np.arange(3), 4, shuffle=False)))
    assert x.shape == (3, 8, 8, 3) and y.shape == (3, 3)
    np.testing.assert_array_equal(np.asarray(x), arrays.images[:3].astype(np.float32))
