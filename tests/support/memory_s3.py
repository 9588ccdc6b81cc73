"""An in-memory stand-in for the boto3 S3 client, for unit tests of tasks and flows that need
no stack: `memory_store()` is a real `ObjectStore` over it, so the store's own code runs.

It implements only the calls `ObjectStore` makes, with S3's error codes (`NoSuchKey`, `404`).
"""

from __future__ import annotations

import threading
from pathlib import Path

from botocore.exceptions import ClientError

from dermflow.storage import ObjectStore


def _missing(operation: str, code: str = "NoSuchKey") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "not found"}}, operation)


class _Paginator:
    def __init__(self, client: "MemoryS3Client") -> None:
        self.client = client

    def paginate(self, Bucket: str, Prefix: str = "", Delimiter: str | None = None):  # noqa: N803 - boto3 names
        keys = sorted(key for key in self.client.objects if key.startswith(Prefix))
        if not Delimiter:
            yield {"Contents": [{"Key": key, "Size": len(self.client.objects[key])} for key in keys]}
            return
        prefixes = sorted({Prefix + key[len(Prefix):].split(Delimiter, 1)[0] + Delimiter
                           for key in keys if Delimiter in key[len(Prefix):]})
        yield {"Contents": [{"Key": k, "Size": len(self.client.objects[k])} for k in keys if Delimiter not in k[len(Prefix):]],
               "CommonPrefixes": [{"Prefix": p} for p in prefixes]}


class MemoryS3Client:
    """The subset of boto3's S3 client that `ObjectStore` uses, backed by a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def head_bucket(self, Bucket: str) -> dict:  # noqa: N803
        return {}

    def create_bucket(self, Bucket: str) -> dict:  # noqa: N803
        return {}

    def put_object(self, Bucket: str, Key: str, Body: bytes, IfNoneMatch: str | None = None,  # noqa: N803
                   **_: object) -> dict:
        with self._lock:  # like S3: the If-None-Match check and the write are one step
            if IfNoneMatch == "*" and Key in self.objects:
                raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "exists"}}, "PutObject")
            self.objects[Key] = bytes(Body)
        return {}

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803
        import io

        if Key not in self.objects:
            raise _missing("GetObject")
        return {"Body": io.BytesIO(self.objects[Key])}

    def head_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803
        if Key not in self.objects:
            raise _missing("HeadObject", "404")
        return {"ContentLength": len(self.objects[Key])}

    def list_objects_v2(self, Bucket: str, Prefix: str = "", MaxKeys: int = 1000, **_: object) -> dict:  # noqa: N803
        keys = sorted(key for key in self.objects if key.startswith(Prefix))[:MaxKeys]
        return {"Contents": [{"Key": key} for key in keys], "KeyCount": len(keys)}

    def get_paginator(self, name: str) -> _Paginator:
        assert name == "list_objects_v2", name
        return _Paginator(self)

    def delete_objects(self, Bucket: str, Delete: dict) -> dict:  # noqa: N803
        with self._lock:
            for item in Delete["Objects"]:
                self.objects.pop(item["Key"], None)
        return {}

    def upload_file(self, filename: str, bucket: str, key: str, **_: object) -> None:
        with self._lock:
            self.objects[key] = Path(filename).read_bytes()

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        if key not in self.objects:
            raise _missing("GetObject", "404")
        Path(filename).write_bytes(self.objects[key])

    def generate_presigned_url(self, operation: str, Params: dict, ExpiresIn: int) -> str:  # noqa: N803
        return f"memory://{Params['Bucket']}/{Params['Key']}?expires={ExpiresIn}"


def memory_store(bucket: str = "memory") -> ObjectStore:
    """A real `ObjectStore` over an in-memory client."""
    return ObjectStore(bucket, MemoryS3Client())


__all__ = ["MemoryS3Client", "memory_store"]
