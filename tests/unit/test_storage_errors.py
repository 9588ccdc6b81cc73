"""How `ObjectStore` reports a failed call (put, get, listing, delete): one `StorageError` naming
the call, whose `transient` tells the fetcher's retry loop (and Prefect's task retries) whether
sending it again can help."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError

from dermflow.errors import is_transient
from dermflow.storage import ObjectMissing, StorageError, s3_error
from tests.support.memory_s3 import MemoryS3Client, memory_store


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "..."}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize(("status", "code", "transient"), [
    (403, "AccessDenied", False),
    (403, "SignatureDoesNotMatch", False),
    (404, "NoSuchBucket", False),
    (400, "InvalidArgument", False),
    (400, "BadDigest", True),  # the bytes changed on the way: send them again
    (400, "RequestTimeout", True),
    (403, "RequestTimeTooSkewed", True),
    (503, "SlowDown", True),
    (429, "TooManyRequests", True),
    (408, "", True),
    (500, "InternalError", True),
])
def test_s3_answers_are_classified_by_status_and_code(status: int, code: str, transient: bool):
    error = s3_error(_client_error(status, code), "cannot put s3://b/k")
    assert isinstance(error, StorageError) and error.transient is transient
    assert is_transient(error) is transient
    assert str(error).startswith("cannot put s3://b/k: ") and code in str(error)


def test_connection_errors_and_missing_credentials_are_transient_a_bad_request_is_not():
    assert s3_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "put").transient
    assert s3_error(NoCredentialsError(), "put").transient
    assert not s3_error(ParamValidationError(report="Key is empty"), "put").transient


def _failing(error: Exception, *calls: str) -> MemoryS3Client:
    """An in-memory S3 client whose `calls` (boto3 method names) raise `error`."""
    client = MemoryS3Client()

    def fail(*args, **kwargs):
        raise error

    for call in calls:
        setattr(client, call, fail)
    return client


_READS = ("get_object", "head_object", "get_paginator")
_FAILURES = [  # (what boto3 raised, whether the StorageError says retry)
    (_client_error(403, "AccessDenied"), False),
    (_client_error(503, "SlowDown"), True),
    (_client_error(500, "InternalError"), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
]


@pytest.mark.parametrize(("raised", "transient"), _FAILURES)
def test_put_bytes_raises_a_storage_error_naming_the_object(raised: Exception, transient: bool):
    store = memory_store()
    store.client = _failing(raised, "put_object")
    with pytest.raises(StorageError, match=r"cannot put s3://memory/images/x") as caught:
        store.put_bytes("images/x", b"data", "image/jpeg", md5_hex="8d777f385d3dfec8815d20f7496026dc")
    assert caught.value.transient is transient and caught.value.__cause__ is raised


def test_programming_errors_are_not_dressed_as_storage_errors():
    store = memory_store()
    store.client = _failing(TypeError("unexpected keyword"), "put_object")
    with pytest.raises(TypeError):
        store.put_bytes("images/x", b"data")


@pytest.mark.parametrize(("raised", "transient"), _FAILURES)
def test_reads_and_listings_raise_storage_errors_naming_the_call(raised: Exception, transient: bool):
    store = memory_store()
    store.client = _failing(raised, *_READS)
    for message, call in {"cannot get s3://memory/k": lambda: store.get_bytes("k"),
                          "cannot look for s3://memory/k": lambda: store.exists("k"),
                          "cannot list s3://memory/images/": lambda: store.list_keys("images/")}.items():
        with pytest.raises(StorageError, match=message) as caught:
            call()
        assert caught.value.transient is transient and caught.value.__cause__ is raised


def test_a_missing_object_is_named_and_permanent_and_exists_says_no():
    store = memory_store()  # the in-memory client's errors carry a code but no HTTP status
    with pytest.raises(ObjectMissing, match=r"cannot get s3://memory/absent: no object there \(NoSuchKey\)") as caught:
        store.get_bytes("absent")
    assert not caught.value.transient
    assert store.exists("absent") is False


def test_an_answer_without_a_status_is_classified_by_its_code():
    statusless = ClientError({"Error": {"Code": "AccessDenied", "Message": "..."}}, "GetObject")
    assert not s3_error(statusless, "get").transient
    assert s3_error(ClientError({"Error": {"Code": "InternalError"}}, "GetObject"), "get").transient


def test_readers_of_optional_objects_pass_over_a_missing_one_but_not_a_refusal():
    """A run without metrics has no score; a store that refuses the read is an error, not
    "no score" (and retention does not take a refused marker for an ended run)."""
    from datetime import datetime, timedelta, timezone

    from dermflow.registry.retention import run_is_active
    from dermflow.registry.runs import model_score

    store = memory_store()
    assert model_score(store, "20261203-run", "resnet50v2") is None
    store.client = _failing(_client_error(403, "AccessDenied"), *_READS)
    with pytest.raises(StorageError, match="AccessDenied") as caught:
        model_score(store, "20261203-run", "resnet50v2")
    assert not caught.value.transient
    with pytest.raises(StorageError, match="AccessDenied"):
        run_is_active(store, "20261203-run", datetime.now(timezone.utc), timedelta(hours=1))


class _RefusingDeletes(MemoryS3Client):
    def __init__(self, code: str) -> None:
        super().__init__()
        self.code = code

    def delete_objects(self, Bucket: str, Delete: dict) -> dict:  # noqa: N803 - boto3 names
        return {"Errors": [{"Key": item["Key"], "Code": self.code, "Message": "no"} for item in Delete["Objects"]]}


@pytest.mark.parametrize(("code", "transient"), [("AccessDenied", False), ("InternalError", True)])
def test_objects_the_store_did_not_delete_are_an_error_naming_them(code: str, transient: bool):
    store = memory_store()
    store.client = _RefusingDeletes(code)
    store.put_bytes("private/a", b"1")
    with pytest.raises(StorageError, match=rf"cannot delete 1 object\(s\) under s3://memory/private/: private/a \({code}\)") as caught:
        store.delete_prefix("private/")
    assert caught.value.transient is transient
    assert store.list_keys("private/") == ["private/a"]


# --- credentials: both put clients sign with the same ones -------------------------------------


@pytest.fixture
def header_recorder():
    """A local HTTP server that answers every PUT 200 with an ETag and records the headers."""
    import http.server
    import threading

    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({name.lower(): value for name, value in self.headers.items()})
            self.send_response(200)
            self.send_header("ETag", '"0"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("client", ["boto3", "obstore"])
def test_temporary_credentials_sign_every_put(header_recorder, monkeypatch, client: str):
    from dermflow.settings import Settings
    from dermflow.storage import ObjectStore

    endpoint, seen = header_recorder
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    settings = Settings(aws_endpoint_url=endpoint, aws_access_key_id="AKIDTEMP", aws_secret_access_key="secret",
                        aws_session_token="the-session-token", bulk_s3_client=client)
    store = ObjectStore.from_settings(settings)
    store.put_bytes("images/x", b"data", "image/jpeg",
                    md5_hex="0" if client == "obstore" else "8d777f385d3dfec8815d20f7496026dc")
    assert seen and seen[-1].get("x-amz-security-token") == "the-session-token"
    assert "AKIDTEMP/" in seen[-1]["authorization"]


def test_the_session_token_is_read_from_the_environment(monkeypatch):
    from dermflow.settings import load_settings

    monkeypatch.setenv("AWS_SESSION_TOKEN", "from-env")
    assert load_settings().aws_session_token.get_secret_value() == "from-env"
