"""Image sources other than URLs: an archive, a folder or an S3 prefix holding the dataset's
images named by md5hash, as the dataset's maintainers now hand them out.

`match_members` pairs member names with dataset rows: a member matches the row whose md5hash
is its file stem, in any folder, with any image extension, case-insensitive. What is not used
is counted by kind (`junk`: `__MACOSX/`, dot files, READMEs and other non-images;
`not_md5`: images not named by an md5; `not_in_csv`; `duplicate`: a second member for the
same md5), with the first few names of each kind (`UNUSED_EXAMPLES`).

`open_source(spec)` reads one source; a source lists its members (`names`, checked for
safety) and yields the bytes of the members asked for (`read_members`):

- a local directory (`DirSource`);
- a `.zip` (`ZipSource`): the central directory is read once, each member is seeked;
- a `.tar`, `.tar.gz`, `.tgz` (`TarSource`): an uncompressed tar is seeked by its members'
  offsets; a compressed one is streamed from the start (no random access into gzip), so a
  shard of it scans the archive once;
- `s3://bucket/prefix/` (`S3PrefixSource`): each object read on its own;
- an `s3://` or `https://` archive: spooled first to one local file (`spool_remote`), at most
  `MAX_SPOOL_BYTES` (refused before download when the size is known, cut off when it is not),
  then read as a local archive. https goes through the guarded reader
  (`dermflow.ingestion.http`).

Nothing is extracted to disk and no archive is loaded whole: at most one member
(`MAX_MEMBER_BYTES`) is held per read. A bad source raises `ArchiveError` (permanent) naming
the source and the problem: a missing path, a corrupt or truncated archive, a
password-protected zip, a member path with `..` or an absolute path, a symlink member.
A member that is damaged on its own (bad CRC) is yielded as a `MemberDamaged` instead, so its
row can fall back to its URL.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tarfile
import threading
import zipfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from zlib import error as ZlibError  # noqa: N812 - a damaged gzip stream raises it

from dermflow.errors import DermflowError

if TYPE_CHECKING:
    from dermflow.storage import ObjectStore

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
MD5_STEM = re.compile(r"^[0-9a-fA-F]{32}$")
UNUSED_EXAMPLES = 20  # names kept per kind of unused member (the counts are complete)
MAX_MEMBER_BYTES = 50 * 2**20  # the fetcher's body cap: one member is at most this in memory
# A remote archive is spooled to one local file of at most this size (the real dataset's
# images are ~2.5 GB); DERMFLOW_MAX_SPOOL_BYTES raises it.
MAX_SPOOL_BYTES = int(os.environ.get("DERMFLOW_MAX_SPOOL_BYTES", 32 * 2**30))
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


class ArchiveError(DermflowError, ValueError):
    """An image source that cannot be used (permanent): the message names it and the problem."""


@dataclass(frozen=True)
class MemberDamaged:
    """A member that could not be read on its own (bad CRC, cut short, over the size cap)."""

    reason: str  # damaged_member | too_large
    detail: str


# --------------------------------------------------------------------------------------------
# matching members to rows


@dataclass
class UnusedMembers:
    """Members not used, counted by kind, with the first `UNUSED_EXAMPLES` names of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, name: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        names = self.examples.setdefault(kind, [])
        if len(names) < UNUSED_EXAMPLES:
            names.append(name)

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": {k: list(v) for k, v in sorted(self.examples.items())}}


@dataclass
class MemberMatch:
    matched: dict[str, str]  # md5hash (lower case) -> member name
    unused: UnusedMembers
    members: int  # file members seen


def member_kind(name: str) -> tuple[str, str]:
    """('image', md5) for a member named by an md5 with an image extension, else (kind, '')
    with kind `junk` or `not_md5`."""
    path = PurePosixPath(name.replace("\\", "/"))
    if any(part == "__MACOSX" or part.startswith(".") for part in path.parts):
        return "junk", ""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "junk", ""
    stem = path.name[: -len(path.suffix)]
    if not MD5_STEM.match(stem):
        return "not_md5", ""
    return "image", stem.lower()


def match_members(names: Iterable[str], wanted: Collection[str]) -> MemberMatch:
    """Pair member names with the md5hashes in `wanted` (lower case); see the module docstring."""
    matched: dict[str, str] = {}
    unused = UnusedMembers()
    members = 0
    for name in names:
        members += 1
        kind, md5 = member_kind(name)
        if kind != "image":
            unused.add(kind, name)
        elif md5 not in wanted:
            unused.add("not_in_csv", name)
        elif md5 in matched:
            unused.add("duplicate", name)
        else:
            matched[md5] = name
    return MemberMatch(matched=matched, unused=unused, members=members)


# --------------------------------------------------------------------------------------------
# member safety


def check_member_path(source: str, name: str) -> None:
    """Refuse a member path that is absolute or climbs out with `..` (the whole source)."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise ArchiveError(f"image source {source}: member {name!r} has an absolute path; refusing the archive")
    if ".." in PurePosixPath(posix).parts:
        raise ArchiveError(f"image source {source}: member {name!r} climbs out of the archive with '..'; "
                           "refusing the archive")


def _read_capped(handle, name: str) -> bytes | MemberDamaged:
    body = handle.read(MAX_MEMBER_BYTES + 1)
    if len(body) > MAX_MEMBER_BYTES:
        return MemberDamaged("too_large", f"{name}: over {MAX_MEMBER_BYTES} bytes")
    return body


# --------------------------------------------------------------------------------------------
# sources


class ImageSource:
    """A set of members: `names()` (file members, safety-checked), `read_members(names)`
    yields `(name, bytes | MemberDamaged)` for those present, in the source's order."""

    label: str  # how errors name the source

    def names(self) -> list[str]:
        raise NotImplementedError

    def read_members(self, names: Collection[str]) -> Iterator[tuple[str, bytes | MemberDamaged]]:
        raise NotImplementedError

    streamed = False  # True: reading any member scans the source from its start

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DirSource(ImageSource):
    def __init__(self, path: Path, label: str | None = None) -> None:
        self.root = path
        self.label = label or str(path)

    def names(self) -> list[str]:
        found = []
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            dirs.sort()
            for file_name in sorted(files):
                path = Path(folder) / file_name
                relative = path.relative_to(self.root).as_posix()
                if path.is_symlink():
                    raise ArchiveError(f"image source {self.label}: {relative!r} is a symlink; refusing the folder")
                if path.is_file():
                    found.append(relative)
        return found

    def read_members(self, names: Collection[str]) -> Iterator[tuple[str, bytes | MemberDamaged]]:
        for name in names:
            check_member_path(self.label, name)
            path = self.root / name
            if path.is_symlink():
                raise ArchiveError(f"image source {self.label}: {name!r} is a symlink; refusing the folder")
            try:
                with path.open("rb") as handle:
                    yield name, _read_capped(handle, name)
            except OSError as error:
                yield name, MemberDamaged("damaged_member", f"{name}: {error}")


class ZipSource(ImageSource):
    def __init__(self, path: Path, label: str | None = None) -> None:
        self.label = label or str(path)
        self._lock = threading.Lock()  # one member read at a time: shards of a process share it
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ArchiveError(f"image source {self.label}: not a readable zip (corrupt or truncated): {error}") from error

    def names(self) -> list[str]:
        found = []
        for info in self.zip.infolist():
            check_member_path(self.label, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(f"image source {self.label}: member {info.filename!r} is a symlink; "
                                   "refusing the archive")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"image source {self.label}: the zip is password-protected "
                                   f"({info.filename!r} is encrypted); give an unencrypted archive")
            if not info.is_dir():
                found.append(info.filename)
        return found

    def read_members(self, names: Collection[str]) -> Iterator[tuple[str, bytes | MemberDamaged]]:
        for name in names:
            try:
                with self._lock, self.zip.open(name) as handle:
                    body = _read_capped(handle, name)
            except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError) as error:
                body = MemberDamaged("damaged_member", f"{name}: {error}")
            yield name, body

    def close(self) -> None:
        self.zip.close()


class TarSource(ImageSource):
    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = path
        self.label = label or str(path)
        self.streamed = _is_compressed(path)
        self._offsets: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def _members(self) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
        try:
            # A compressed tar is streamed (gzip has no random access); a plain one is seeked
            # past each member's data.
            with tarfile.open(self.path, mode="r|*" if self.streamed else "r:") as archive:
                for info in archive:
                    yield archive, info
        except (tarfile.TarError, OSError, EOFError, ZlibError) as error:
            raise ArchiveError(f"image source {self.label}: not a readable tar (corrupt or truncated): "
                               f"{error or type(error).__name__}") from error

    def names(self) -> list[str]:
        found = []
        for _archive, info in self._members():
            check_member_path(self.label, info.name)
            if info.issym() or info.islnk():
                raise ArchiveError(f"image source {self.label}: member {info.name!r} is a link; refusing the archive")
            if info.isfile():
                found.append(info.name)
                self._offsets[info.name] = (info.offset_data, info.size)
        if not found and not self._offsets:
            self._check_not_empty()
        return found

    def _check_not_empty(self) -> None:
        if self.path.stat().st_size == 0:
            raise ArchiveError(f"image source {self.label}: the archive is empty")

    def read_members(self, names: Collection[str]) -> Iterator[tuple[str, bytes | MemberDamaged]]:
        wanted = set(names)
        if not self.streamed:
            with self._lock:
                if not self._offsets:
                    self.names()  # the members' offsets, from the headers (seeked past the data)
            yield from self._read_seeked(wanted)
            return
        for archive, info in self._members():
            if info.name in wanted and info.isfile():
                handle = archive.extractfile(info)
                yield info.name, (_read_capped(handle, info.name) if handle else
                                  MemberDamaged("damaged_member", info.name))

    def _read_seeked(self, wanted: set[str]) -> Iterator[tuple[str, bytes | MemberDamaged]]:
        with self.path.open("rb") as handle:
            for name in sorted(wanted, key=lambda n: self._offsets.get(n, (0, 0))[0]):
                if name not in self._offsets:
                    continue
                offset, size = self._offsets[name]
                if size > MAX_MEMBER_BYTES:
                    yield name, MemberDamaged("too_large", f"{name}: over {MAX_MEMBER_BYTES} bytes")
                    continue
                handle.seek(offset)
                body = handle.read(size)
                yield name, body if len(body) == size else MemberDamaged("damaged_member", f"{name}: cut short")


def _is_compressed(path: Path) -> bool:
    with path.open("rb") as handle:
        magic = handle.read(6)
    return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"


class S3PrefixSource(ImageSource):
    def __init__(self, store: ObjectStore, bucket: str, prefix: str) -> None:
        self.client = store.client
        self.bucket = bucket
        self.prefix = prefix
        self.label = f"s3://{bucket}/{prefix}"

    def names(self) -> list[str]:
        from botocore.exceptions import ClientError

        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                found.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        except ClientError as error:
            raise ArchiveError(f"image source {self.label}: cannot list it: {error}") from error
        return [name for name in found if name and not name.endswith("/")]

    def read_members(self, names: Collection[str]) -> Iterator[tuple[str, bytes | MemberDamaged]]:
        for name in names:
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
                yield name, _read_capped(body, name)
            except Exception as error:  # noqa: BLE001 - one unreadable object falls back to its URL
                yield name, MemberDamaged("damaged_member", f"{name}: {type(error).__name__}: {error}")


# --------------------------------------------------------------------------------------------
# opening a source


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def spool_path(spec: str, spool_dir: Path) -> Path:
    """Where a remote archive is spooled (one file per source, shared by a machine's shards)."""
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    name = PurePosixPath(spec.split("?", 1)[0]).name
    return spool_dir / f"{digest}-{name}"


def open_local(path: Path, label: str | None = None) -> ImageSource:
    """A local folder or archive; `ArchiveError` when it is missing or not an archive."""
    label = label or str(path)
    if not path.exists():
        raise ArchiveError(f"image source {label}: no such file or folder")
    if path.is_dir():
        return DirSource(path, label)
    if path.name.lower().endswith(".zip") or zipfile.is_zipfile(path):
        return ZipSource(path, label)
    if is_archive_name(path.name):
        return TarSource(path, label)
    raise ArchiveError(f"image source {label}: not a folder, .zip, .tar, .tar.gz or .tgz")


def open_source(spec: str, store: ObjectStore | None = None, spool_dir: Path | None = None) -> ImageSource:
    """The source `spec` names: a local path, `s3://bucket/prefix/`, or an `s3://`/`https://`
    archive (spooled under `spool_dir` first, reused when already there)."""
    spec = spec.strip()
    if spec.startswith(("s3://", "https://", "http://")):
        if spec.startswith("s3://") and not is_archive_name(spec):
            from dermflow.storage import parse_s3_uri

            if store is None:
                raise ArchiveError(f"image source {spec}: an s3:// source needs an object store")
            bucket, prefix = parse_s3_uri(spec if spec.endswith("/") else spec + "/")
            return S3PrefixSource(store, bucket, prefix)
        if not is_archive_name(spec.split("?", 1)[0]):
            raise ArchiveError(f"image source {spec}: a URL must name a .zip, .tar, .tar.gz or .tgz")
        from dermflow.ingestion.spool import spool_remote

        return open_local(spool_remote(spec, store, spool_dir), label=spec)
    return open_local(Path(spec).expanduser(), label=spec)


_SHARED: dict[tuple, ImageSource] = {}
_SHARED_LOCK = threading.Lock()
SHARED_SOURCES = 4  # sources kept open per process


def shared_source(spec: str, store: ObjectStore | None = None, spool_dir: Path | None = None) -> ImageSource:
    """`open_source(spec)`, kept open for the process's next shards of the same archive file
    (a zip's central directory, a tar's headers are read once per process, not once per
    shard). Keyed by the file's path, size and mtime, so a changed archive is opened again.
    The caller must not close it."""
    remote = spec.startswith(("s3://", "https://", "http://"))
    if remote and not is_archive_name(spec.split("?", 1)[0]):
        return open_source(spec, store, spool_dir)  # an S3 prefix: nothing worth keeping open
    if remote:
        from dermflow.ingestion.spool import spool_remote

        path = spool_remote(spec, store, spool_dir)
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        return open_source(spec, store, spool_dir)  # a folder (cheap to open), or the error
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    with _SHARED_LOCK:
        if key not in _SHARED:
            if len(_SHARED) >= SHARED_SOURCES:
                _SHARED.pop(next(iter(_SHARED)))  # left to the garbage collector: a shard may still read it
            _SHARED[key] = open_local(path, label=spec)
        return _SHARED[key]
