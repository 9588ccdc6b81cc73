"""S3-compatible object storage: the one place that talks to the bucket.

Every stage passes `s3://bucket/key` URIs or keys; bytes stay in the store. Works with the
embedded SeaweedFS, AWS S3 or any S3 endpoint, configured by `Settings` alone.

boto3 is the S3 API everywhere, except for two bulk calls that go through obstore (`BulkCalls`)
where `Settings.bulk_s3_client` says so (the default): the fetcher's and importer's image puts,
because a boto3 put costs about six times its CPU and holds the GIL the shard's other threads
need (bench/README.md: +26-36 % images/s in A/B runs), and the listing of which images are
stored (`ObjectStore.key_names`: 0.35 s for 16,577 keys against boto3's 2.4 s). Both put
clients check the stored bytes against the MD5 the fetcher holds: boto3 by Content-MD5,
obstore by the ETag the store returns.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from pydantic import SecretStr

from dermflow.errors import DermflowError
from dermflow.settings import Settings, get_settings


class StorageError(DermflowError, RuntimeError):
    """The object store is unreachable, misconfigured, or an object is missing."""

    transient = True


class ObjectMissing(StorageError):
    """No object at the key a read asked for: permanent (readers of optional objects catch
    this, never `StorageError` as a whole, which would hide a refusal or an outage)."""

    transient = False


# 4xx answers that the same request may get past later: throttling, timeouts, and BadDigest
# (the bytes changed on the way, so sending them again is the cure)
_RETRYABLE_4XX_CODES = frozenset({"SlowDown", "RequestTimeout", "BadDigest", "RequestTimeTooSkewed"})
# Refusals known by their code alone, for an answer that carries no HTTP status (a missing
# object is told apart first, by `_MISSING_CODES`)
_REFUSAL_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                            "403", "InvalidArgument", "InvalidBucketName"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def s3_error(error: ClientError | BotoCoreError, what: str) -> StorageError:
    """A boto3 error as a `StorageError` that says whether retrying may help: a 4xx refusal
    (denied keys, a missing bucket or object, a bad request) is permanent, except throttling,
    timeouts and BadDigest; 5xx answers and connection errors are transient, and so are
    missing credentials (a credential source may answer later). `what` names the call."""
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(error.response.get("Error", {}).get("Code", ""))
        if _is_missing(error):
            return ObjectMissing(f"{what}: no object there ({code})")
        if status:
            refused = 400 <= status < 500 and status not in (408, 429) and code not in _RETRYABLE_4XX_CODES
        else:
            refused = code in _REFUSAL_CODES
        return StorageError(f"{what}: {error}", transient=not refused)
    return StorageError(f"{what}: {error}", transient=not isinstance(error, ParamValidationError))


def _is_missing(error: ClientError) -> bool:
    """Whether S3 answered that the object (or the key a HEAD asked for) does not exist."""
    return str(error.response.get("Error", {}).get("Code", "")) in _MISSING_CODES


@contextlib.contextmanager
def _s3_call(what: str) -> Iterator[None]:
    """Inside: boto3's errors leave as `StorageError`s (`s3_error`), naming the call."""
    try:
        yield
    except (ClientError, BotoCoreError) as error:
        raise s3_error(error, what) from error
    except S3UploadFailedError as error:  # boto3's transfer wraps the put's own error
        cause = error.__context__
        if isinstance(cause, (ClientError, BotoCoreError)):
            raise s3_error(cause, what) from cause
        raise StorageError(f"{what}: {error}") from error


def _raise_undeleted(where: str, errors: list[dict]) -> None:
    named = ", ".join(f"{error.get('Key')} ({error.get('Code')})" for error in errors[:3])
    refused = all(error.get("Code") == "AccessDenied" for error in errors)
    raise StorageError(f"cannot delete {len(errors)} object(s) under {where}: {named}", transient=not refused)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def make_s3_client(settings: Settings, *, max_pool_connections: int = 32):
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.aws_endpoint_url or None,
        aws_access_key_id=settings.aws_access_key_id or None,
        aws_secret_access_key=_secret(settings.aws_secret_access_key),
        aws_session_token=_secret(settings.aws_session_token),
        region_name=settings.aws_default_region,
        config=Config(
            s3={"addressing_style": settings.s3_addressing_style},
            retries={"max_attempts": 8, "mode": "adaptive"},
            max_pool_connections=max_pool_connections,
            connect_timeout=5,
            read_timeout=60,
            # botocore >= 1.36 computes a CRC32 of every body by default; checksums are sent only
            # where S3 requires them, and image puts send the Content-MD5 the fetcher already holds
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class BulkCalls:
    """The bulk S3 calls through obstore (Rust): single-request image puts for fetch and import,
    and listings of many keys (parsed in Rust: about a twentieth of boto3's CPU per key).

    obstore's `put` returns the object's ETag, which for a single-part put is the MD5 of the
    bytes the store kept (S3 and SeaweedFS alike; not under SSE-KMS or SSE-C encryption):
    `put` returns whether it equals the MD5 the caller holds. Built from the same `Settings`
    as the boto3 client; the obstore store is made on first use in each process (never pickled).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Any = None
        self._lock = threading.Lock()

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    def __getstate__(self) -> dict:
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"])

    def _obstore(self) -> Any:
        with self._lock:
            if self._store is None:
                self._store = make_obstore(self.settings)
            return self._store

    def put(self, key: str, data: bytes, content_type: str | None, md5_hex: str) -> bool:
        """Put `data` at `key` in one request; True when the returned ETag is `md5_hex`.
        Raises `StorageError` (permanent for refused credentials or a missing bucket)."""
        import obstore
        from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

        attributes = {"Content-Type": content_type} if content_type else None
        try:
            result = obstore.put(self._obstore(), key, data, attributes=attributes, use_multipart=False)
        except (PermissionDeniedError, UnauthenticatedError, NotFoundError) as error:
            raise StorageError(f"cannot put s3://{self.bucket}/{key}: {error}", transient=False) from error
        except Exception as error:  # noqa: BLE001 - obstore's connection and server errors, after its retries
            raise StorageError(f"cannot put s3://{self.bucket}/{key}: {error}") from error
        return (result.get("e_tag") or "").strip('"').lower() == md5_hex.lower()

    def key_names(self, folder: str) -> list[str] | None:
        """The names of the keys under `folder` (ending with "/") as obstore lists them, or None
        on an error (the caller lists through boto3, which raises a classified `StorageError`).
        object_store reads keys as paths: a control character comes back as U+FFFD and a
        trailing "/" is dropped, so these names are for membership checks, never to address
        an object."""
        import obstore

        if not folder.endswith("/"):
            raise ValueError(f"a listing of names is of a folder (ending with '/'), not {folder!r}")
        try:
            return [meta["path"] for batch in obstore.list(self._obstore(), folder, chunk_size=1000)
                    for meta in batch]
        except Exception:  # noqa: BLE001 - boto3 lists again and raises what is wrong
            return None


def make_obstore(settings: Settings) -> Any:
    """An obstore S3Store for `settings.bucket`, configured like `make_s3_client`'s boto3 client."""
    from datetime import timedelta

    import obstore.store

    endpoint = settings.aws_endpoint_url or None
    config: dict[str, Any] = {"region": settings.aws_default_region,
                              "virtual_hosted_style_request": settings.s3_addressing_style == "virtual"
                              or (settings.s3_addressing_style == "auto" and endpoint is None)}
    if endpoint:
        config["endpoint"] = endpoint
    options: dict[str, Any] = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=60),
                               "allow_http": bool(endpoint and endpoint.startswith("http://"))}
    # obstore retries 5xx and dropped connections briefly; the fetcher's own retries span restarts
    retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=30)}
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        config["access_key_id"] = settings.aws_access_key_id
        config["secret_access_key"] = _secret(settings.aws_secret_access_key)
        if settings.aws_session_token:
            config["session_token"] = _secret(settings.aws_session_token)
        return obstore.store.S3Store(settings.bucket, config=config, client_options=options, retry_config=retry)
    from obstore.auth.boto3 import Boto3CredentialProvider  # boto3's chain: profiles, SSO, roles

    return obstore.store.S3Store(settings.bucket, config=config, client_options=options, retry_config=retry,
                                 credential_provider=Boto3CredentialProvider(boto3.session.Session()))


@dataclass
class ObjectStore:
    """A bucket and a boto3 client, plus `bulk` for image puts and long listings. Thread-safe
    (boto3 clients and obstore stores are)."""

    bucket: str
    client: Any
    bulk: BulkCalls | None = None  # None: every call through boto3
    etags_are_md5: bool = True  # False once a put's ETag proved not to be the MD5 (encrypted bucket)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **client_options) -> "ObjectStore":
        settings = settings or get_settings()
        bulk = BulkCalls(settings) if settings.bulk_s3_client == "obstore" else None
        return cls(settings.bucket, make_s3_client(settings, **client_options), bulk)

    # --- addresses ---
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key_of(self, uri_or_key: str) -> str:
        if uri_or_key.startswith("s3://"):
            bucket, key = parse_s3_uri(uri_or_key)
            if bucket != self.bucket:
                raise StorageError(f"{uri_or_key} is not in bucket {self.bucket!r}", transient=False)
            return key
        return uri_or_key

    # --- bucket ---
    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise s3_error(error, f"bucket {self.bucket!r}") from error
            with _s3_call(f"cannot create bucket {self.bucket!r}"):
                self.client.create_bucket(Bucket=self.bucket)
        except BotoCoreError as error:
            raise s3_error(error, f"bucket {self.bucket!r}") from error

    # --- objects ---
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None, md5_hex: str | None = None) -> str:
        """Put `data` at `key`. With `md5_hex` (the MD5 of `data`, already computed) the stored
        bytes are checked against it: by the ETag through `bulk`, else by Content-MD5
        (the server refuses other bytes: BadDigest). Whichever client puts, a failure is a
        `StorageError` whose `transient` says whether to put again."""
        if md5_hex and self.bulk is not None and self.etags_are_md5:
            self._put_checked_by_etag(key, data, content_type, md5_hex)
            return self.uri(self.key_of(key))
        extra = {"ContentType": content_type} if content_type else {}
        if md5_hex:
            extra["ContentMD5"] = base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")
        with _s3_call(f"cannot put {self.uri(self.key_of(key))}"):
            self.client.put_object(Bucket=self.bucket, Key=self.key_of(key), Body=data, **extra)
        return self.uri(self.key_of(key))

    def _put_checked_by_etag(self, key: str, data: bytes, content_type: str | None, md5_hex: str) -> None:
        """A `bulk` put; where the ETag is not the MD5, the object is read back: other
        bytes are a transient error (the caller puts again); the same bytes mean this store's
        ETags are not MD5s (an encrypted bucket), so its later puts go through Content-MD5."""
        if self.bulk.put(self.key_of(key), data, content_type, md5_hex):
            return
        stored = hashlib.md5(self.get_bytes(key)).hexdigest()
        if stored != md5_hex.lower():
            raise StorageError(f"{self.uri(self.key_of(key))}: stored bytes have MD5 {stored}, not {md5_hex}")
        self.etags_are_md5 = False

    def create_json(self, key: str, obj: Any) -> bool:
        """Write `obj` at `key` only if no object is there (S3 `If-None-Match: *`): False when
        one already is. The check and the write are one atomic step on the server, so of
        concurrent creators exactly one wins."""
        body = json.dumps(obj, indent=2, default=str).encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key_of(key), Body=body,
                                   ContentType="application/json", IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                "ConditionalRequestConflict", "409"):
                return False
            raise s3_error(error, f"cannot create {self.uri(self.key_of(key))}") from error
        except BotoCoreError as error:
            raise s3_error(error, f"cannot create {self.uri(self.key_of(key))}") from error
        return True

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; `ObjectMissing` where there is none."""
        with _s3_call(f"cannot get {self.uri(self.key_of(key))}"):
            return self.client.get_object(Bucket=self.bucket, Key=self.key_of(key))["Body"].read()

    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, json.dumps(obj, indent=2, default=str).encode(), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_file(self, key: str, path: Path | str, content_type: str | None = None) -> str:
        extra = {"ExtraArgs": {"ContentType": content_type}} if content_type else {}
        with _s3_call(f"cannot put {path} at {self.uri(self.key_of(key))}"):
            self.client.upload_file(str(path), self.bucket, self.key_of(key), **extra)
        return self.uri(self.key_of(key))

    def download_file(self, key: str, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with _s3_call(f"cannot download {self.uri(self.key_of(key))}"):
            self.client.download_file(self.bucket, self.key_of(key), str(tmp))
        tmp.replace(path)  # atomic: readers never see a partial file
        return path

    def put_dataframe_csv(self, key: str, frame) -> str:
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        return self.put_bytes(key, buffer.getvalue().encode(), "text/csv")

    def get_dataframe_csv(self, key: str):
        import pandas as pd

        return pd.read_csv(io.BytesIO(self.get_bytes(key)), keep_default_na=False, dtype=str)

    def exists(self, key: str) -> bool:
        try:
            with _s3_call(f"cannot look for {self.uri(self.key_of(key))}"):
                self.client.head_object(Bucket=self.bucket, Key=self.key_of(key))
            return True
        except ObjectMissing:
            return False

    def key_names(self, folder: str) -> list[str]:
        """The keys under `folder` for membership checks (are these images stored?), through
        `bulk` where set: 16,577 keys cost 0.13 s of CPU there, 2.3 s through boto3. Keys of
        printable characters without a trailing "/" come back exact (every key dermflow
        writes); never address objects by these names: `iter_keys` lists exactly."""
        names = self.bulk.key_names(folder) if self.bulk is not None else None
        return names if names is not None else self.list_keys(folder)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """All keys under `prefix`, exactly: one paginated listing (1,000 keys a request)."""
        yield from (key for key, _size in self.iter_sizes(prefix))

    def iter_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size in bytes) of every object under `prefix`, as `iter_keys` lists them."""
        with _s3_call(f"cannot list {self.uri(prefix)}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from ((item["Key"], int(item["Size"])) for item in page.get("Contents", []))

    def folder_names(self, prefix: str) -> list[str]:
        """Names of the "folders" directly under `prefix` (a delimiter listing), as the store
        lists them: some stores (SeaweedFS) keep listing one after its last object is deleted
        (`has_keys` says whether anything is still there)."""
        names: list[str] = []
        with _s3_call(f"cannot list {self.uri(prefix)}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names += [item["Prefix"][len(prefix):].rstrip("/") for item in page.get("CommonPrefixes") or []]
        return [name for name in names if name]

    def has_keys(self, prefix: str) -> bool:
        """Whether any object is stored under `prefix` (a listing of one key)."""
        with _s3_call(f"cannot list {self.uri(prefix)}"):
            return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("Contents"))

    def list_keys(self, prefix: str = "") -> list[str]:
        return list(self.iter_keys(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; how many there were."""
        keys = self.list_keys(prefix)
        self.delete_keys(keys, where=self.uri(prefix))
        return len(keys)

    def delete_keys(self, keys: list[str], where: str | None = None) -> None:
        """Delete exactly these keys, 1,000 a request (absent ones are no error). A key the
        store did not delete is an error naming it, permanent where every refusal is
        AccessDenied. `where` names them in the error (default: the bucket)."""
        where = where or f"s3://{self.bucket}/"
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            with _s3_call(f"cannot delete under {where}"):
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True}
                )
            if answer.get("Errors"):
                _raise_undeleted(where, answer["Errors"])

    def presign(self, key: str, expires_seconds: int = 7 * 24 * 3600) -> str | None:
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key_of(key)}, ExpiresIn=expires_seconds
            )
        except Exception:  # noqa: BLE001 - some stores cannot presign; the caller falls back to the URI
            return None
