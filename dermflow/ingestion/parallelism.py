"""Threads or processes for the fetch and import shards (the choice `task_runner=auto` makes),
and each shard's share of the fetch's budgets when several run at once (`shard_budgets`).

Decoding, hashing and putting an image are CPU work. Threads share one interpreter: Pillow and
NumPy release the GIL for part of it, so a thread runner gets a little over one core (1.3 cores
measured on imports) and no more. A process pool uses every core, but first starts its workers
(spawned interpreters that import Prefect, NumPy, Pillow, boto3 and obstore) and pays for
pickling each shard's rows and results: a cost that a small fetch never wins back. So `auto` takes the pool only where it pays, by a cost
model whose constants come from `make bench-fetch` runs (`bench/README.md`, "Threads or
processes by default"):

    threads:   wall ≈ rows / threads_images_per_s
    processes: wall ≈ pool_start_s + rows / (pool_images_per_s_per_core × min(cores, shards))

The constants were measured on 2 cores, where the pool also shares its cores with the S3 server
and the orchestrator; there, the pool is no faster per image than threads, so `auto` keeps
threads. More cores are extrapolated: the pool's rate grows with its workers, the threads' does
not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RunnerCosts:
    """What threads and a process pool cost per image, for one kind of shard work."""

    threads_images_per_s: float
    pool_images_per_s_per_core: float
    pool_start_s: float


# derm/fetch by URL on 2 cores, 2,076 and 6,228 atlas images, 50 ms per request, two runs per
# size, image puts through obstore: threads fit rows / 116 images/s, the pool of two workers
# rows / 116 too (obstore freed the GIL the threads waited on: with boto3 puts threads were
# 90/s, the pool 121/s). The pool's start, 8 s, is the spawning of its workers; it was measured
# as 8.1 s (by URL, boto3 puts) and 7.9 s (import, obstore) between the fitted lines.
FETCH_COSTS = RunnerCosts(threads_images_per_s=116.0, pool_images_per_s_per_core=58.0, pool_start_s=8.0)
# derm/fetch importing the same images from a zip, no URLs: threads rows / 175, the pool
# rows / 166. No GET to wait on, so threads keep more of both cores busy.
IMPORT_COSTS = RunnerCosts(threads_images_per_s=175.0, pool_images_per_s_per_core=83.0, pool_start_s=8.0)


def pool_pays(rows: int | None, shards: int | None, cores: int, costs: RunnerCosts = FETCH_COSTS) -> bool:
    """Whether a process pool of one worker per core would finish `rows` images, in `shards`
    task runs, sooner than threads. A pool runs at most one shard per worker, so fewer shards
    than cores leave workers idle. Rows or shards None (a refetch, which does not know them
    before it starts): threads, since a refetch retries the rows that failed, mostly URLs that
    do not answer, whose cost is waiting rather than CPU."""
    if rows is None or shards is None or cores < 2:
        return False
    pool_rate = costs.pool_images_per_s_per_core * min(cores, shards)
    return costs.pool_start_s + rows / pool_rate < rows / costs.threads_images_per_s


def break_even_rows(cores: int, costs: RunnerCosts = FETCH_COSTS) -> int | None:
    """The fewest rows for which the pool pays on `cores` cores, given a shard per core at
    least (None: never, as on one core, or where the pool is no faster per image)."""
    gain_per_row = 1 / costs.threads_images_per_s - 1 / (costs.pool_images_per_s_per_core * cores)
    if cores < 2 or gain_per_row <= 0:
        return None
    rows = math.ceil(costs.pool_start_s / gain_per_row)
    # the exact integer under pool_pays' own floating-point arithmetic
    while not pool_pays(rows, cores, cores, costs):
        rows += 1
    while pool_pays(rows - 1, cores, cores, costs):
        rows -= 1
    return rows


def shard_share(total: int, shards_at_once: int, least: int = 1) -> int:
    """One shard's part of `total` when `shards_at_once` shards run together: rounded up, and
    at least `least`.

    The fetch shares two budgets this way. A host's requests in flight (`host_concurrency`), so
    the host sees the same politeness however the fetch is split. And the store threads that
    decode, hash and put (`FetchOptions.store_workers`), so that the shards running at once use
    that many threads in all, not that many each: four shards of the thread runner with 16
    threads each put 64 decoding threads on 2 cores, and fewer threads won 15 of 16 alternating
    pairs (bench/README.md, "What a GET costs, the decode by kind of JPEG, and the store threads").
    """
    if shards_at_once < 1:
        raise ValueError(f"shards_at_once must be >= 1, got {shards_at_once}")
    return max(least, math.ceil(total / shards_at_once))


def shard_budgets(host_concurrency: int, store_workers: int, shards_at_once: int) -> tuple[int, int]:
    """One shard's (requests in flight per host, store threads) when `shards_at_once` shards
    run together: its share of each, with at least 2 store threads (one decodes while another
    waits on a put)."""
    return (shard_share(host_concurrency, shards_at_once),
            shard_share(store_workers, shards_at_once, least=2))
