"""S3-compatible object storage: the one place that talks to the bucket.

Every stage passes `s3://bucket/key` URIs or keys; bytes stay in the store. Works with the
embedded SeaweedFS, AWS S3 or any S3 endpoint, configured by `Settings` alone.
"""

from __future__ import annotations

import base64

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from dermflow.errors import DermflowError
from dermflow.settings import Settings, get_settings


class StorageError(DermflowError, RuntimeError):
    """The object store is unreachable, misconfigured, or an object is missing."""

    transient = True


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def make_s3_client(settings: Settings, *, max_pool_connections: int = 32):
    secret = settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.aws_endpoint_url or None,
        aws_access_key_id=settings.aws_access_key_id or None,
        aws_secret_access_key=secret,
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


@dataclass
class ObjectStore:
    """A bucket and a boto3 client. Thread-safe (boto3 clients are)."""

    bucket: str
    client: Any

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **client_options) -> "ObjectStore":
        settings = settings or get_settings()
        return cls(settings.bucket, make_s3_client(settings, **client_options))

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
            if code in ("404", "NoSuchBucket", "NotFound"):
                self.client.create_bucket(Bucket=self.bucket)
            else:
                raise StorageError(f"bucket {self.bucket!r}: {error}") from error

    # --- objects ---
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None, md5_hex: str | None = None) -> str:
        """Put `data` at `key`. With `md5_hex` (the MD5 of `data`, already computed) the server
        checks the bytes it received against it (Content-MD5)."""
        extra = {"ContentType": content_type} if content_type else {}
        if md5_hex:
            extra["ContentMD5"] = base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")
        self.client.put_object(Bucket=self.bucket, Key=self.key_of(key), Body=data, **extra)
        return self.uri(self.key_of(key))

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
            raise
        return True

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key_of(key))["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StorageError(f"no object {self.uri(self.key_of(key))}", transient=False) from error
            raise

    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, json.dumps(obj, indent=2, default=str).encode(), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_file(self, key: str, path: Path | str, content_type: str | None = None) -> str:
        extra = {"ExtraArgs": {"ContentType": content_type}} if content_type else {}
        self.client.upload_file(str(path), self.bucket, self.key_of(key), **extra)
        return self.uri(self.key_of(key))

    def download_file(self, key: str, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            self.client.download_file(self.bucket, self.key_of(key), str(tmp))
        except ClientError as error:
            missing = error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")
            raise StorageError(f"cannot download {self.uri(self.key_of(key))}: {error}",
                               transient=not missing) from error
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
            self.client.head_object(Bucket=self.bucket, Key=self.key_of(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """All keys under `prefix`: one paginated listing (1,000 keys a request)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def list_keys(self, prefix: str = "") -> list[str]:
        return list(self.iter_keys(prefix))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True}
            )
        return len(keys)

    def presign(self, key: str, expires_seconds: int = 7 * 24 * 3600) -> str | None:
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key_of(key)}, ExpiresIn=expires_seconds
            )
        except Exception:  # noqa: BLE001 - some stores cannot presign; the caller falls back to the URI
            return None
