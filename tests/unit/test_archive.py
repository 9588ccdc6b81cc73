"""Image sources: matching members to rows, and the zip/tar/folder readers' refusals."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile

import pytest

from dermflow.ingestion import archive
from dermflow.ingestion.archive import ArchiveError, match_members, open_source

MD5_A = "0" * 31 + "a"
MD5_B = "b" * 32
MD5_C = "c" * 32


def test_matching_any_folder_any_extension_any_case():
    names = [
        f"{MD5_A}.jpg",
        f"deep/nested/folder/{MD5_B.upper()}.JPEG",
        f"x/{MD5_C}.Png",
        "__MACOSX/._" + MD5_A + ".jpg",
        f"x/.DS_Store",
        "README.md",
        "notes.txt",
        "photo_001.jpg",
        "d" * 32 + ".jpg",  # an md5 the CSV does not have
        f"again/{MD5_A}.png",  # a second member for the same row
    ]
    match = match_members(names, {MD5_A, MD5_B, MD5_C})
    assert match.matched == {MD5_A: f"{MD5_A}.jpg", MD5_B: f"deep/nested/folder/{MD5_B.upper()}.JPEG",
                             MD5_C: f"x/{MD5_C}.Png"}
    assert match.unused.counts == {"junk": 4, "not_md5": 1, "not_in_csv": 1, "duplicate": 1}
    assert match.members == len(names)
    assert "photo_001.jpg" in match.unused.examples["not_md5"]


def test_unused_listing_is_bounded():
    names = [f"junk{i}.txt" for i in range(1000)]
    unused = match_members(names, set()).unused.as_dict()
    assert unused["counts"] == {"junk": 1000}
    assert len(unused["examples"]["junk"]) == archive.UNUSED_EXAMPLES


def _zip(path, members: dict[str, bytes], **write_options) -> str:
    with zipfile.ZipFile(path, "w") as handle:
        for name, body in members.items():
            handle.writestr(name, body, **write_options)
    return str(path)


def _tar(path, members: dict[str, bytes], mode: str = "w:gz") -> str:
    with tarfile.open(path, mode) as handle:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            handle.addfile(info, io.BytesIO(body))
    return str(path)


MEMBERS = {f"imgs/{MD5_A}.JPG": b"first", f"imgs/sub/{MD5_B}.png": b"second", "README": b"hello"}


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tgz", "dir"])
def test_every_reader_lists_and_reads_members(tmp_path, kind):
    if kind == "zip":
        spec = _zip(tmp_path / "a.zip", MEMBERS)
    elif kind == "dir":
        for name, body in MEMBERS.items():
            (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / name).write_bytes(body)
        spec = str(tmp_path / "d")
    else:
        spec = _tar(tmp_path / f"a.{kind}", MEMBERS, "w" if kind == "tar" else "w:gz")
    with open_source(spec) as source:
        assert sorted(source.names()) == sorted(MEMBERS)
        if isinstance(source, archive.TarSource):
            assert source.streamed == (kind != "tar")
        wanted = [f"imgs/sub/{MD5_B}.png", f"imgs/{MD5_A}.JPG"]
        assert dict(source.read_members(wanted)) == {name: MEMBERS[name] for name in wanted}


def test_missing_path_names_the_source(tmp_path):
    with pytest.raises(ArchiveError, match="no such file or folder") as caught:
        open_source(str(tmp_path / "nothing.zip"))
    assert "nothing.zip" in str(caught.value)
    assert not caught.value.transient


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archive(tmp_path, kind):
    import random

    noise = random.Random(0).randbytes(200_000)
    members = {f"{MD5_A}.jpg": noise, f"{MD5_B}.jpg": noise[::-1]}
    path = tmp_path / f"a.{kind}"
    _zip(path, members) if kind == "zip" else _tar(path, members)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="corrupt or truncated") as caught:
        with open_source(str(path)) as source:
            source.names()
    assert str(path) in str(caught.value)


def test_not_an_archive(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"this is not a zip at all")
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        open_source(str(path))


@pytest.mark.parametrize("name", ["../escape/" + MD5_A + ".jpg", "/etc/" + MD5_A + ".jpg", "a/../../" + MD5_A + ".jpg"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_traversal_and_absolute_members_are_refused(tmp_path, name, kind):
    path = tmp_path / f"a.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as handle:
            handle.writestr(zipfile.ZipInfo(name), b"x")  # ZipInfo keeps the name as given
    else:
        _tar(path, {name: b"x"})
    with pytest.raises(ArchiveError, match="absolute path|climbs out") as caught:
        with open_source(str(path)) as source:
            source.names()
    assert str(path) in str(caught.value)


def test_symlink_members_are_refused(tmp_path):
    zpath = tmp_path / "links.zip"
    info = zipfile.ZipInfo(f"{MD5_A}.jpg")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(zpath, "w") as handle:
        handle.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symlink"):
        with open_source(str(zpath)) as source:
            source.names()
    tpath = tmp_path / "links.tar.gz"
    with tarfile.open(tpath, "w:gz") as handle:
        link = tarfile.TarInfo(f"{MD5_A}.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        handle.addfile(link)
    with pytest.raises(ArchiveError, match="link"):
        with open_source(str(tpath)) as source:
            source.names()
    folder = tmp_path / "dir"
    folder.mkdir()
    os.symlink("/etc/passwd", folder / f"{MD5_A}.jpg")
    with pytest.raises(ArchiveError, match="symlink"):
        open_source(str(folder)).names()


def test_password_protected_zip_is_refused(tmp_path):
    path = tmp_path / "locked.zip"
    _zip(path, {f"{MD5_A}.jpg": b"secret"})
    data = bytearray(path.read_bytes())
    # Set the "encrypted" flag (bit 0 of the general purpose flags) in the local header and
    # the central directory entry: what a password-protected archive carries.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        data[at + offset] |= 0x1
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="password-protected") as caught:
        with open_source(str(path)) as source:
            source.names()
    assert "locked.zip" in str(caught.value)


def test_a_damaged_member_is_reported_not_raised(tmp_path):
    path = tmp_path / "crc.zip"
    body = hashlib.sha256(b"x").digest() * 100
    _zip(path, {f"{MD5_A}.jpg": body, f"{MD5_B}.jpg": b"fine"}, compress_type=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    at = data.find(body)
    data[at + 10] ^= 0xFF  # flip a byte of the first member's data: its CRC no longer matches
    path.write_bytes(bytes(data))
    with open_source(str(path)) as source:
        read = dict(source.read_members([f"{MD5_A}.jpg", f"{MD5_B}.jpg"]))
    assert isinstance(read[f"{MD5_A}.jpg"], archive.MemberDamaged)
    assert read[f"{MD5_B}.jpg"] == b"fine"


def test_an_oversized_member_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 10)
    spec = _tar(tmp_path / "big.tar", {f"{MD5_A}.jpg": b"x" * 100}, "w")
    with open_source(spec) as source:
        source.names()
        ((_, body),) = source.read_members([f"{MD5_A}.jpg"])
    assert isinstance(body, archive.MemberDamaged) and body.reason == "too_large"


def test_remote_archive_names_must_be_archives():
    with pytest.raises(ArchiveError, match="must name a .zip"):
        open_source("https://example.org/images/")


def test_shards_of_one_process_share_an_open_archive_until_it_changes(tmp_path):
    path = tmp_path / "a.zip"
    _zip(path, MEMBERS)
    first = archive.shared_source(str(path))
    assert archive.shared_source(str(path)) is first
    _zip(path, {**MEMBERS, f"{MD5_C}.jpg": b"third"})
    os.utime(path, ns=(1, 1))  # a different archive at the same path
    again = archive.shared_source(str(path))
    assert again is not first and f"{MD5_C}.jpg" in again.names()
