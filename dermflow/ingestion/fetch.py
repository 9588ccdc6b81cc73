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
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dermflow import layout
from dermflow.config import RUN_DEFAULTS
from dermflow.errors import DermflowError
from dermflow.ingestion.guard import HostGuard, Resolver, install_log_redaction, redact_text, redact_url
from dermflow.ingestion.http import MAX_FETCHED_IMAGE_BYTES, ReadPolicy, URLReadError, make_async_client, read_async
from dermflow.ingestion.images import ImageFacts, ImageRejected, verify_image
from dermflow.ingestion.manifest import ManifestError, manifest_row, ok_row

if TYPE_CHECKING:  # heavy or optional imports stay out of import time
    import httpx

    from dermflow.settings import Settings
    from dermflow.storage import ObjectStore

logger = logging.getLogger("dermflow.ingestion.fetch")

DEFAULT_USER_AGENT = "dermflow/0.1 (research dataset fetcher)"
IMAGE_ACCEPT = "image/*,*/*;q=0.8"
# A text answer where an image is due (an HTML error page) is refused before its body is read.
NOT_IMAGE_CONTENT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")


# --------------------------------------------------------------------------------------------
# options


class FetchOptionsError(DermflowError, ValueError):
    """Fetch options out of range (permanent)."""


@dataclass(frozen=True)
class FetchOptions:
    """How a shard is fetched. Times are seconds; `max_bytes` is the body size cap."""

    # requests in flight per host (per shard); the flow's default, declared in dermflow.config
    host_concurrency: int = RUN_DEFAULTS["host_concurrency"]
    host_rate_limit: float | None = None  # requests per second per host; None = unlimited
    max_attempts: int = 5  # per row, transient failures only
    backoff_base: float = 0.5  # full jitter: sleep uniform(0, min(max, base * 2**(attempt-1)))
    backoff_max: float = 30.0
    retry_after_max: float = 120.0  # a server's Retry-After is honoured up to this
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # between two reads of the body
    total_timeout: float = 120.0  # one request, headers to last byte
    row_timeout: float = 600.0  # one row, all attempts and waits together
    max_bytes: int = MAX_FETCHED_IMAGE_BYTES
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
                raise FetchOptionsError(f"FetchOptions.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("backoff_base", "backoff_max", "retry_after_max", "max_redirects"):
            if getattr(self, name) < 0:
                raise FetchOptionsError(f"FetchOptions.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.host_rate_limit is not None and not self.host_rate_limit > 0:
            raise FetchOptionsError(f"FetchOptions.host_rate_limit must be > 0 or None, got {self.host_rate_limit!r}")
        if isinstance(self.allowed_hosts, str):
            raise FetchOptionsError("FetchOptions.allowed_hosts must be a sequence of hosts/CIDRs, not one string")

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> FetchOptions:
        """Options with the User-Agent and allowed hosts of `settings`, then `overrides`."""
        from dermflow.settings import get_settings

        settings = settings or get_settings()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise FetchOptionsError(f"unknown FetchOptions field(s): {', '.join(unknown)}")
        values: dict[str, Any] = {"user_agent": settings.user_agent, "allowed_hosts": tuple(settings.allowed_host_list)}
        values.update(overrides)
        if "allowed_hosts" in overrides:
            values["allowed_hosts"] = tuple(overrides["allowed_hosts"])
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> FetchOptions:
        return replace(self, **overrides)

    def read_policy(self) -> ReadPolicy:
        """The limits of one image request (`dermflow.ingestion.http`)."""
        return ReadPolicy(
            max_bytes=self.max_bytes, max_redirects=self.max_redirects, connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout, total_timeout=self.total_timeout, retry_after_max=self.retry_after_max,
            refused_content_types=NOT_IMAGE_CONTENT_TYPES, refused_content_reason="not_an_image",
        )



# --------------------------------------------------------------------------------------------
# retry timing (Retry-After is parsed by dermflow.ingestion.http)


def backoff_delay(attempt: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
    ceiling = min(maximum, base * 2 ** max(attempt - 1, 0))
    return (rng or random).uniform(0.0, ceiling)



# --------------------------------------------------------------------------------------------
# the store


def _put_retrying(store: ObjectStore, key: str, body: bytes, facts: ImageFacts, options: FetchOptions) -> None:
    """Put with our own retries on top of the client's, so a store restart mid-fetch is
    survived; a permanent refusal (`StorageError.transient` false) is raised at once."""
    from dermflow.storage import StorageError

    deadline = time.monotonic() + options.store_deadline
    attempt = 0
    while True:
        attempt += 1
        try:
            store.put_bytes(key, body, facts.content_type, md5_hex=facts.md5)
            return
        except StorageError as error:
            if not error.transient:
                raise
            last = error
        if attempt >= options.store_attempts or time.monotonic() >= deadline:
            raise StorageError(f"{last} (gave up after {attempt} attempts)") from last
        pause = backoff_delay(attempt, 0.5, 5.0) + 0.2
        logger.warning("put %s failed (%s), retrying in %.1fs", key, last, pause)
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))


def verify_and_store(store: ObjectStore, key: str, body: bytes, options: FetchOptions) -> ImageFacts:
    """Check `body` is a whole image (`verify_image`: decodes to the end, its MD5 and hashes),
    then put it at `key`, retried as `_put_retrying` says. The one way an image gets into the
    bucket, fetched by URL or imported from an archive."""
    facts = verify_image(body)
    _put_retrying(store, key, body, facts, options)
    return facts


# --------------------------------------------------------------------------------------------
# the shard fetcher


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
    policy: ReadPolicy
    pool: concurrent.futures.ThreadPoolExecutor
    hosts: dict[str, _Host] = field(default_factory=dict)

    def host(self, url: str) -> _Host:
        name = (urlsplit(url).hostname or "").lower()  # politeness is per host, whatever the port
        if name not in self.hosts:
            rate = self.options.host_rate_limit
            self.hosts[name] = _Host(asyncio.Semaphore(self.options.host_concurrency), IntervalLimiter(rate) if rate else None)
        return self.hosts[name]

    @contextlib.asynccontextmanager
    async def polite(self, url: str) -> AsyncIterator[None]:
        """Wraps one request to `url`'s host: a slot of its concurrency cap, then its rate limit."""
        host = self.host(url)
        async with host.slots:
            if host.limiter is not None:
                await host.limiter.wait()
            yield


@dataclass
class _Attempts:
    """Attempts made for one row, kept outside `_download` so a row deadline does not lose them."""

    count: int = 0


def _retry_pause(options: FetchOptions, error: URLReadError, attempts: int) -> float | None:
    """Seconds to wait before attempt `attempts + 1`, or None when retrying cannot help."""
    if not error.transient or attempts >= options.max_attempts:
        return None
    pause = backoff_delay(attempts, options.backoff_base, options.backoff_max)
    return pause if error.retry_after is None else max(pause, error.retry_after)


async def _download(ctx: _ShardContext, url: str, deadline: float, attempts: _Attempts) -> bytes:
    """The body at `url`, retried while that can help: a transient error, fewer than
    `max_attempts` attempts, and a wait that ends before the row's `deadline` (else the last
    error is raised: the manifest records what the server said). Counts into `attempts`."""
    loop = asyncio.get_running_loop()
    while True:
        attempts.count += 1
        try:
            return await read_async(ctx.client, ctx.guard, url, ctx.policy, hop_gate=ctx.polite)
        except URLReadError as error:
            pause = _retry_pause(ctx.options, error, attempts.count)
            if pause is None or loop.time() + pause >= deadline:
                kind = "transient" if error.transient else "permanent"
                logger.info("%s: %s (%s) after %d attempt(s)", redact_url(url), error.reason, kind, attempts.count)
                raise
            await asyncio.sleep(pause)


async def _fetch_row(ctx: _ShardContext, row: dict) -> dict:
    """Download, verify and store one row's image; its manifest row."""
    url = str(row.get("url") or "").strip()
    if not url:
        return manifest_row(row, reason="no_url")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.options.row_timeout
    attempts = _Attempts()
    try:
        async with asyncio.timeout_at(deadline):
            body = await _download(ctx, url, deadline, attempts)
    except URLReadError as error:
        return manifest_row(row, reason=error.reason, attempts=attempts.count)
    except TimeoutError:
        logger.info("%s: row deadline (%.0fs) passed", redact_url(url), ctx.options.row_timeout)
        return manifest_row(row, reason="timeout", attempts=attempts.count)
    # Outside the row deadline: a put that has started is never abandoned half-way.
    key = layout.image_key(row["md5hash"])
    try:
        facts = await loop.run_in_executor(ctx.pool, verify_and_store, ctx.store, key, body, ctx.options)
    except ImageRejected as error:
        logger.info("%s: %s", redact_url(url), redact_text(str(error)))
        return manifest_row(row, reason=error.reason, attempts=attempts.count, bytes=len(body))
    return ok_row(row, facts, len(body), attempts.count)


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
            raise ManifestError(f"shard row {position}: md5hash {md5hash!r} is not 32 hex digits")
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
        policy = options.read_policy()
        async with make_async_client(guard, policy, user_agent=options.user_agent, accept=IMAGE_ACCEPT,
                                     transport=transport, connections=max(64, options.host_concurrency * 8)) as client:
            ctx = _ShardContext(client=client, store=store, options=options, guard=guard, policy=policy, pool=pool)
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

