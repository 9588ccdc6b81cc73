"""How `ObjectStore.put_bytes` reports a failed put: one `StorageError`, whose `transient`
tells the fetcher's retry loop (and Prefect's task retries) whether sending it again can help."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError

from dermflow.errors import is_transient
from dermflow.storage import StorageError, s3_error
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


class _RefusingClient(MemoryS3Client):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def put_object(self, **kwargs):
        raise self.error


@pytest.mark.parametrize(("raised", "transient"), [
    (_client_error(403, "AccessDenied"), False),
    (_client_error(503, "SlowDown"), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
])
def test_put_bytes_raises_a_storage_error_naming_the_object(raised: Exception, transient: bool):
    store = memory_store()
    store.client = _RefusingClient(raised)
    with pytest.raises(StorageError, match=r"cannot put s3://memory/images/x") as caught:
        store.put_bytes("images/x", b"data", "image/jpeg", md5_hex="8d777f385d3dfec8815d20f7496026dc")
    assert caught.value.transient is transient and caught.value.__cause__ is raised


def test_programming_errors_are_not_dressed_as_storage_errors():
    store = memory_store()
    store.client = _RefusingClient(TypeError("unexpected keyword"))
    with pytest.raises(TypeError):
        store.put_bytes("images/x", b"data")

