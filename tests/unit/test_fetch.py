"""The fetcher's logic without services: httpx MockTransport for the network, a dict for the store."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time

import httpx
import pytest
from PIL import Image

from dermflow.ingestion.fetch import (
    FetchOptions,
    IntervalLimiter,
    backoff_delay,
    fetch_shard,
    fetch_shard_async,
)
from dermflow.ingestion.http import parse_retry_after
from dermflow.ingestion.images import HASH_HEX_DIGITS, ImageRejected, verify_image
from dermflow.ingestion.manifest import MANIFEST_COLUMNS, manifest_row
from dermflow.ingestion.guard import install_log_redaction, redact_text, redact_url

from tests.support.fetch_doubles import MemoryStore, jpeg, options, public_resolver, row, run

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ pure helpers


def test_redact_url_drops_userinfo_and_tokens():
    url = "https://user:pw@img.example.com/a/b.jpg?size=2&token=SECRET1&X-Amz-Signature=SECRET2&sig=S3"
    redacted = redact_url(url)
    for secret in ("user", "pw", "SECRET1", "SECRET2", "S3"):
        assert secret not in redacted
    assert redacted.startswith("https://REDACTED@img.example.com/a/b.jpg?size=2&token=REDACTED")
    assert redact_url("http://atlas.example/img?imageId=8980") == "http://atlas.example/img?imageId=8980"
    assert "SECRET" not in redact_text("GET https://h/x?token=SECRET failed: 'http://u:SECRET@h/'")


def test_redaction_filter_cleans_httpx_log_records(caplog):
    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="httpx"):
        logging.getLogger("httpx").info('HTTP Request: %s %s "%s"', "GET", "https://h/x.jpg?sig=TOPSECRET", "HTTP/1.1 200 OK")
    assert "TOPSECRET" not in caplog.text and "sig=REDACTED" in caplog.text


def test_parse_retry_after_seconds_dates_and_caps():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("9999", cap=60) == 60
    assert parse_retry_after("garbage") is None and parse_retry_after(None) is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0  # in the past


def test_backoff_is_full_jitter_and_capped():
    rng = random.Random(1)
    delays = [backoff_delay(5, 0.5, 3.0, rng) for _ in range(500)]
    assert 0 <= min(delays) < 0.3 and 2.7 < max(delays) <= 3.0  # uniform over [0, min(cap, base*2^4)]
    assert all(d <= 0.5 for d in (backoff_delay(1, 0.5, 30, rng) for _ in range(100)))


def test_manifest_rows_derive_the_range_with_the_one_range_function():
    ranges = [manifest_row({"md5hash": "a" * 32, "fitzpatrick_scale": scale})["fitzpatrick_range"]
              for scale in ("3", 3, "3.5", 3.5, "", "-1")]
    assert ranges == ["III-IV", "III-IV", "unknown", "unknown", "unknown", "unknown"]
    given = manifest_row({"md5hash": "a" * 32, "fitzpatrick_scale": "3.5", "fitzpatrick_range": "V-VI"})
    assert given["fitzpatrick_range"] == "V-VI"  # the dataset's own column wins


def test_options_validation():
    with pytest.raises(ValueError, match="host_concurrency"):
        FetchOptions(host_concurrency=0)
    with pytest.raises(ValueError, match="host_rate_limit"):
        FetchOptions(host_rate_limit=0)


def test_options_from_settings_take_user_agent_and_allowed_hosts():
    from dermflow.settings import Settings

    settings = Settings(_env_file=None, allowed_hosts="127.0.0.1, 10.0.0.0/8, images.internal", user_agent="ua/1")
    opts = FetchOptions.from_settings(settings, max_attempts=2)
    assert opts.user_agent == "ua/1" and opts.max_attempts == 2
    assert opts.allowed_hosts == ("127.0.0.1", "10.0.0.0/8", "images.internal")
    with pytest.raises(ValueError, match="unknown FetchOptions"):
        FetchOptions.from_settings(settings, host_concurency=3)


def test_verify_image_decodes_rejects_truncated_and_garbage():
    data = jpeg(1, 200)
    facts = verify_image(data)
    assert (facts.width, facts.height) == (200, 200) and facts.md5 == hashlib.md5(data).hexdigest()
    assert len(facts.phash) == HASH_HEX_DIGITS and int(facts.phash, 16) >= 0
    for bad in (data[: len(data) // 2], b"<html></html>", b""):
        with pytest.raises(ImageRejected) as info:
            verify_image(bad)
        assert info.value.reason == "not_an_image"


def test_verify_image_keeps_decompression_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 200x200 is > 2x the limit
    with pytest.raises(ImageRejected) as info:
        verify_image(jpeg(1, 200))
    assert info.value.reason == "too_large"


# ------------------------------------------------------------------ the shard fetcher


def test_fetch_stores_verified_images_and_reports_permanent_failures():
    good, other = jpeg(1), jpeg(2)
    md5 = hashlib.md5(good).hexdigest()
    routes = {
        "/good": httpx.Response(200, content=good, headers={"content-type": "image/jpeg"}),
        "/mismatch": httpx.Response(200, content=other),
        "/missing": httpx.Response(404),
        "/gone": httpx.Response(410),
        "/html": httpx.Response(200, content=b"<html/>", headers={"content-type": "text/html"}),
        "/garbage": httpx.Response(200, content=b"\xff\xd8 not really"),
        "/big": httpx.Response(200, content=b"\xff" * 5000),
    }
    hits = []

    def handler(request):
        hits.append(request.url.path)
        assert request.headers["user-agent"] == "dermflow-test/1"
        return routes[request.url.path]

    store = MemoryStore()
    rows = [row(md5, "https://img.example/good"), row("f" * 32, "https://img.example/mismatch")]
    rows += [row(f"{i:032x}", f"https://img.example/{p}") for i, p in enumerate(["missing", "gone", "html", "garbage", "big"])]
    rows += [row("e" * 32, ""), row("d" * 32, "ftp://img.example/x.jpg")]
    result = run(rows, store, handler, opts=options(user_agent="dermflow-test/1", max_bytes=4000))
    by_md5 = {r["md5hash"]: r for r in result}
    assert [r["md5hash"] for r in result] == [r["md5hash"] for r in rows]
    assert all(list(r) == MANIFEST_COLUMNS for r in result)
    ok = by_md5[md5]
    assert (ok["status"], ok["md5_mismatch"], ok["bytes"], ok["key"], ok["attempts"]) == ("ok", False, len(good), f"images/{md5}", 1)
    assert ok["phash"] == verify_image(good).phash and ok["fitzpatrick_range"] == "III-IV"
    assert by_md5["f" * 32]["md5_mismatch"] is True and store.objects[f"images/{'f' * 32}"] == other
    reasons = {r["md5hash"]: r["reason"] for r in result if r["status"] == "failed"}
    assert reasons == {f"{0:032x}": "http_404", f"{1:032x}": "http_410", f"{2:032x}": "not_an_image",
                       f"{3:032x}": "not_an_image", f"{4:032x}": "too_large", "e" * 32: "no_url", "d" * 32: "bad_scheme"}
    assert set(store.objects) == {f"images/{md5}", f"images/{'f' * 32}"}
    assert hits.count("/missing") == 1 and hits.count("/big") == 1  # permanent: never retried


def test_transient_failures_are_retried_until_success_or_attempts_run_out():
    good = jpeg(3)
    counts: dict[str, int] = {}

    def handler(request):
        path = request.url.path
        counts[path] = counts.get(path, 0) + 1
        if path == "/flaky" and counts[path] < 3:
            return httpx.Response(503)
        if path == "/always503":
            return httpx.Response(503)
        if path == "/reset" and counts[path] < 2:
            raise httpx.ReadError("connection reset by peer")
        if path == "/refused":
            raise httpx.ConnectError("connection refused")
        if path == "/short" and counts[path] < 2:
            return httpx.Response(200, content=good[:100], headers={"content-length": str(len(good))})
        return httpx.Response(200, content=good)

    store = MemoryStore()
    paths = ["flaky", "always503", "reset", "refused", "short"]
    rows = [row(f"{i:032x}", f"https://img.example/{p}") for i, p in enumerate(paths)]
    result = {r["url"].rsplit("/", 1)[1]: r for r in run(rows, store, handler)}
    assert (result["flaky"]["status"], result["flaky"]["attempts"]) == ("ok", 3)
    assert (result["always503"]["reason"], result["always503"]["attempts"]) == ("http_503", 3)
    assert (result["reset"]["status"], result["reset"]["attempts"]) == ("ok", 2)
    assert (result["refused"]["reason"], result["refused"]["attempts"]) == ("connect_error", 3)
    assert (result["short"]["status"], result["short"]["attempts"]) == ("ok", 2)
    assert counts["/always503"] == 3
    assert all(store.objects[f"images/{r['md5hash']}"] == good for r in result.values() if r["status"] == "ok")


def test_retry_after_is_honoured():
    good = jpeg(4)
    seen: list[float] = []

    def handler(request):
        seen.append(time.monotonic())
        if len(seen) == 1:
            return httpx.Response(429, headers={"retry-after": "1"})
        return httpx.Response(200, content=good)

    result = run([row("a" * 32, "https://img.example/x")], MemoryStore(), handler)
    assert result[0]["status"] == "ok" and seen[1] - seen[0] >= 0.95


def test_retry_after_beyond_the_row_deadline_fails_fast_with_the_status():
    def handler(request):
        return httpx.Response(503, headers={"retry-after": "60"})

    started = time.monotonic()
    result = run([row("a" * 32, "https://img.example/x")], MemoryStore(), handler, opts=options(row_timeout=2))
    assert result[0]["reason"] == "http_503" and time.monotonic() - started < 1.5


def test_row_deadline_bounds_a_stalled_server():
    async def handler(request):
        await asyncio.sleep(30)

    started = time.monotonic()
    result = run([row("a" * 32, "https://img.example/x")], MemoryStore(), handler,
                 opts=options(total_timeout=0.3, row_timeout=1.0, max_attempts=50))
    assert result[0]["reason"] == "timeout" and time.monotonic() - started < 3


def test_redirects_are_followed_rechecked_and_capped():
    good = jpeg(5)

    def handler(request):
        path = request.url.path
        if path == "/hop":
            return httpx.Response(302, headers={"location": "/final"})
        if path == "/loop":
            return httpx.Response(301, headers={"location": "/loop"})
        if path == "/to-metadata":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/"})
        if path == "/to-file":
            return httpx.Response(302, headers={"location": "file:///etc/passwd"})
        if path == "/final":
            return httpx.Response(200, content=good)
        raise AssertionError(f"unexpected request {request.url}")

    async def resolver(host, port):
        return ["169.254.169.254"] if host == "169.254.169.254" else ["93.184.216.34"]

    store = MemoryStore()
    rows = [row(f"{i:032x}", f"https://img.example/{p}") for i, p in enumerate(["hop", "loop", "to-metadata", "to-file"])]
    result = run(rows, store, handler, resolver=resolver, opts=options(max_redirects=3))
    assert [r["reason"] for r in result] == ["", "too_many_redirects", "blocked_address", "bad_scheme"]
    assert result[0]["status"] == "ok" and store.objects[f"images/{0:032x}"] == good


def test_credentials_never_reach_manifest_or_logs(caplog):
    def handler(request):
        return httpx.Response(404)

    url = "https://alice:hunter2@img.example/x.jpg?token=TOKEN123&X-Amz-Signature=SIG456"
    with caplog.at_level(logging.DEBUG):
        result = run([row("a" * 32, url)], MemoryStore(), handler)
    text = caplog.text + repr(result)
    for secret in ("hunter2", "alice", "TOKEN123", "SIG456"):
        assert secret not in text
    assert result[0]["reason"] == "http_404" and "img.example/x.jpg" in result[0]["url"]


def test_per_host_concurrency_cap_and_rate_limit():
    good = jpeg(6)
    state = {"now": 0, "peak": 0}
    starts: list[float] = []

    async def handler(request):
        starts.append(time.monotonic())
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return httpx.Response(200, content=good)

    rows = [row(f"{i:032x}", f"https://img.example/{i}") for i in range(12)]
    result = run(rows, MemoryStore(), handler, opts=options(host_concurrency=3))
    assert all(r["status"] == "ok" for r in result) and state["peak"] == 3

    starts.clear()
    state["peak"] = 0
    run(rows[:6], MemoryStore(), handler, opts=options(host_concurrency=6, host_rate_limit=20))
    gaps = [b - a for a, b in zip(sorted(starts), sorted(starts)[1:])]
    assert min(gaps) >= 0.045 and state["peak"] <= 2  # 20/s: one start every 50 ms


def test_interval_limiter_spaces_starts():
    async def main():
        limiter = IntervalLimiter(50)
        loop = asyncio.get_running_loop()
        times = []
        for _ in range(5):
            await limiter.wait()
            times.append(loop.time())
        return times

    times = asyncio.run(main())
    assert times[-1] - times[0] >= 4 * 0.02 * 0.95


def test_store_outage_is_retried_then_raises():
    good = jpeg(7)

    def handler(request):
        return httpx.Response(200, content=good)

    store = MemoryStore(fail_puts=2)
    result = run([row("a" * 32, "https://img.example/x")], store, handler)
    assert result[0]["status"] == "ok" and store.put_calls == 3

    from dermflow.storage import StorageError

    with pytest.raises(StorageError, match="cannot put"):
        run([row("a" * 32, "https://img.example/x")], MemoryStore(fail_puts=100), handler,
            opts=options(store_attempts=2))


def test_a_refused_put_is_raised_at_once_not_retried():
    from dermflow.ingestion.fetch import _put_retrying
    from dermflow.ingestion.images import verify_image
    from dermflow.storage import StorageError

    class RefusingStore(MemoryStore):
        def put_bytes(self, key, data, content_type=None, md5_hex=None):
            self.put_calls += 1
            raise StorageError(f"cannot put {self.uri(key)}: AccessDenied", transient=False)

    body = jpeg(9)
    store = RefusingStore()
    with pytest.raises(StorageError, match="AccessDenied") as caught:
        _put_retrying(store, "images/x", body, verify_image(body), options(store_attempts=5))
    assert store.put_calls == 1 and not caught.value.transient


def test_fetch_shard_rejects_rows_without_a_valid_md5hash():
    with pytest.raises(ValueError, match="shard row 1: md5hash 'nope'"):
        run([row("a" * 32, "https://img.example/x"), row("nope", "https://img.example/y")], MemoryStore(),
            lambda request: httpx.Response(404))


def test_fetch_shard_works_inside_a_running_loop():
    good = jpeg(8)

    async def caller():
        return fetch_shard([row("a" * 32, "https://img.example/x")], MemoryStore(), options(),
                           transport=httpx.MockTransport(lambda r: httpx.Response(200, content=good)),
                           resolver=public_resolver)

    assert asyncio.run(caller())[0]["status"] == "ok"


def test_async_entry_point():
    good = jpeg(9)
    result = asyncio.run(fetch_shard_async(
        [row("a" * 32, "https://img.example/x")], MemoryStore(), options(),
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=good)), resolver=public_resolver))
    assert result[0]["status"] == "ok"
