"""Fetch benchmark: dermflow's fetcher vs img2dataset, from the same slow server into the same S3.

Starts its own SeaweedFS (free ports, temp dir) and an atlas server (a separate process, so
CPU is measured per side) that serves ../shared/data/atlas20 with added latency per request.
Then, at the same number of requests in flight:

0. dermflow as a user runs it: the `derm` flow in mode `fetch` (`derm/fetch`) with its default
   parameters (task runner `auto`, host_concurrency 16), under a temporary Prefect server, from
   flow start to end (ingest, import/fetch shards, manifest); then the same with
   `task_runner=threads` (runners `flow`, `flow-threads`). Each flow side also prints where its
   time went, read back from the Prefect API (`bench.flow_timeline`): the flow's own work, the
   shards, and Prefect's waits for the subflow run and at its exit;
1. dermflow: plan_shards + fetch_shard for every shard + reconcile_manifest + manifest write, into
   SeaweedFS; shards run `--parallel` at a time in a thread pool (Prefect's thread runner) and
   again in warm worker processes (a Dask LocalCluster's workers), each into a fresh bucket;
2. img2dataset (own venv bench/.venv-img2dataset, installed if missing) writing local files;
3. img2dataset writing into the same SeaweedFS bucket through s3fs.

img2dataset runs with `--resize_mode no --skip_reencode True` (it still decodes each image, as
dermflow verifies each one, but keeps the original bytes), `--compute_hash md5`, no EXIF.
Ratios are given against img2dataset's wall time and against its own shard clock (first shard
start to last shard end, from its *_stats.json: no interpreter start-up), which favours it;
dermflow's time always includes planning, the manifest reconcile and the manifest write.

Usage: .venv/bin/python bench/bench_fetch.py [--latency 0.05] [--concurrency 16] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
I2D_VENV = PROJECT_ROOT / "bench" / ".venv-img2dataset"
sys.path.insert(0, str(PROJECT_ROOT))

from bench.flow_timeline import describe, read_stretches  # noqa: E402
from bench.services import ATLAS, atlas_is_absent, bench_seaweed  # noqa: E402

SERVER_SCRIPT = """
import sys, time
from pathlib import Path
from tests.support.image_servers import serve_atlas
with serve_atlas(Path(sys.argv[1]), Path(sys.argv[2]), latency_s=float(sys.argv[3])) as server:
    print(server.base_url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    print(sum(server.hits.values()), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    """user+system CPU of a live process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ensure_img2dataset() -> Path:
    binary = I2D_VENV / "bin" / "img2dataset"
    if not binary.exists():
        print(f"installing img2dataset and s3fs into {I2D_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset", "s3fs"], check=True)
    return binary


def report(name: str, images: int, total_bytes: int, wall: float, cpu: float, extra: str = "") -> dict:
    line = (f"{name:<34} {images:>5} images  {wall:7.2f} s  {images / wall:7.1f} images/s  "
            f"{total_bytes / wall / 1e6:6.1f} MB/s  CPU {cpu:6.2f} s ({cpu / max(images, 1) * 1000:.1f} ms/image)")
    print(line + (f"  {extra}" if extra else ""), flush=True)
    return {"name": name, "images": images, "bytes": total_bytes, "wall_s": wall, "cpu_s": cpu,
            "images_per_s": images / wall, "mb_per_s": total_bytes / wall / 1e6}


_worker_store = None


def _warm_worker(settings_kwargs: dict, pool_size: int) -> int:
    """Process-pool initialiser work: imports and one S3 client per worker, as a warm Dask worker has."""
    global _worker_store
    import dermflow.ingestion.fetch  # noqa: F401 - imported before the clock starts
    import dermflow.ingestion.manifest  # noqa: F401
    from dermflow.settings import load_settings
    from dermflow.storage import ObjectStore

    if _worker_store is None:
        _worker_store = ObjectStore.from_settings(load_settings(**settings_kwargs), max_pool_connections=pool_size)
    time.sleep(0.5)  # so that every worker of the pool gets one warm-up task
    return os.getpid()


def _fetch_in_worker(shard: list[dict], options) -> list[dict]:
    from dermflow.ingestion.fetch import fetch_shard

    return fetch_shard(shard, _worker_store, options)


def run_dermflow(store, settings_kwargs: dict, csv_path: Path, concurrency: int, parallel: int, shard_size: int,
                 seaweed_pid: int, runner: str) -> dict:
    """Fetch every row into `store`; shards `parallel` at a time in threads or in warm processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd

    from dermflow import layout
    from dermflow.ingestion.fetch import FetchOptions, fetch_shard
    from dermflow.ingestion.manifest import plan_shards, reconcile_manifest, stored_image_md5s, summarize_manifest

    dataset = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    options = FetchOptions(allowed_hosts=("127.0.0.1",), host_concurrency=concurrency)
    pool_size = concurrency + options.store_workers + 8
    worker_pids: list[int] = []
    if runner == "processes":
        pool = ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"))
        worker_pids = sorted(set(pool.map(_warm_worker, [settings_kwargs] * parallel, [pool_size] * parallel)))
        fetch = lambda shard: pool.submit(_fetch_in_worker, shard, options)  # noqa: E731
    else:
        pool = ThreadPoolExecutor(parallel)
        fetch = lambda shard: pool.submit(fetch_shard, shard, store, options)  # noqa: E731
    worker_cpu0 = sum(cpu_seconds(pid) for pid in worker_pids)
    cpu0, seaweed0, wall0 = time.process_time(), cpu_seconds(seaweed_pid), time.perf_counter()
    shards = plan_shards(dataset, stored_image_md5s(store), shard_size=shard_size)
    futures = [fetch(shard) for shard in shards]
    rows = [row for future in futures for row in future.result()]
    manifest = reconcile_manifest(dataset, store, None, rows)
    store.put_dataframe_csv(layout.FETCH_MANIFEST_KEY, manifest)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0 + sum(cpu_seconds(pid) for pid in worker_pids) - worker_cpu0
    seaweed_cpu = cpu_seconds(seaweed_pid) - seaweed0
    pool.shutdown()
    summary = summarize_manifest(manifest)
    result = report(f"dermflow -> SeaweedFS ({runner})", summary["ok"], summary["bytes"], wall, cpu,
                    f"[SeaweedFS CPU {seaweed_cpu:.2f} s; {summary['failed']} failed]")
    if summary["failed"]:
        print(f"  failures: {summary['by_reason']}")
    return result


def atlas_zip(csv_path: Path, work: Path, images: Path) -> tuple[Path, Path]:
    """(the rows' images from `images` as one zip, the rows without URLs): every image must come
    from the archive."""
    import csv
    import zipfile

    archive = work / "atlas20.zip"
    rows = list(csv.DictReader(csv_path.open()))
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as handle:
        for md5hash in sorted({row["md5hash"] for row in rows}):
            handle.write(images / f"{md5hash}.jpg", f"atlas20/{md5hash}.jpg")
    no_urls = work / "rows-no-urls.csv"
    with no_urls.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "url": ""} for row in rows)
    return archive, no_urls


def run_flow(settings_kwargs: dict, csv_path: Path, seaweed_pid: int, runner: str, images: Path) -> dict:
    """The `derm` flow in mode fetch, as `prefect deployment run derm/fetch` runs it, with its
    default parameters (`runner` "flow"), `task_runner=threads` ("flow-threads"), or importing
    every image from a zip of the atlas with no URLs ("import", "import-threads"); "-boto3"
    sides put images through boto3 (`DERMFLOW_BULK_S3_CLIENT=boto3`) instead of obstore. Runs under the caller's
    temporary Prefect server; its start is not timed."""
    import asyncio

    import tasks.common
    from dermflow.settings import get_settings

    env = {"AWS_ENDPOINT_URL": settings_kwargs["aws_endpoint_url"],
           "AWS_ACCESS_KEY_ID": settings_kwargs["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": settings_kwargs["aws_secret_access_key"],
           "DERMFLOW_BUCKET": settings_kwargs["bucket"], "DERMFLOW_ALLOWED_HOSTS": "127.0.0.1"}
    os.environ.update(env)  # the flow's tasks (and its worker processes) read the settings
    # "-boto3": the defaults, with every image put through boto3 (Content-MD5) instead of obstore
    os.environ.pop("DERMFLOW_BULK_S3_CLIENT", None)
    if runner.endswith("-boto3"):
        os.environ["DERMFLOW_BULK_S3_CLIENT"] = "boto3"
    get_settings.cache_clear()
    tasks.common.object_store.cache_clear()
    from flows.derm import derm

    parameters = {"mode": "fetch", "csv": str(csv_path)}
    if runner.endswith(("-threads", "-processes")):
        parameters["task_runner"] = runner.rsplit("-", 1)[1]
    if runner.startswith("import"):
        archive, no_urls = atlas_zip(csv_path, csv_path.parent, images)
        parameters.update(csv=str(no_urls), images=str(archive))
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = datetime.now(timezone.utc)
    cpu0, seaweed0, wall0 = time.process_time(), cpu_seconds(seaweed_pid), time.perf_counter()
    result = asyncio.run(derm(**parameters))
    wall = time.perf_counter() - wall0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the pool's worker processes have exited and been waited for when the flow returns
    cpu = (time.process_time() - cpu0 + children.ru_utime - children0.ru_utime
           + children.ru_stime - children0.ru_stime)
    seaweed_cpu = cpu_seconds(seaweed_pid) - seaweed0
    summary = result["fetch"]["summary"]
    name = {"flow": "dermflow derm/fetch (defaults)", "flow-threads": "dermflow derm/fetch (threads)",
            "flow-processes": "dermflow derm/fetch (processes)",
            "import": "dermflow derm/fetch, zip import",
            "import-threads": "dermflow derm/fetch, zip import (threads)",
            "import-processes": "dermflow derm/fetch, zip import (processes)",
            "flow-boto3": "dermflow derm/fetch (defaults, boto3 puts)",
            "import-boto3": "dermflow derm/fetch, zip import (boto3 puts)"}[runner]
    side = report(name, summary["ok"], summary["bytes"], wall, cpu,
                  f"[SeaweedFS CPU {seaweed_cpu:.2f} s; {summary['failed']} failed]")
    side["stretches"] = read_stretches(started)
    print(describe(side["stretches"], summary["ok"]), flush=True)
    return side


def run_img2dataset(binary: Path, urls_csv: Path, output: str, env: dict, concurrency: int, parallel: int,
                    shard_size: int) -> tuple[float, float]:
    argv = [
        str(binary), "--url_list", str(urls_csv), "--input_format", "csv", "--url_col", "url",
        "--output_format", "files", "--output_folder", output, "--resize_mode", "no", "--skip_reencode", "True",
        "--processes_count", str(parallel), "--thread_count", str(concurrency),
        "--number_sample_per_shard", str(shard_size), "--compute_hash", "md5", "--extract_exif", "False",
        "--timeout", "30", "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.perf_counter()
    completed = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every image request")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight per shard/process")
    parser.add_argument("--parallel", type=int, default=2, help="shards at once (img2dataset: processes)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--copies", type=int, default=1,
                        help="serve each row K times (new md5hash and imageId, the same bytes), for "
                             "fetches larger than the atlas; applied after --limit")
    parser.add_argument("--runners", default="flow,processes,import",
                        help="dermflow sides: flow (derm/fetch, defaults), flow-threads (derm/fetch, "
                             "task_runner=threads), flow-processes (task_runner=processes), threads (shards in one process), processes (warm "
                             "workers), import (derm/fetch from a zip of the atlas, no URLs, defaults), "
                             "import-threads, import-processes (the same, task_runner=threads|processes); flow-boto3, import-boto3: "
                             "the defaults with image puts through boto3 instead of obstore")
    parser.add_argument("--skip-img2dataset", action="store_true")
    return parser.parse_args()


def _copied_rows(rows_csv: Path, copies: int, work: Path) -> tuple[Path, Path]:
    """`copies` rows per row of `rows_csv`, each with its own md5hash and imageId, served from a
    folder of links to the same files: (rows CSV, images folder). The bytes repeat, so this
    measures throughput, not deduplication."""
    import csv
    import hashlib

    images = work / "copied-images"
    images.mkdir(parents=True, exist_ok=True)
    with open(rows_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    out_rows = []
    for row in rows:
        image_id = row["url"].rsplit("imageId=", 1)[1]
        for copy in range(copies):
            md5hash = row["md5hash"] if copy == 0 else hashlib.md5(f"{row['md5hash']}-{copy}".encode()).hexdigest()
            (images / f"{md5hash}.jpg").symlink_to(ATLAS / "images" / f"{row['md5hash']}.jpg")
            out_rows.append({**row, "md5hash": md5hash,
                             "url": row["url"].replace(f"imageId={image_id}", f"imageId={image_id}c{copy}")})
    out = work / "rows-copied.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(out_rows)
    return out, images


def _start_image_server(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, Path, str]:
    """The atlas served with `args.latency` per request: (server process, rows CSV, base URL).
    Sets `args.images`, the folder the served rows' images are in."""
    rows_csv, images = ATLAS / "rows.csv", ATLAS / "images"
    if args.limit:
        rows_csv = work / "rows-limited.csv"
        lines = (ATLAS / "rows.csv").read_text().splitlines(keepends=True)
        rows_csv.write_text("".join(lines[: args.limit + 1]))
    if args.copies > 1:
        rows_csv, images = _copied_rows(rows_csv, args.copies, work)
    args.images = images
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(images), str(rows_csv), str(args.latency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    return server, rows_csv, server.stdout.readline().strip()


def _run_dermflow_runners(args: argparse.Namespace, seaweed, csv_path: Path, results: dict) -> None:
    """dermflow's fetch once per runner of `args.runners`, each into its own bucket; the flow
    sides share one temporary Prefect server."""
    import contextlib

    from prefect.testing.utilities import prefect_test_harness

    seaweed_pid = seaweed.process.pid()
    runners = args.runners.split(",")
    with contextlib.ExitStack() as stack:
        if any(runner.startswith(("flow", "import")) for runner in runners):
            # as `dermflow up` runs its server: without the telemetry that writes to its SQLite
            # database while the first flow starts (and logs "database is locked" when it loses)
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            stack.enter_context(prefect_test_harness(server_startup_timeout=300))
        for index, runner in enumerate(runners):
            _run_one_side(runner, index, args, seaweed, seaweed_pid, csv_path, results)


def _run_one_side(runner: str, index: int, args: argparse.Namespace, seaweed, seaweed_pid: int, csv_path: Path,
                  results: dict) -> None:
    """One side into a bucket of its own: a runner named twice fetches everything again instead
    of finding the first run's objects (a resume), and its result is kept under its own name."""
    from dermflow.settings import load_settings
    from dermflow.storage import ObjectStore

    settings_kwargs = dict(aws_endpoint_url=seaweed.endpoint_url, aws_access_key_id=seaweed.access_key,
                           aws_secret_access_key=seaweed.secret_key, bucket=f"bench-{index}-{runner}")
    store = ObjectStore.from_settings(load_settings(**settings_kwargs), max_pool_connections=args.parallel * 40)
    store.ensure_bucket()
    if runner.startswith(("flow", "import")):
        results[_side_name(runner, results)] = run_flow(settings_kwargs, csv_path, seaweed_pid, runner, args.images)
    else:
        results[_side_name(runner, results)] = run_dermflow(store, settings_kwargs, csv_path, args.concurrency,
                                                       args.parallel, args.shard_size, seaweed_pid, runner)


def _side_name(runner: str, results: dict) -> str:
    name = f"dermflow ({runner})"
    repeats = sum(1 for key in results if key == name or key.startswith(name + " #"))
    return name if repeats == 0 else f"{name} #{repeats + 1}"


def _img2dataset_output(store, output: str) -> tuple[list, int, list[dict]]:
    """(stored images, their bytes, img2dataset's shard stats) of one img2dataset run."""
    if output.startswith("s3://"):
        listing = [o for p in store.client.get_paginator("list_objects_v2").paginate(
            Bucket="bench", Prefix="img2dataset/") for o in p.get("Contents", [])]
        got = [o for o in listing if o["Key"].endswith(".jpg")]
        stats = [store.get_json(o["Key"]) for o in listing if o["Key"].endswith("_stats.json")]
        return got, sum(o["Size"] for o in got), stats
    got = list(Path(output).rglob("*.jpg"))
    stats = [json.loads(f.read_text()) for f in Path(output).glob("*_stats.json")]
    return got, sum(f.stat().st_size for f in got), stats


def _run_img2dataset(args: argparse.Namespace, i2d, seaweed, store, csv_path: Path, work: Path,
                     results: dict) -> None:
    """img2dataset on the same rows, into local files and into SeaweedFS through s3fs."""
    urls_csv = work / "urls.csv"
    shutil.copy(csv_path, urls_csv)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "FSSPEC_S3_ENDPOINT_URL": seaweed.endpoint_url,
           "FSSPEC_S3_KEY": seaweed.access_key, "FSSPEC_S3_SECRET": seaweed.secret_key,
           "AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
           "AWS_ENDPOINT_URL": seaweed.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}
    n = max(r["images"] for key, r in results.items() if key.startswith("dermflow"))
    seaweed_pid = seaweed.process.pid()
    for name, output in (("img2dataset -> local files", str(work / "i2d-files")),
                         ("img2dataset -> SeaweedFS (s3fs)", "s3://bench/img2dataset")):
        seaweed0 = cpu_seconds(seaweed_pid)
        wall, cpu = run_img2dataset(i2d, urls_csv, output, env, args.concurrency, args.parallel, args.shard_size)
        got, stored_bytes, stats = _img2dataset_output(store, output)
        # img2dataset's own clock: first shard start to last shard end (no start-up, no teardown).
        active = max(st["end_time"] for st in stats) - min(st["start_time"] for st in stats)
        extra = f"[its own shard clock: {active:.2f} s]"
        if output.startswith("s3://"):
            extra += f" [SeaweedFS CPU {cpu_seconds(seaweed_pid) - seaweed0:.2f} s]"
        results[name] = report(name, len(got), stored_bytes, wall, cpu, extra)
        results[name]["active_s"] = active
        if len(got) != n:
            print(f"  note: img2dataset stored {len(got)} images, dermflow {n}")


def _print_ratios(results: dict) -> None:
    print()
    for ours_name in [name for name in results if name.startswith("dermflow") and "import" not in name]:
        ours = results[ours_name]
        for name in ("img2dataset -> local files", "img2dataset -> SeaweedFS (s3fs)"):
            theirs = results[name]
            ratio = ours["images_per_s"] / (theirs["images"] / theirs["active_s"])
            ratio_wall = ours["images_per_s"] / theirs["images_per_s"]
            print(f"throughput ratio {ours_name} / {name}: {ratio:.2f}x vs its shard clock "
                  f"(no start-up), {ratio_wall:.2f}x vs its wall time")


def main() -> int:
    args = _parse_args()
    if atlas_is_absent():
        return 2

    from dermflow.settings import load_settings
    from dermflow.storage import ObjectStore
    from tests.support.image_servers import rewrite_csv_host

    work = Path(tempfile.mkdtemp(prefix="dermflow-bench-fetch-"))
    seaweed = bench_seaweed(work)
    server = None
    results: dict[str, dict] = {}
    try:
        print(f"starting SeaweedFS in {work} ...", flush=True)
        seaweed.start()
        server, rows_csv, base_url = _start_image_server(args, work)
        csv_path = rewrite_csv_host(rows_csv, base_url, work / "rows.csv")
        print(f"serving {rows_csv} at {base_url} with {args.latency * 1000:.0f} ms latency; "
              f"{args.parallel} x {args.concurrency} requests in flight", flush=True)
        _run_dermflow_runners(args, seaweed, csv_path, results)
        store = ObjectStore.from_settings(load_settings(
            aws_endpoint_url=seaweed.endpoint_url, aws_access_key_id=seaweed.access_key,
            aws_secret_access_key=seaweed.secret_key, bucket="bench"))
        store.ensure_bucket()
        i2d = None if args.skip_img2dataset else ensure_img2dataset()
        if i2d is not None:
            _run_img2dataset(args, i2d, seaweed, store, csv_path, work, results)
            _print_ratios(results)
        (work / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nresults: {work / 'results.json'}")
        return 0
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)
        seaweed.stop()
        shutil.rmtree(work / "seaweed", ignore_errors=True)
        shutil.rmtree(work / "i2d-files", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
