"""The errors of the ingestion and dataset layers: all are DermflowErrors (keeping their old
builtin base), and each says whether a retry can help."""

from __future__ import annotations

import pickle

import pytest

from dermflow.dataset.arrays import DataError, cache_images_from_store
from dermflow.dataset.split import SplitError, split_dataset
from dermflow.errors import DermflowError, is_transient
from dermflow.ingestion.fetch import FetchOptions, FetchOptionsError
from dermflow.ingestion.guard import BlockedURL
from dermflow.ingestion.images import ImageDecodeError, ImageRejected, NotAnImageError, load_image_array, verify_image
from dermflow.ingestion.ingest import DatasetError, DatasetSourceError, validate_dataset
from dermflow.ingestion.manifest import ManifestError, plan_shards
from dermflow.storage import StorageError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error_type", "builtin"),
    [(DatasetError, ValueError), (DatasetSourceError, RuntimeError), (SplitError, ValueError),
     (DataError, RuntimeError), (ImageDecodeError, ValueError), (NotAnImageError, ValueError),
     (ManifestError, ValueError), (FetchOptionsError, ValueError), (BlockedURL, Exception),
     (ImageRejected, Exception)],
)
def test_every_error_is_a_dermflow_error_and_keeps_its_builtin_base(error_type, builtin):
    assert issubclass(error_type, DermflowError) and issubclass(error_type, builtin)


def test_bad_input_is_permanent():
    import pandas as pd

    with pytest.raises(DatasetError) as dataset:
        validate_dataset(pd.DataFrame({"md5hash": ["x"]}))
    with pytest.raises(SplitError) as split:
        split_dataset(pd.DataFrame({"md5hash": ["a" * 32], "label": ["x"], "status": ["failed"]}))
    with pytest.raises(ManifestError) as manifest:
        plan_shards(pd.DataFrame({"md5hash": ["a" * 32]}), set())
    with pytest.raises(FetchOptionsError):
        FetchOptions(max_attempts=0)
    with pytest.raises(ImageDecodeError) as image:
        load_image_array(b"not an image", 32)
    with pytest.raises(ImageRejected) as rejected:
        verify_image(b"<html>")
    for caught in (dataset, split, manifest, image, rejected):
        assert not is_transient(caught.value)


def test_refusals_survive_pickling():
    blocked = pickle.loads(pickle.dumps(BlockedURL("blocked_address", "10.0.0.1 is an internal address")))
    assert (blocked.reason, blocked.detail) == ("blocked_address", "10.0.0.1 is an internal address")
    rejected = pickle.loads(pickle.dumps(ImageRejected("too_large", "bomb")))
    assert (rejected.reason, str(rejected)) == ("too_large", "too_large: bomb")
    problems = pickle.loads(pickle.dumps(DatasetError(["column x: bad"], "data.csv")))
    assert problems.problems == ["column x: bad"] and "data.csv" in str(problems)


class _FailingStore:
    def __init__(self, error: Exception):
        self.error = error

    def get_bytes(self, key):
        raise self.error


def test_a_missing_image_is_permanent_an_unreachable_bucket_transient(tmp_path):
    with pytest.raises(DataError) as missing:
        cache_images_from_store(_FailingStore(StorageError("no object s3://b/images/a", transient=False)), {"a": "k"}, tmp_path)
    assert not is_transient(missing.value)
    with pytest.raises(DataError) as unreachable:
        cache_images_from_store(_FailingStore(ConnectionError("refused")), {"a": "k"}, tmp_path / "other")
    assert is_transient(unreachable.value)
