"""Waiting for the Prefect API before `dermflow up` uses it.

A server that answers `/health` may still refuse connections for a moment (one just restarted,
or one still shutting down after `dermflow down`): `up` then failed with an
`httpx.ConnectError` traceback. Here a call to the API is retried while the error is one a
starting server gives (no connection, a timeout, a 5xx), until a deadline; then, or at once for
an error that waiting cannot fix (401: wrong auth string), a one-line `ApiNotReady`.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import httpx

from dermflow.errors import DermflowError

T = TypeVar("T")


class ApiNotReady(DermflowError, RuntimeError):
    """The Prefect API did not answer in time, or refused the call (a one-line message)."""


def _transient(error: BaseException) -> bool:
    if isinstance(error, httpx.TransportError):
        return True
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, (ConnectionError, TimeoutError))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


# How long `dermflow up` waits for the API to answer (a cold server may migrate its database).
DEFAULT_TIMEOUT = 90.0


def call_when_ready(call: Callable[[], T], api_url: str, timeout: float | None = None, interval: float = 1.0,
                    sleep: Callable[[float], None] | None = None,
                    clock: Callable[[], float] | None = None) -> T:
    """`call()`'s result, retried while the API at `api_url` is not answering yet (each wait
    `interval` seconds, doubling up to 5 s) until `timeout` seconds (DEFAULT_TIMEOUT) have passed."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    sleep, clock = sleep or time.sleep, clock or time.monotonic
    deadline = clock() + timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - sorted below: retried, or one clear line
            if isinstance(error, httpx.HTTPStatusError) and error.response.status_code in (401, 403):
                raise ApiNotReady(f"the Prefect API at {api_url} refused the call ({_one_line(error)}): "
                                  "check PREFECT_API_AUTH_STRING in .env") from None
            if not _transient(error):
                raise
            if clock() >= deadline:
                raise ApiNotReady(f"the Prefect API at {api_url} is not answering after {timeout:.0f}s "
                                  f"and {attempts} attempt(s): {_one_line(error)}; see `dermflow status` "
                                  "and the server's log in the data dir's run/prefect-server.log") from None
        sleep(min(interval * 2 ** min(attempts - 1, 3), 5.0, max(deadline - clock(), 0.0)))
