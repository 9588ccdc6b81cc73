"""Spooling a remote image archive (`s3://bucket/key.zip`, `https://.../images.tar.gz`) to one
local file, so it can be read like a local archive (zip members need seeking).

The spool is at most `dermflow.ingestion.archive.MAX_SPOOL_BYTES` (32 GiB unless
`DERMFLOW_MAX_SPOOL_BYTES` says otherwise): refused before the download when the size is
announced, cut off when it is not. It is written to `<name>.part` and renamed when complete, so
shards on one machine share one finished copy and a killed download is never mistaken for one.
https goes through the one guarded reader (`dermflow.ingestion.http`), streamed to the file.
`release_spool` deletes it when the import is over.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dermflow.ingestion import archive

if TYPE_CHECKING:
    from dermflow.storage import ObjectStore


def default_spool_dir() -> Path:
    from dermflow.settings import get_settings

    return get_settings().local_cache_dir / "archives"


def _check_room(spec: str, size: int | None, folder: Path) -> None:
    if size is not None and size > archive.MAX_SPOOL_BYTES:
        raise archive.ArchiveError(f"image source {spec}: {size} bytes is over the spool limit of "
                                   f"{archive.MAX_SPOOL_BYTES} bytes (DERMFLOW_MAX_SPOOL_BYTES)")
    free = shutil.disk_usage(folder).free
    if size is not None and size > free:
        raise archive.ArchiveError(f"image source {spec}: {size} bytes do not fit in {folder} ({free} bytes free)")


def _spool_s3(spec: str, store: ObjectStore, part: Path) -> None:
    from botocore.exceptions import ClientError

    from dermflow.storage import parse_s3_uri

    bucket, key = parse_s3_uri(spec)
    try:
        size = int(store.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as error:
        raise archive.ArchiveError(f"image source {spec}: no such object ({error})") from error
    _check_room(spec, size, part.parent)
    store.client.download_file(bucket, key, str(part))


def _spool_https(spec: str, part: Path) -> None:
    from dermflow.ingestion.http import ReadPolicy, URLReader, URLReadError

    _check_room(spec, None, part.parent)
    policy = ReadPolicy(max_bytes=archive.MAX_SPOOL_BYTES, read_timeout=60.0, total_timeout=24 * 3600.0)
    with part.open("wb") as handle, URLReader(policy) as reader:
        try:
            reader.read(spec, sink=handle.write)
        except URLReadError as error:
            raise archive.ArchiveError(f"image source {spec}: cannot download it: {error}") from error


def spool_remote(spec: str, store: ObjectStore | None, spool_dir: Path | None = None) -> Path:
    """The local copy of the remote archive `spec`, downloaded unless already complete."""
    folder = spool_dir or default_spool_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = archive.spool_path(spec, folder)
    if path.exists():
        return path
    part = path.with_name(path.name + f".{id(path)}.part")
    try:
        if spec.startswith("s3://"):
            if store is None:
                raise archive.ArchiveError(f"image source {spec}: an s3:// source needs an object store")
            _spool_s3(spec, store, part)
        else:
            _spool_https(spec, part)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)
    return path


def release_spool(spec: str, spool_dir: Path | None = None) -> None:
    """Delete the local copy of a remote archive, if any (a local source is never touched)."""
    if spec.startswith(("s3://", "https://", "http://")):
        archive.spool_path(spec, spool_dir or default_spool_dir()).unlink(missing_ok=True)
