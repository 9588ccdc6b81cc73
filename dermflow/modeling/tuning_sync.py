"""Mirror of a local keras-tuner project directory in the bucket: what makes a search resumable
on another machine and lets distributed workers share one search."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from dermflow import layout


class ProjectSync:
    """Mirrors a local keras-tuner project directory to `tuning/<tuning_id>/` in the bucket.

    `push()` uploads files that are new or changed since the last push (size and mtime);
    `pull()` downloads bucket files absent or of another size locally. Thread-safe.
    """

    def __init__(self, store, tuning_id: str, local_dir: Path):
        self.store = store
        self.prefix = layout.tuning_prefix(tuning_id)
        self.local_dir = Path(local_dir)
        self._pushed: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def _local_files(self) -> Iterator[Path]:
        if self.local_dir.exists():
            for path in sorted(self.local_dir.rglob("*")):
                if path.is_file() and not path.name.endswith((".part", ".lock")):
                    yield path

    def push(self) -> int:
        uploaded = 0
        with self._lock:
            for path in self._local_files():
                relative = path.relative_to(self.local_dir).as_posix()
                stat = path.stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
                if self._pushed.get(relative) == stamp:
                    continue
                self.store.put_file(self.prefix + relative, path)
                self._pushed[relative] = stamp
                uploaded += 1
        return uploaded

    def pull(self) -> int:
        downloaded = 0
        with self._lock:
            for key, size in self.store.iter_sizes(self.prefix):
                relative = key[len(self.prefix):]
                path = self.local_dir / relative
                if path.exists() and path.stat().st_size == size:
                    continue
                self.store.download_file(key, path)
                stat = path.stat()
                self._pushed[relative] = (stat.st_size, stat.st_mtime_ns)
                downloaded += 1
        return downloaded
