"""The image fetcher: download a shard of a dataset's images into the object store, politely and safely.

`fetch_shard` downloads one shard (planned by `dermflow.ingestion.manifest.plan_shards`)
concurrently with one pooled `httpx.AsyncClient`, a per-host concurrency cap and optional
per-host rate limit, retries that fit the failure (transient: backoff with full jitter,
honouring Retry-After; permanent: recorded once with a reason), and stores an object at
`images/<md5hash>` only after the whole body arrived and decoded as an image. Each input row
yields one manifest row (`dermflow.ingestion.manifest`).

This module is Prefect-free: the Prefect task wraps `fetch_shard` (one task per shard).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from dermflow.ingestion.guard import (
    BlockedURL,
    HostGuard,
    Resolver,
    install_log_redaction,
    pinned_network_backend,
    redact_text,
    redact_url,
)
from dermflow.ingestion.images import ImageFacts, ImageRejected, verify_image
from dermflow.ingestion.manifest import image_key, manifest_row, ok_row

if TYPE_CHECKING:  # heavy or optional imports stay out of import time
    import httpx

    from dermflow.settings import Settings
    from dermflow.storage import ObjectStore

logger = logging.getLogger("dermflow.ingestion.fetch")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_USER_AGENT = "dermflow/0.1 (research dataset fetcher)"


# --------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class FetchOptions:
    """How a shard is fetched. Times are seconds; `max_bytes` is the body size cap."""

    host_concurrency: int = 16  # requests in flight per host (per shard)
    host_rate_limit: float | None = None  # requests per second per host; None = unlimited
    max_attempts: int = 5  # per row, transient failures only
    backoff_base: float = 0.5  # full jitter: sleep uniform(0, min(max, base * 2**(attempt-1)))
    backoff_max: float = 30.0
    retry_after_max: float = 120.0  # a server's Retry-After is honoured up to this
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # between two reads of the body
    total_timeout: float = 120.0  # one request, headers to last byte
    row_timeout: float = 600.0  # one row, all attempts and waits together
    max_bytes: int = 50 * 2**20
    max_redirects: int = 5
    user_agent: str = DEFAULT_USER_AGENT
    allowed_hosts: tuple[str, ...] = ()  # hosts/IPs/CIDRs exempt from the internal-address rule
    store_workers: int = 16  # threads that decode, hash and put objects (boto3 is blocking)
    # Our own retries of a put, on top of boto3's: a store restart (SeaweedFS answers
    # InternalError while it shuts down, then refuses connections) is waited out up to the deadline.
    store_attempts: int = 60
    store_deadline: float = 180.0  # then the shard raises StorageError (retry the shard later)

    def __post_init__(self) -> None:
        positive = ("host_concurrency", "max_attempts", "connect_timeout", "read_timeout", "total_timeout",
                    "row_timeout", "max_bytes", "store_workers", "store_attempts", "store_deadline")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchOptions.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("backoff_base", "backoff_max", "retry_after_max", "max_redirects"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchOptions.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.host_rate_limit is not None and not self.host_rate_limit > 0:
            raise ValueError(f"FetchOptions.host_rate_limit must be > 0 or None, got {self.host_rate_limit!r}")
        if isinstance(self.allowed_hosts, str):
            raise ValueError("FetchOptions.allowed_hosts must be a sequence of hosts/CIDRs, not one string")

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> FetchOptions:
        """Options with the User-Agent and allowed hosts of `settings`, then `overrides`."""
        from dermflow.settings import get_settings

        settings = settings or get_settings()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown FetchOptions field(s): {', '.join(unknown)}")
        values: dict[str, Any] = {"user_agent": settings.user_agent, "allowed_hosts": tuple(settings.allowed_host_list)}
        values.update(overrides)
        if "allowed_hosts" in overrides:
            values["allowed_hosts"] = tuple(overrides["allowed_hosts"])
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> FetchOptions:
        return replace(self, **overrides)



# --------------------------------------------------------------------------------------------
# retry timing


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


def backoff_delay(attempt: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
    ceiling = min(maximum, base * 2 ** max(attempt - 1, 0))
    return (rng or random).uniform(0.0, ceiling)



# --------------------------------------------------------------------------------------------
# the store


def _put_retrying(store: ObjectStore, key: str, body: bytes, content_type: str, options: FetchOptions) -> None:
    """Put with our own retries on top of boto3's, so a store restart mid-fetch is survived."""
    from botocore.exceptions import ClientError

    from dermflow.storage import StorageError

    deadline = time.monotonic() + options.store_deadline
    attempt = 0
    while True:
        attempt += 1
        try:
            store.put_bytes(key, body, content_type)
            return
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = error.response.get("Error", {}).get("Code", "")
            if 400 <= status < 500 and status not in (408, 429) and code not in ("SlowDown", "RequestTimeout"):
                raise StorageError(f"cannot put {store.uri(key)}: {error}") from error
            last: Exception = error
        except Exception as error:  # noqa: BLE001 - connection-level errors from botocore/urllib3
            last = error
        if attempt >= options.store_attempts or time.monotonic() >= deadline:
            raise StorageError(f"cannot put {store.uri(key)} after {attempt} attempts: {last}") from last
        pause = backoff_delay(attempt, 0.5, 5.0) + 0.2
        logger.warning("put %s failed (%s), retrying in %.1fs", key, last, pause)
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))


def _verify_and_store(store: ObjectStore, key: str, body: bytes, options: FetchOptions) -> ImageFacts:
    facts = verify_image(body)
    _put_retrying(store, key, body, facts.content_type, options)
    return facts


# --------------------------------------------------------------------------------------------
# the shard fetcher


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Permanent(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class IntervalLimiter:
    """At most `rate` starts per second: each caller gets the next free slot (no bursts)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next)
        self._next = slot + self.interval  # claimed before awaiting: no lock needed on one loop
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass
class _Host:
    slots: asyncio.Semaphore
    limiter: IntervalLimiter | None


@dataclass
class _ShardContext:
    client: httpx.AsyncClient
    store: ObjectStore
    options: FetchOptions
    guard: HostGuard
    pool: concurrent.futures.ThreadPoolExecutor
    hosts: dict[str, _Host] = field(default_factory=dict)

    def host(self, url: str) -> _Host:
        name = (urlsplit(url).hostname or "").lower()  # politeness is per host, whatever the port
        if name not in self.hosts:
            rate = self.options.host_rate_limit
            self.hosts[name] = _Host(asyncio.Semaphore(self.options.host_concurrency), IntervalLimiter(rate) if rate else None)
        return self.hosts[name]


async def _request_once(ctx: _ShardContext, url: str) -> bytes:
    """One GET of `url`: the body, or `_Redirect`/`_Transient`/`_Permanent`."""
    import httpx

    options = ctx.options
    body_started = False
    try:
        async with ctx.client.stream("GET", url) as response:
            status = response.status_code
            if status in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise _Permanent(f"http_{status}")
                raise _Redirect(urljoin(url, location.strip()))
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("retry-after"), cap=options.retry_after_max)
                raise _Transient(f"http_{status}", retry_after)
            if status != 200:
                raise _Permanent(f"http_{status}")
            content_type = response.headers.get("content-type", "").lower()
            if content_type.startswith(("text/", "application/json", "application/xml", "application/xhtml")):
                raise _Permanent("not_an_image")  # no need to download an HTML error page
            try:
                expected = int(response.headers["content-length"])
            except (KeyError, ValueError):
                expected = None
            if expected is not None and expected > options.max_bytes:
                raise _Permanent("too_large")
            chunks: list[bytes] = []
            received = 0
            async for chunk in response.aiter_bytes():
                body_started = True
                received += len(chunk)
                if received > options.max_bytes:
                    raise _Permanent("too_large")
                chunks.append(chunk)
            if expected is not None:
                # Content-Length counts the bytes on the wire (before any content decoding).
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                on_wire = received if encoding in ("", "identity") else response.num_bytes_downloaded
                if on_wire != expected:
                    raise _Transient("truncated")
            return b"".join(chunks)
    except (_Redirect, _Transient, _Permanent):
        raise
    except (httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
        raise _Transient("timeout") from None
    except httpx.ConnectError:
        raise _Transient("connect_error") from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError):
        raise _Transient("truncated" if body_started else "connect_error") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL):
        raise _Permanent("bad_scheme") from None
    except httpx.DecodingError:
        raise _Permanent("not_an_image") from None
    except httpx.TransportError:
        raise _Transient("connect_error") from None


async def _download(ctx: _ShardContext, url: str) -> bytes:
    """The body at `url`, following at most `max_redirects` redirects, each hop re-checked."""
    current = url
    for _hop in range(ctx.options.max_redirects + 1):
        try:
            await ctx.guard.check(current)
        except BlockedURL as error:
            raise _Permanent(error.reason) from None
        host = ctx.host(current)
        async with host.slots:
            if host.limiter is not None:
                await host.limiter.wait()
            try:
                async with asyncio.timeout(ctx.options.total_timeout):
                    return await _request_once(ctx, current)
            except BlockedURL as error:  # refused at connect time (the host re-resolved internal)
                raise _Permanent(error.reason) from None
            except _Redirect as redirect:
                current = redirect.location
            except TimeoutError:
                raise _Transient("timeout") from None
    raise _Permanent("too_many_redirects")


async def _fetch_row(ctx: _ShardContext, row: dict) -> dict:
    options = ctx.options
    url = str(row.get("url") or "").strip()
    if not url:
        return manifest_row(row, reason="no_url")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.row_timeout
    attempts = 0
    body: bytes | None = None
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                attempts += 1
                try:
                    body = await _download(ctx, url)
                    break
                except _Permanent as error:
                    logger.info("%s: %s (permanent)", redact_url(url), error.reason)
                    return manifest_row(row, reason=error.reason, attempts=attempts)
                except _Transient as error:
                    if attempts >= options.max_attempts:
                        logger.info("%s: %s after %d attempts", redact_url(url), error.reason, attempts)
                        return manifest_row(row, reason=error.reason, attempts=attempts)
                    pause = backoff_delay(attempts, options.backoff_base, options.backoff_max)
                    if error.retry_after is not None:
                        pause = max(pause, error.retry_after)
                    if loop.time() + pause >= deadline:
                        # Waiting would outlive the row's deadline: record what the server said.
                        return manifest_row(row, reason=error.reason, attempts=attempts)
                    await asyncio.sleep(pause)
    except TimeoutError:
        logger.info("%s: row deadline (%.0fs) passed", redact_url(url), options.row_timeout)
        return manifest_row(row, reason="timeout", attempts=attempts)
    # Outside the row deadline: a put that has started is never abandoned half-way.
    key = image_key(row["md5hash"])
    try:
        facts = await loop.run_in_executor(ctx.pool, _verify_and_store, ctx.store, key, body, options)
    except ImageRejected as error:
        logger.info("%s: %s", redact_url(url), redact_text(str(error)))
        return manifest_row(row, reason=error.reason, attempts=attempts, bytes=len(body))
    return ok_row(row, facts, len(body), attempts)


def _make_client(options: FetchOptions, transport: httpx.AsyncBaseTransport | None,
                 guard: HostGuard) -> httpx.AsyncClient:
    import httpx

    timeout = httpx.Timeout(
        connect=options.connect_timeout, read=options.read_timeout, write=options.read_timeout, pool=None
    )
    connections = max(64, options.host_concurrency * 8)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=30)
    if transport is None:
        transport = httpx.AsyncHTTPTransport(limits=limits)
        # httpx has no public hook for the connection pool's network backend; the pinned one
        # makes every connection go to addresses the guard has just checked (DNS rebinding).
        transport._pool._network_backend = pinned_network_backend(guard)
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        follow_redirects=False,  # each hop is re-checked by the SSRF guard
        headers={"User-Agent": options.user_agent, "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"},
        transport=transport,
        trust_env=False,  # a proxy from the environment would bypass the address guard
    )


async def fetch_shard_async(
    rows: Sequence[dict],
    store: ObjectStore,
    options: FetchOptions | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: Resolver | None = None,
) -> list[dict]:
    """Fetch one shard; one manifest row per input row, in input order.

    `transport`/`resolver` replace the network (tests). Raises `StorageError` when the store
    stays unreachable past `options.store_deadline` (the shard should then be retried whole).
    """
    options = options or FetchOptions()
    for position, row in enumerate(rows):
        md5hash = str(row.get("md5hash") or "")
        if len(md5hash) != 32 or any(c not in "0123456789abcdefABCDEF" for c in md5hash):
            raise ValueError(f"shard row {position}: md5hash {md5hash!r} is not 32 hex digits")
    install_log_redaction()
    config = getattr(getattr(getattr(store, "client", None), "meta", None), "config", None)
    pool_size = getattr(config, "max_pool_connections", None)
    if isinstance(pool_size, int) and pool_size < options.store_workers:
        logger.warning("the S3 client keeps %d connections for %d store workers: puts will reconnect; "
                       "build the store with max_pool_connections >= store_workers", pool_size, options.store_workers)
    started = time.monotonic()
    guard = HostGuard(options.allowed_hosts, resolver=resolver)
    pool = concurrent.futures.ThreadPoolExecutor(options.store_workers, thread_name_prefix="dermflow-store")
    try:
        async with _make_client(options, transport, guard) as client:
            ctx = _ShardContext(client=client, store=store, options=options, guard=guard, pool=pool)
            tasks = [asyncio.create_task(_fetch_row(ctx, {**row, "md5hash": str(row["md5hash"]).lower()})) for row in rows]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    ok = sum(1 for result in results if result["status"] == "ok")
    logger.info("shard of %d rows: %d ok, %d failed in %.1fs", len(rows), ok, len(rows) - ok, time.monotonic() - started)
    return results


def fetch_shard(rows: Sequence[dict], store: ObjectStore, options: FetchOptions | None = None, **kwargs: Any) -> list[dict]:
    """Synchronous `fetch_shard_async`: runs its own event loop (in a helper thread if this one has a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fetch_shard_async(rows, store, options, **kwargs))
    with concurrent.futures.ThreadPoolExecutor(1) as runner:
        return runner.submit(asyncio.run, fetch_shard_async(rows, store, options, **kwargs)).result()

