"""Guarded HTTP GETs: the one way dermflow reads a URL (fetched images, a dataset CSV given as a
URL, an image to predict).

Every request goes through the SSRF guard (`dermflow.ingestion.guard`): http(s) only; each
hop's host is checked before its request, and the connection itself goes only to addresses
the guard has just resolved and checked (pinned, so DNS rebinding cannot reach an internal
address). Redirects are followed here, not by httpx, at most `max_redirects`, each hop checked
again. The body is streamed and refused past `max_bytes`, counted both on the wire and after
decoding: a gzip or deflate Content-Encoding (sent although only `identity` is asked for) is
inflated here with a bounded output, so a compression bomb is refused after at most
`max_bytes` of output, never held whole. A Content-Length that disagrees with the bytes on the
wire is a truncation. Each use has its own cap: `MAX_CSV_BYTES`, `MAX_FETCHED_IMAGE_BYTES`,
`MAX_PREDICT_IMAGE_BYTES`.

Failures are `URLReadError`s with a short `reason` (the fetch manifest's vocabulary:
`timeout`, `connect_error`, `truncated`, `http_<status>`, `too_large`, `bad_scheme`,
`blocked_address`, `too_many_redirects`, ...) and `transient` set: timeouts, connection
errors, truncation, 429 and 5xx may succeed later; other statuses, refused addresses and
schemes, and oversized bodies will not. Messages carry the URL with its credentials redacted
and never any of the fetched content.

`read_async` serves the async fetcher (one pooled client per shard, per-host politeness
around each hop); `URLReader` (a pool shared by many reads) and `read_url` (one read) serve
synchronous callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import timezone
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from dermflow.errors import DermflowError
from dermflow.ingestion.guard import (
    BlockedURL,
    HostGuard,
    Resolver,
    install_log_redaction,
    redact_url,
)

if TYPE_CHECKING:  # httpx is imported when a request is made, not at import time
    import httpx

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Size caps per use, in bytes, on the wire and after decoding alike.
MAX_CSV_BYTES = 64 * 2**20  # the dataset CSV (the Fitzpatrick 17k CSV is about 4 MB)
MAX_FETCHED_IMAGE_BYTES = 50 * 2**20  # one dataset image (they are well under 1 MB)
MAX_PREDICT_IMAGE_BYTES = 30 * 2**20  # one image given to `dermflow predict`
DEFAULT_MAX_BYTES = MAX_FETCHED_IMAGE_BYTES
# Content-Encodings inflated here (zlib wbits: 16+ = gzip container, 0+ = zlib container).
_INFLATE_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# A Hop gate wraps each request (e.g. a per-host semaphore and rate limit); given the hop's URL.
HopGate = Callable[[str], AbstractAsyncContextManager]
# A Sink receives a body's chunks in order (instead of the body being kept in memory).
Sink = Callable[[bytes], None]


class URLReadError(DermflowError, OSError):
    """A URL could not be read; `reason` says why in one word, `transient` whether a retry may help.

    `status` is the HTTP status when the server answered, `retry_after` the seconds the server
    asked to wait (429/503), if any. OSError stays a base: callers that read files or URLs
    alike catch OSError.
    """

    def __init__(self, reason: str, url: str, *, transient: bool = False, status: int | None = None,
                 retry_after: float | None = None, detail: str = "") -> None:
        self.reason = reason
        self.url = redact_url(url)
        self.status = status
        self.retry_after = retry_after
        self.detail = detail
        message = f"cannot read {self.url}: {reason}" + (f" ({detail})" if detail else "")
        if reason == "blocked_address":
            message += "; allow the host with DERMFLOW_ALLOWED_HOSTS if it is trusted"
        super().__init__(message, transient=transient)

    def __reduce__(self):  # keeps the fields across pickling (Prefect ships task failures)
        return (_rebuild_url_read_error, (self.reason, self.url, self.__dict__))


def _rebuild_url_read_error(reason: str, url: str, state: dict) -> URLReadError:
    error = URLReadError(reason, url)
    error.__dict__.update(state)
    return error


@dataclass(frozen=True)
class ReadPolicy:
    """Limits of one read. Times are seconds; `total_timeout` bounds one hop, headers to last byte.

    `refused_content_types` (prefixes, lower case) are refused from the headers, before the
    body is read, with `refused_content_reason` (e.g. an HTML error page where an image is due).
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # between two reads of the body
    total_timeout: float = 120.0
    retry_after_max: float = 120.0  # a server's Retry-After is honoured up to this
    refused_content_types: tuple[str, ...] = ()
    refused_content_reason: str = "unwanted_content_type"

    def __post_init__(self) -> None:
        for name in ("max_bytes", "connect_timeout", "read_timeout", "total_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ReadPolicy.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_redirects", "retry_after_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"ReadPolicy.{name} must be >= 0, got {getattr(self, name)!r}")


def parse_retry_after(value: str | None, now: float | None = None, cap: float = 120.0) -> float | None:
    """`Retry-After` (delta-seconds or an HTTP date) -> seconds to wait, within [0, cap]; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), cap)


# --------------------------------------------------------------------------------------------
# one request


@dataclass(frozen=True)
class _Redirect:
    location: str


def _redirect_or_refusal(response: httpx.Response, url: str, policy: ReadPolicy) -> _Redirect | None:
    """A redirect to follow, None for a 200 worth reading; raises `URLReadError` otherwise."""
    status = response.status_code
    if status in REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise URLReadError(f"http_{status}", url, status=status, detail="redirect without Location")
        return _Redirect(urljoin(url, location.strip()))
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("retry-after"), cap=policy.retry_after_max)
        raise URLReadError(f"http_{status}", url, transient=True, status=status, retry_after=retry_after)
    if status != 200:
        raise URLReadError(f"http_{status}", url, status=status)
    content_type = response.headers.get("content-type", "").lower()
    if policy.refused_content_types and content_type.startswith(policy.refused_content_types):
        raise URLReadError(policy.refused_content_reason, url)  # no need to download an error page
    return None


class _BoundedInflater:
    """Decodes a body's Content-Encoding chunk by chunk, never producing more than `max_bytes`
    in all (zlib's `max_length`): a compression bomb costs at most that much memory."""

    def __init__(self, encoding: str, url: str, policy: ReadPolicy) -> None:
        self.url, self.policy, self.produced = url, policy, 0
        if encoding in ("", "identity"):
            self.decoder = None
        elif encoding in _INFLATE_WBITS:
            self.decoder = zlib.decompressobj(_INFLATE_WBITS[encoding])
        else:
            raise URLReadError(policy.refused_content_reason, url, detail=f"Content-Encoding {encoding[:40]!r}")

    def feed(self, chunk: bytes) -> bytes:
        budget = self.policy.max_bytes - self.produced
        if self.decoder is None:
            out = chunk
        else:
            try:
                out = self.decoder.decompress(chunk, budget + 1)
            except zlib.error:
                raise URLReadError(self.policy.refused_content_reason, self.url, detail="undecodable body") from None
        self.produced += len(out)
        if self.produced > self.policy.max_bytes:
            raise URLReadError("too_large", self.url, detail=f"body over {self.policy.max_bytes} bytes once decoded")
        return out

    def finish(self) -> None:
        """Raise if a compressed body ended before its stream did. (Nothing is left to flush:
        input held back by `max_length` only exists once the cap is already exceeded.)"""
        if self.decoder is not None and not self.decoder.eof:
            raise URLReadError("truncated", self.url, transient=True, detail="compressed body ends early")


def _in_memory(content: bytes):
    async def chunks():
        yield content
    return chunks


async def _read_body(response: httpx.Response, url: str, policy: ReadPolicy, sink: Sink | None = None) -> bytes:
    """The body, streamed under `max_bytes` (on the wire and decoded) and checked against its
    Content-Length; with `sink`, each decoded chunk goes to it instead (b"" is returned)."""
    import httpx

    try:
        expected: int | None = int(response.headers["content-length"])
    except (KeyError, ValueError):
        expected = None
    if expected is not None and expected > policy.max_bytes:
        raise URLReadError("too_large", url, detail=f"Content-Length over {policy.max_bytes} bytes")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    raw_chunks = response.aiter_raw
    if response.is_stream_consumed:  # built in memory (a test's MockTransport): httpx has decoded it
        encoding, raw_chunks = "identity", _in_memory(response.content)
    inflater = _BoundedInflater(encoding, url, policy)
    body = bytearray()
    on_wire = 0
    try:
        async for chunk in raw_chunks():
            on_wire += len(chunk)
            if on_wire > policy.max_bytes:
                raise URLReadError("too_large", url, detail=f"body over {policy.max_bytes} bytes")
            decoded = inflater.feed(chunk)
            if sink is None:
                body += decoded
            else:
                sink(decoded)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError):
        if on_wire:  # the body had started: it was cut short
            raise URLReadError("truncated", url, transient=True) from None
        raise
    if expected is not None and on_wire != expected:  # Content-Length counts the bytes on the wire
        raise URLReadError("truncated", url, transient=True, detail=f"{on_wire} of {expected} bytes")
    inflater.finish()
    return bytes(body)


def _error_of(error: Exception, url: str, policy: ReadPolicy) -> URLReadError:
    """An httpx failure as a `URLReadError` (named by its type only: its text may quote the server)."""
    import httpx

    name = type(error).__name__
    if isinstance(error, httpx.TimeoutException):
        return URLReadError("timeout", url, transient=True, detail=name)
    if isinstance(error, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return URLReadError("bad_scheme", url, detail=name)
    if isinstance(error, httpx.DecodingError):
        return URLReadError(policy.refused_content_reason, url, detail=name)
    return URLReadError("connect_error", url, transient=True, detail=name)


async def _request_once(client: httpx.AsyncClient, url: str, policy: ReadPolicy,
                        sink: Sink | None = None) -> bytes | _Redirect:
    """One GET of `url`: its body, or the redirect to follow. Raises `URLReadError`."""
    import httpx

    try:
        async with client.stream("GET", url) as response:
            redirect = _redirect_or_refusal(response, url, policy)
            if redirect is not None:
                return redirect
            return await _read_body(response, url, policy, sink)
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise _error_of(error, url, policy) from None


async def _guarded_request(client: httpx.AsyncClient, url: str, policy: ReadPolicy,
                           sink: Sink | None = None) -> bytes | _Redirect:
    """`_request_once` within `total_timeout`, with a refusal at connect time as a `URLReadError`."""
    try:
        async with asyncio.timeout(policy.total_timeout):
            return await _request_once(client, url, policy, sink)
    except BlockedURL as error:  # refused at connect time (the host re-resolved to an internal address)
        raise URLReadError(error.reason, url, detail=error.detail) from None
    except TimeoutError:
        raise URLReadError("timeout", url, transient=True, detail=f"over {policy.total_timeout:g}s") from None


# --------------------------------------------------------------------------------------------
# following redirects, each hop guarded


async def read_async(client: httpx.AsyncClient, guard: HostGuard, url: str, policy: ReadPolicy,
                     *, hop_gate: HopGate | None = None, sink: Sink | None = None) -> bytes:
    """The body at `url`, following at most `policy.max_redirects` redirects, each hop checked
    by `guard` first. `hop_gate(hop_url)` wraps each request (per-host politeness); `sink`
    receives the body's chunks instead of it being returned (a large download to a file)."""
    current = url
    for _hop in range(policy.max_redirects + 1):
        try:
            await guard.check(current)
        except BlockedURL as error:
            raise URLReadError(error.reason, current, detail=error.detail) from None
        async with (hop_gate(current) if hop_gate is not None else contextlib.nullcontext()):
            outcome = await _guarded_request(client, current, policy, sink)
        if not isinstance(outcome, _Redirect):
            return outcome
        current = outcome.location
    raise URLReadError("too_many_redirects", url, detail=f"more than {policy.max_redirects}")


def make_async_client(guard: HostGuard, policy: ReadPolicy, *, user_agent: str, accept: str = "*/*",
                      transport: httpx.AsyncBaseTransport | None = None, connections: int = 64) -> httpx.AsyncClient:
    """An httpx client for `read_async`: pinned to `guard`'s addresses, no redirects of its own,
    no proxy from the environment. `transport` replaces the network (tests)."""
    import httpx

    timeout = httpx.Timeout(connect=policy.connect_timeout, read=policy.read_timeout, write=policy.read_timeout,
                            pool=None)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=30)
    if transport is None:
        from dermflow.ingestion.pinning import PinnedNetworkBackend

        transport = httpx.AsyncHTTPTransport(limits=limits)
        # httpx has no public hook for the connection pool's network backend; the pinned one
        # makes every connection go to addresses the guard has just checked (DNS rebinding).
        transport._pool._network_backend = PinnedNetworkBackend(guard)
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        follow_redirects=False,  # each hop is re-checked by the guard in `read_async`
        headers={"User-Agent": user_agent, "Accept": accept, "Accept-Encoding": "identity"},
        transport=transport,
        trust_env=False,  # a proxy from the environment would bypass the address guard
    )


# --------------------------------------------------------------------------------------------
# synchronous reads


class URLReader:
    """Synchronous guarded reads sharing one connection pool; thread-safe.

    The reads run on an event loop in a helper thread, started at the first read; `close()`
    (or leaving a `with` block) ends it. `allowed_hosts` and `user_agent` default to the
    settings (`DERMFLOW_ALLOWED_HOSTS`, `DERMFLOW_USER_AGENT`); `transport` and `resolver`
    replace the network (tests).
    """

    def __init__(self, policy: ReadPolicy | None = None, *, allowed_hosts: Iterable[str] | None = None,
                 user_agent: str | None = None, accept: str = "*/*",
                 transport: httpx.AsyncBaseTransport | None = None, resolver: Resolver | None = None) -> None:
        if allowed_hosts is None or user_agent is None:
            from dermflow.settings import get_settings

            settings = get_settings()
            allowed_hosts = settings.allowed_host_list if allowed_hosts is None else allowed_hosts
            user_agent = user_agent or settings.user_agent
        self.policy = policy or ReadPolicy()
        self.guard = HostGuard(tuple(allowed_hosts), resolver=resolver)
        self._client_options = {"user_agent": user_agent, "accept": accept, "transport": transport}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                install_log_redaction()
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="dermflow-url-reader", daemon=True)
                self._thread.start()
                self._client = make_async_client(self.guard, self.policy, **self._client_options)
                self._loop = loop
            return self._loop

    def read(self, url: str, sink: Sink | None = None) -> bytes:
        """The body at `url` (or b"", its chunks given to `sink`); raises `URLReadError`."""
        loop = self._running_loop()
        reading = read_async(self._client, self.guard, url, self.policy, sink=sink)
        return asyncio.run_coroutine_threadsafe(reading, loop).result()

    def close(self) -> None:
        with self._lock:
            loop, thread, client = self._loop, self._thread, self._client
            self._loop = self._thread = self._client = None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(client.aclose(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> URLReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_url(url: str, *, max_bytes: int | None = None, policy: ReadPolicy | None = None,
             allowed_hosts: Iterable[str] | None = None, user_agent: str | None = None,
             transport: httpx.AsyncBaseTransport | None = None, resolver: Resolver | None = None) -> bytes:
    """The body at `url`, read once through the guard (see `URLReader`); `max_bytes` overrides
    the policy's cap. Raises `URLReadError`."""
    policy = policy or ReadPolicy()
    if max_bytes is not None:
        policy = replace(policy, max_bytes=max_bytes)
    with URLReader(policy, allowed_hosts=allowed_hosts, user_agent=user_agent, transport=transport,
                   resolver=resolver) as reader:
        return reader.read(url)
