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


def test_wrong_secret_is_refused(seaweed, s3_env, monkeypatch, tmp_path):
    from botocore.exceptions import ClientError

    from dermflow.settings import load_settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bad = ObjectStore.from_settings(load_settings())
    with pytest.raises(StorageError, match="cannot put s3://.*/x") as caught:
        bad.put_bytes("x", b"1")
    assert isinstance(caught.value.__cause__, ClientError) and not caught.value.transient  # not retried
    # every other call refuses the same way: permanent, naming what it did
    calls = {"cannot get s3://.*/x": lambda: bad.get_bytes("x"),
             "cannot list s3://.*/images/": lambda: bad.list_keys("images/"),
             "cannot look for s3://.*/x": lambda: bad.exists("x"),
             "cannot list s3://.*/private/": lambda: bad.delete_prefix("private/"),
             "cannot create s3://.*/lock": lambda: bad.create_json("lock", {}),
             "cannot download s3://.*/x": lambda: bad.download_file("x", tmp_path / "x"),
             "cannot put .*/up.txt at s3://.*/up": lambda: bad.put_file("up", tmp_path / "up.txt"),
             "bucket '.*'": bad.ensure_bucket,
             "cannot list s3://.*/runs/": lambda: bad.folder_names("runs/"),
             "cannot list s3://.*/runs/a/": lambda: bad.has_keys("runs/a/"),
             "cannot list s3://.*/tuning/": lambda: list(bad.iter_sizes("tuning/")),
             "cannot delete under s3://": lambda: bad.delete_keys(["x"])}
    (tmp_path / "up.txt").write_text("up")
    for message, call in calls.items():
        with pytest.raises(StorageError, match=message) as caught:
            call()
        assert isinstance(caught.value.__cause__, ClientError) and not caught.value.transient, message


def test_the_cli_says_in_one_line_that_the_store_refused_its_keys(seaweed, s3_env, monkeypatch, capsys):
    from dermflow.ops import cli
    from dermflow.settings import get_settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    get_settings.cache_clear()
    try:
        for command in (["report", "20261203-000000-some-run"], ["runs"]):
            assert cli.main(command) == 1
            error = capsys.readouterr().err.strip()
            assert error.startswith(f"dermflow {command[0]}: cannot list s3://") and "\n" not in error, error
            assert "SignatureDoesNotMatch" in error
    finally:
        get_settings.cache_clear()


def test_folders_are_listed_while_something_is_under_them(store: ObjectStore):
    for key in ("runs/a/metrics.json", "runs/b/models/x/model.keras", "runs/top.json"):
        store.put_bytes(key, b"{}")
    assert sorted(store.folder_names("runs/")) == ["a", "b"]
    assert store.has_keys("runs/b/") and not store.has_keys("runs/c/")
    assert dict(store.iter_sizes("runs/a/")) == {"runs/a/metrics.json": 2}
    store.delete_keys(["runs/b/models/x/model.keras", "runs/absent"])
    assert not store.has_keys("runs/b/")


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/a/b.csv") == ("bucket", "a/b.csv")
    with pytest.raises(ValueError):
        parse_s3_uri("http://x/y")


# --------------------------------------------------------------------------------------------
# image puts through obstore (dermflow.storage.BulkCalls), checked by the ETag


def _jpeg(seed: int) -> tuple[bytes, str]:
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue(), hashlib.md5(buffer.getvalue()).hexdigest()


def test_image_puts_go_through_obstore_and_store_the_bytes(store: ObjectStore, monkeypatch):
    from dermflow.storage import BulkCalls

    calls = []
    real_put = BulkCalls.put
    monkeypatch.setattr(BulkCalls, "put", lambda self, *args: calls.append(args[0]) or real_put(self, *args))
    body, md5 = _jpeg(0)
    uri = store.put_bytes("images/" + md5, body, "image/jpeg", md5_hex=md5)
    assert uri == store.uri("images/" + md5) and calls == ["images/" + md5]
    assert store.get_bytes("images/" + md5) == body
    head = store.client.head_object(Bucket=store.bucket, Key="images/" + md5)
    assert head["ContentType"] == "image/jpeg" and head["ETag"].strip('"') == md5
    store.put_bytes("manifest.csv", b"a,b\n", "text/csv")  # no md5: boto3, as before
    assert calls == ["images/" + md5] and store.get_bytes("manifest.csv") == b"a,b\n"


def test_boto3_is_the_image_put_client_when_settings_say_so(s3_env, monkeypatch):
    from dermflow.settings import load_settings

    monkeypatch.setenv("DERMFLOW_BULK_S3_CLIENT", "boto3")
    store = ObjectStore.from_settings(load_settings())
    assert store.bulk is None
    body, md5 = _jpeg(1)
    store.put_bytes("images/x", body, "image/jpeg", md5_hex=md5)
    assert store.get_bytes("images/x") == body
    with pytest.raises(Exception, match="BadDigest|Content-MD5|digest"):  # the server checks Content-MD5
        store.put_bytes("images/y", body, "image/jpeg", md5_hex="0" * 32)


def test_a_store_whose_etags_are_not_md5s_falls_back_to_content_md5(store: ObjectStore, monkeypatch):
    """An encrypted bucket's ETags are not MD5s: the object is read back once, and where its
    bytes are right, later puts go through boto3 with Content-MD5 instead."""
    from dermflow.storage import BulkCalls

    real_put = BulkCalls.put
    calls = []
    monkeypatch.setattr(BulkCalls, "put", lambda self, *args: calls.append(args[0]) or (real_put(self, *args) and False))
    body, md5 = _jpeg(2)
    store.put_bytes("images/" + md5, body, "image/jpeg", md5_hex=md5)
    assert store.get_bytes("images/" + md5) == body and not store.etags_are_md5
    other, other_md5 = _jpeg(3)
    store.put_bytes("images/" + other_md5, other, "image/jpeg", md5_hex=other_md5)
    assert store.get_bytes("images/" + other_md5) == other
    assert calls == ["images/" + md5]  # the second put went through boto3
    assert store.bulk is not None  # listings still go through obstore


def test_stored_bytes_that_differ_from_the_md5_are_a_transient_error(store: ObjectStore):
    body, md5 = _jpeg(4)
    wrong = "f" * 32  # the bytes stored are not the ones the caller hashed
    with pytest.raises(StorageError, match="stored bytes have MD5") as caught:
        store.put_bytes("images/z", body, "image/jpeg", md5_hex=wrong)
    assert caught.value.transient and store.etags_are_md5


def test_refused_keys_on_an_image_put_are_permanent_and_not_retried(seaweed, s3_env, monkeypatch):
    import time

    from dermflow.ingestion.fetch import FetchOptions, _put_retrying
    from dermflow.ingestion.images import verify_image
    from dermflow.settings import load_settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bad = ObjectStore.from_settings(load_settings())
    body, md5 = _jpeg(5)
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        _put_retrying(bad, "images/" + md5, body, verify_image(body), FetchOptions(store_attempts=5))
    assert not caught.value.transient, caught.value
    assert time.monotonic() - started < 10  # no backoff between attempts: refused at once


def test_bulk_calls_pickle_without_their_client(store: ObjectStore):
    import pickle

    body, md5 = _jpeg(6)
    store.put_bytes("images/" + md5, body, "image/jpeg", md5_hex=md5)  # builds the obstore store
    copy = pickle.loads(pickle.dumps(store.bulk))
    assert copy._store is None and copy.bucket == store.bucket
    assert copy.put("images/again", body, "image/jpeg", md5)


# --------------------------------------------------------------------------------------------
# key names through obstore (membership checks: which images are stored)


def test_key_names_list_the_images_as_boto3_does(store: ObjectStore, monkeypatch):
    from dermflow.storage import BulkCalls

    md5s = [f"{index:032x}" for index in range(1203)]  # two pages and a bit
    for md5 in md5s:
        store.client.put_object(Bucket=store.bucket, Key="images/" + md5, Body=b"x")
    store.client.put_object(Bucket=store.bucket, Key="imagesque/not-in-the-folder", Body=b"x")
    real = BulkCalls.key_names
    calls = []
    monkeypatch.setattr(BulkCalls, "key_names", lambda self, folder: calls.append(folder) or real(self, folder))
    assert sorted(store.key_names("images/")) == sorted(store.list_keys("images/")) == ["images/" + m for m in md5s]
    assert calls == ["images/"]
    with pytest.raises(ValueError, match="ending with '/'"):
        store.bulk.key_names("images")


def test_key_names_alter_odd_keys_so_they_never_address_objects(store: ObjectStore):
    """What the docstring promises, measured: exact for dermflow's keys; a control character
    and a folder marker's trailing "/" come back altered (iter_keys lists them exactly)."""
    odd = ["images/ctl\x01", "images/dir/", "images/a b", "images/ü"]
    for key in odd:
        store.client.put_object(Bucket=store.bucket, Key=key, Body=b"x")
    assert sorted(store.list_keys("images/")) == sorted(odd)
    names = set(store.key_names("images/"))
    assert {"images/a b", "images/ü"} <= names
    assert "images/ctl\x01" not in names and "images/dir/" not in names


def test_key_names_fall_back_to_boto3_which_raises_a_storage_error(seaweed, s3_env, monkeypatch):
    from botocore.exceptions import ClientError

    from dermflow.settings import load_settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bad = ObjectStore.from_settings(load_settings())
    assert bad.bulk.key_names("images/") is None  # obstore's error: no partial answer
    with pytest.raises(StorageError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId") as caught:
        bad.key_names("images/")
    assert isinstance(caught.value.__cause__, ClientError) and not caught.value.transient


def test_without_bulk_calls_key_names_are_the_boto3_listing(s3_env, monkeypatch):
    from dermflow.settings import load_settings

    monkeypatch.setenv("DERMFLOW_BULK_S3_CLIENT", "boto3")
    plain = ObjectStore.from_settings(load_settings())
    plain.ensure_bucket()
    plain.client.put_object(Bucket=plain.bucket, Key="images/" + "a" * 32, Body=b"x")
    assert plain.bulk is None and "images/" + "a" * 32 in plain.key_names("images/")
