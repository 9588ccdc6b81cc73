"""What every task needs: the settings, an object store built per process (never pickled), and
the retry rule (only transient errors are retried; see `dermflow.errors`)."""

from __future__ import annotations

from functools import lru_cache

from dermflow.errors import is_transient
from dermflow.settings import Settings, get_settings
from dermflow.storage import ObjectStore


@lru_cache(maxsize=1)
def object_store() -> ObjectStore:
    return ObjectStore.from_settings(get_settings(), max_pool_connections=64)


def settings() -> Settings:
    return get_settings()


def failure_of(state) -> BaseException | None:
    """The exception a Failed state holds, or None."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception as error:  # noqa: BLE001 - reading the result raised the failure itself
        return error
    return result if isinstance(result, BaseException) else None


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry unless the task failed with a permanent
    `DermflowError` (bad input, a missing file: retrying cannot help)."""
    error = failure_of(state)
    return True if error is None else is_transient(error)
