"""The object store against a real SeaweedFS: round trips, listing, and keys enforced."""

import pytest

from dermflow.storage import ObjectStore, StorageError, parse_s3_uri

pytestmark = pytest.mark.integration


def test_round_trip_listing_and_delete(store: ObjectStore, tmp_path):
    store.put_bytes("images/a", b"x")
    store.put_json("runs/r1/metrics.json", {"accuracy": 0.5})
    for i in range(3):
        store.put_bytes(f"images/b{i}", b"y")
    assert store.get_json("runs/r1/metrics.json") == {"accuracy": 0.5}
    assert sorted(store.list_keys("images/")) == ["images/a", "images/b0", "images/b1", "images/b2"]
    assert store.exists("images/a") and not store.exists("images/nope")
    path = store.download_file(store.uri("images/a"), tmp_path / "a")
    assert path.read_bytes() == b"x"
    assert store.delete_prefix("images/") == 4
    assert store.list_keys("images/") == []
    with pytest.raises(StorageError, match="no object"):
        store.get_bytes("images/a")


def test_wrong_secret_is_refused(seaweed, s3_env, monkeypatch):
    from botocore.exceptions import ClientError

    from dermflow.settings import load_settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bad = ObjectStore.from_settings(load_settings())
    with pytest.raises(ClientError):
        bad.put_bytes("x", b"1")


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/a/b.csv") == ("bucket", "a/b.csv")
    with pytest.raises(ValueError):
        parse_s3_uri("http://x/y")
