"""What every task needs: the settings and an object store, built per process (never pickled)."""

from __future__ import annotations

from functools import lru_cache

from dermflow.settings import Settings, get_settings
from dermflow.storage import ObjectStore


@lru_cache(maxsize=1)
def object_store() -> ObjectStore:
    return ObjectStore.from_settings(get_settings(), max_pool_connections=64)


def settings() -> Settings:
    return get_settings()
