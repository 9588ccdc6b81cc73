"""A run's inputs given as local paths, made readable from the hosts that need them.

A flow run reads its parameters on whatever host its worker runs on, and its tasks may run on
still others (Dask workers, `gpu` workers). A local path means something on one host only, so:

- `check_local(parameter, value)`: a local path must exist on this host, else an `InputError`
  that names the parameter and says what to pass instead;
- `stage(store, path)`: uploads a local file or folder to the bucket, content-addressed under
  `private/inputs/<digest>/` (uploaded once, however often it is staged), and returns its
  `s3://` URI, which every host reads the same way;
- `local_copy(store, uri, cache_dir)`: the other way, for inputs a library wants as a file
  (backbone weights): an `s3://` URI downloaded once into this host's cache.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from dermflow import layout
from dermflow.errors import DermflowError

REMOTE_PREFIXES = ("s3://", "https://", "http://")
# Values of `weights` that are not files.
NAMED_WEIGHTS = ("imagenet", "none")
_CHUNK = 1 << 20


class InputError(DermflowError):
    """A run input cannot be read where it is needed (permanent: the user must change it)."""


def is_local(value: str | None) -> bool:
    """True for a local path (not a URI, not a named weights choice, not empty)."""
    return bool(value) and not value.startswith(REMOTE_PREFIXES) and value not in NAMED_WEIGHTS


def check_local(parameter: str, value: str) -> Path:
    """The existing local path `value` names, or an InputError naming `parameter`."""
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(
            f"{parameter}={value!r} is a local path that does not exist on {socket.gethostname()}, where this "
            f"flow run runs (not necessarily where it was started). Pass an s3:// or https:// URI instead; "
            f"`dermflow stage PATH` uploads a local file or folder to the bucket and prints its s3:// URI."
        )
    return path


def _file_digest(path: Path, digest=None):
    digest = digest or hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def content_digest(path: Path) -> str:
    """A 16-hex digest of a file's bytes, or of a folder's relative paths and files' bytes."""
    if path.is_file():
        return _file_digest(path).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in _folder_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        _file_digest(file, digest)
    return digest.hexdigest()[:16]


def stage(store, path: Path | str) -> str:
    """Upload a local file or folder to the bucket (once: the key is its content digest) and
    return its `s3://` URI; a folder's URI ends with `/` (an `s3://bucket/prefix/` source)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise InputError(f"{path} does not exist")
    prefix = layout.staged_input_prefix(content_digest(path))
    if path.is_file():
        key = prefix + path.name
        if not store.exists(key):
            store.put_file(key, path)
        return store.uri(key)
    files = _folder_files(path)
    if not files:
        raise InputError(f"{path} is an empty folder")
    # written last, beside the prefix (not in it: readers list the prefix): a stage cut short
    # is redone, never half-used
    marker = prefix.rstrip("/") + ".complete"
    if not store.exists(marker):
        for file in files:
            store.put_file(prefix + file.relative_to(path).as_posix(), file)
        store.put_bytes(marker, b"")
    return store.uri(prefix)


def local_copy(store, uri: str, cache_dir: Path | str) -> Path:
    """The file an `s3://` URI names, downloaded once into `cache_dir/inputs/`."""
    key = store.key_of(uri)
    target = Path(cache_dir) / "inputs" / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(key).name
    if not target.is_file():
        store.download_file(key, target)
    return target


def weights_on_this_host(store, weights: str, cache_dir: Path | str) -> str:
    """`weights` as `create_model` takes it here: an `s3://` URI becomes a local copy's path."""
    if weights.startswith("s3://"):
        return str(local_copy(store, weights, cache_dir))
    return weights
