"""CPU per image of each step of the fetcher inside a real shard (issue 18).

`bench_fetch_cpu.py` times each step alone, in one thread. Inside a shard the steps run together:
GETs on the shard's event loop, decode, hash and put on its store threads, SeaweedFS and the image
server on the same cores. This script runs one `fetch_shard` over the atlas rows (50 ms latency,
into a fresh SeaweedFS bucket per run) four ways, with the requests in flight and store threads
that one shard of `derm/fetch` gets with the flow's defaults (4 and 4: its shards share the budgets):

- full: as the fetcher runs;
- no-hash: `verify_image` answered from the facts computed before the clock started (no decode,
  no pHash, no MD5);
- no-put: image puts answered without a request (SeaweedFS stores nothing);
- GET only: both, which leaves the GET, the guard, the loop, the thread hand-offs and the
  manifest rows.

Each way runs twice, in the order A B C D D C B A, as the box's speed drifts within minutes. The
difference between full and a way without a step is that step's cost where it really runs.
Stand-ins are used only here, to measure; the fetcher's code is unchanged.

`--ways full,every-scan` compares the fetcher with and without its chroma-only scans left out
(`jpeg_scans.luma_scans`).

`--jpegs baseline` (or `progressive`) keeps only the rows whose image is that kind of JPEG: a
progressive JPEG costs several times more to decode. `--store-workers` sets the shard's store
threads.

Usage: .venv/bin/python bench/bench_fetch_shard.py [--limit N] [--latency 0.05] [--concurrency 4]
       [--jpegs all|baseline|progressive] [--store-workers 4] [--ways full,no-hash,no-put,GET only]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from bench.bench_fetch import _start_image_server, cpu_seconds  # noqa: E402
from bench.bench_fetch_cpu import every_scan_decoded, flow_shard_budgets, is_progressive  # noqa: E402
from bench.services import atlas_is_absent, bench_seaweed  # noqa: E402

WAYS = ("full", "no-hash", "no-put", "GET only")
# Also runnable (--ways): the fetcher with every JPEG scan decoded, as before `luma_scans`.
EVERY_SCAN = "every-scan"


@contextmanager
def stand_ins(way: str, facts_by_body: dict):
    """The fetcher as it runs, or with its hash step and/or its image puts answered at once."""
    import dermflow.ingestion.fetch as fetch_module
    from dermflow.storage import ObjectStore

    if way == EVERY_SCAN:
        with every_scan_decoded():
            yield
        return
    real_verify, real_put = fetch_module.verify_image, ObjectStore.put_bytes
    if way in ("no-hash", "GET only"):
        fetch_module.verify_image = lambda body: facts_by_body[bytes(body)]
    if way in ("no-put", "GET only"):
        ObjectStore.put_bytes = lambda self, key, body, content_type, md5_hex=None: None
    try:
        yield
    finally:
        fetch_module.verify_image, ObjectStore.put_bytes = real_verify, real_put


def run_shard(way: str, index: int, rows: list[dict], seaweed, server_pid: int, facts_by_body: dict,
              concurrency: int, store_workers: int) -> dict:
    """One shard over every row, into its own bucket; CPU per image of this process, SeaweedFS
    and the image server."""
    from dermflow.ingestion.fetch import FetchOptions, fetch_shard
    from dermflow.settings import load_settings
    from dermflow.storage import ObjectStore

    options = FetchOptions(allowed_hosts=("127.0.0.1",), host_concurrency=concurrency, store_workers=store_workers)
    store = ObjectStore.from_settings(load_settings(
        aws_endpoint_url=seaweed.endpoint_url, aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key, bucket=f"shard-{index}"),
        max_pool_connections=concurrency + options.store_workers + 8)
    store.ensure_bucket()
    seaweed_pid = seaweed.process.pid()
    usage0, seaweed0, server0 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(seaweed_pid), cpu_seconds(server_pid)
    wall0 = time.perf_counter()
    with stand_ins(way, facts_by_body):
        out = fetch_shard(rows, store, options)
    wall = time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    n = len(rows)
    failed = sum(1 for row in out if row["status"] != "ok")
    if failed:
        raise RuntimeError(f"{way}: {failed} of {n} rows failed")
    return {"way": way, "wall_s": wall, "images_per_s": n / wall,
            "user_ms": (usage.ru_utime - usage0.ru_utime) / n * 1000,
            "system_ms": (usage.ru_stime - usage0.ru_stime) / n * 1000,
            "switches": (usage.ru_nvcsw - usage0.ru_nvcsw + usage.ru_nivcsw - usage0.ru_nivcsw) / n,
            "seaweed_ms": (cpu_seconds(seaweed_pid) - seaweed0) / n * 1000,
            "server_ms": (cpu_seconds(server_pid) - server0) / n * 1000}


def _mean(results: list[dict], way: str, value) -> float:
    """The mean of `value(result)` over the runs of one way."""
    values = [value(r) for r in results if r["way"] == way]
    return sum(values) / len(values)


def print_results(results: list[dict]) -> None:
    print_runs(results)
    ways = {r["way"] for r in results}
    if EVERY_SCAN in ways and "full" in ways:
        print(f"\nThe whole shard, mean CPU per image: every scan decoded "
              f"{_mean(results, EVERY_SCAN, lambda r: r['user_ms'] + r['system_ms']):.2f} ms, chroma-only scans "
              f"left out (the fetcher) {_mean(results, 'full', lambda r: r['user_ms'] + r['system_ms']):.2f} ms; "
              f"images/s {_mean(results, EVERY_SCAN, lambda r: r['images_per_s']):.1f} and "
              f"{_mean(results, 'full', lambda r: r['images_per_s']):.1f}")
    if ways.issuperset(WAYS):
        print_breakdown(results)


def print_runs(results: list[dict]) -> None:
    print(f"{'way':<9} {'wall':>8} {'images/s':>9} {'CPU/image':>10} {'(user':>7} {'sys)':>6} "
          f"{'switches':>9} {'SeaweedFS':>10} {'server':>7}")
    for r in results:
        print(f"{r['way']:<9} {r['wall_s']:7.2f}s {r['images_per_s']:9.1f} {r['user_ms'] + r['system_ms']:8.2f}ms "
              f"{r['user_ms']:6.2f} {r['system_ms']:6.2f} {r['switches']:9.1f} {r['seaweed_ms']:8.2f}ms {r['server_ms']:5.2f}ms")


def print_breakdown(results: list[dict]) -> None:
    mean = {way: _mean(results, way, lambda r: r["user_ms"] + r["system_ms"]) for way in WAYS}
    box_full = mean["full"] + _mean(results, "full", lambda r: r["seaweed_ms"] + r["server_ms"])
    cores = len(os.sched_getaffinity(0))
    print("\nCPU per image in this process, mean of both passes, and what each step adds where it runs:")
    print(f"  decode + hash + MD5 (full - no-hash)          {mean['full'] - mean['no-hash']:6.2f} ms")
    print(f"  image put, client side (full - no-put)        {mean['full'] - mean['no-put']:6.2f} ms")
    print(f"  GET, guard, loop, hand-offs, manifest rows    {mean['GET only']:6.2f} ms")
    print(f"  the whole shard (full)                        {mean['full']:6.2f} ms")
    print(f"  + SeaweedFS and the image server: the box's CPU per image {box_full:.2f} ms, so at most "
          f"{cores * 1000 / box_full:.0f} images/s on {cores} cores with nothing else running")


def main() -> int:
    in_flight, store_workers = flow_shard_budgets()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N atlas rows")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every image request")
    parser.add_argument("--concurrency", type=int, default=in_flight,
                        help="requests in flight (default: a shard of derm/fetch with its defaults)")
    parser.add_argument("--jpegs", choices=("all", "baseline", "progressive"), default="all",
                        help="only the rows whose image is a baseline (or a progressive) JPEG")
    parser.add_argument("--ways", default=",".join(WAYS),
                        help=f"comma-separated, from {', '.join(WAYS + (EVERY_SCAN,))}; run A B .. B A")
    parser.add_argument("--store-workers", type=int, default=store_workers,
                        help="threads that decode, hash and put (default: a shard of derm/fetch with its defaults)")
    args = parser.parse_args()
    args.copies = 1  # the rows as they are (`_start_image_server` can also serve copies of each)
    if atlas_is_absent():
        return 2

    import pandas as pd

    from dermflow.ingestion.images import verify_image
    from tests.support.image_servers import rewrite_csv_host

    work = Path(tempfile.mkdtemp(prefix="dermflow-bench-shard-"))
    seaweed = bench_seaweed(work)
    server = None
    try:
        seaweed.start()
        server, rows_csv, base_url = _start_image_server(args, work)
        rows = pd.read_csv(rewrite_csv_host(rows_csv, base_url, work / "rows.csv"), dtype=str,
                           keep_default_na=False).to_dict("records")
        bodies = [(args.images / f"{row['md5hash']}.jpg").read_bytes() for row in rows]
        if args.jpegs != "all":
            wanted = args.jpegs == "progressive"
            kept = [(row, body) for row, body in zip(rows, bodies) if is_progressive(body) == wanted]
            rows, bodies = [row for row, _ in kept], [body for _, body in kept]
        facts_by_body = {body: verify_image(body) for body in bodies}
        print(f"{len(rows)} rows ({args.jpegs} JPEGs), {args.latency * 1000:.0f} ms latency, "
              f"{args.concurrency} requests in flight, {args.store_workers} store workers, one shard per run", flush=True)
        ways = [way.strip() for way in args.ways.split(",")]
        if not set(ways) <= set(WAYS + (EVERY_SCAN,)):
            parser.error(f"--ways: unknown {sorted(set(ways) - set(WAYS + (EVERY_SCAN,)))}")
        order = ways + ways[::-1]
        results = [run_shard(way, index, rows, seaweed, server.pid, facts_by_body, args.concurrency,
                             args.store_workers) for index, way in enumerate(order)]
        print_results(results)
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)
        seaweed.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
