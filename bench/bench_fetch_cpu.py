"""CPU per image of each step of the fetcher, one step at a time, in one thread (issue 18).

Steps, each timed with the process's CPU clock over `--images` atlas20 images:
- hash (old recipe): RGB draft decode at >= 256 px, imagehash pHash of the whole image;
- hash (current recipe): `verify_image` (grayscale draft at >= 128 px, three pHashes, MD5);
- hash + verify on progressive JPEGs with every scan decoded and with the chroma-only scans
  left out (`jpeg_scans.luma_scans`, what the fetcher does);
- the decode alone, for progressive and baseline JPEGs apart, and through simplejpeg and
  PyTurboJPEG where they are installed (they wrap libjpeg-turbo, as Pillow does);
- put: boto3 `put_object` into a fresh SeaweedFS, with botocore's default request checksums
  and with `request_checksum_calculation="when_required"` (the store's setting);
- GET: `dermflow.ingestion.http.read_async` (guard, pinned connection, caps) from a local
  atlas server, on one pooled client: 16 requests in flight (`fetch_shard`'s default) and as
  many as one shard of `derm/fetch` gets with the flow's defaults (4).
SeaweedFS and the image server run in other processes; their CPU is not counted.

Usage: .venv/bin/python bench/bench_fetch_cpu.py [--images 600]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from bench.services import ATLAS, atlas_is_absent, bench_seaweed  # noqa: E402


def per_image_ms(step, items) -> float:
    start = time.process_time()
    for item in items:
        step(item)
    return (time.process_time() - start) / len(items) * 1000


def old_recipe(data: bytes) -> str:
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        scale = max(1.0, min(width, height) / 256)
        image.draft("RGB", (int(width / scale), int(height / scale)))
        image.load()
        return str(imagehash.phash(image))


def is_progressive(data: bytes) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return bool(image.info.get("progressive") or image.info.get("progression"))


def pillow_draft(data: bytes) -> None:
    """The hash's gray draft decode of the whole body (every scan, like the other decoders)."""
    from PIL import Image

    from dermflow.ingestion.images import draft_for_hash

    with Image.open(io.BytesIO(data)) as image:
        draft_for_hash(image)
        image.load()


@contextmanager
def every_scan_decoded():
    """The hash's decode with every JPEG scan, as before `jpeg_scans.luma_scans` (issue 18)."""
    import dermflow.ingestion.images as images

    real, images.luma_scans = images.luma_scans, lambda body: body
    try:
        yield
    finally:
        images.luma_scans = real


def verify_every_scan(data: bytes):
    """`verify_image` with every scan decoded."""
    from dermflow.ingestion.images import verify_image

    with every_scan_decoded():
        return verify_image(data)


def measure_chroma_scans(progressive: list[bytes]) -> dict[str, float]:
    """What leaving out the chroma-only scans saves on progressive JPEGs: `verify_image` with and
    without them, alternated A B B A because the box's speed drifts."""
    from dermflow.ingestion.images import verify_image

    left_out = [per_image_ms(verify_image, progressive)]
    every = [per_image_ms(verify_every_scan, progressive), per_image_ms(verify_every_scan, progressive)]
    left_out.append(per_image_ms(verify_image, progressive))
    return {f"hash + verify, every scan decoded: {len(progressive)} progressive JPEGs": sum(every) / 2,
            f"hash + verify, chroma-only scans left out: {len(progressive)} progressive": sum(left_out) / 2}


def measure_decodes(datas: list[bytes]) -> dict[str, float]:
    """The hash's decode alone (`draft_for_hash`, Pillow), split by JPEG kind: a progressive
    JPEG's Huffman decoding of every scan is what the draft scale cannot skip. Then the same
    decode through the other libjpeg-turbo wrappers the issue names, where installed."""
    from dermflow.ingestion.images import verify_image

    progressive = [data for data in datas if is_progressive(data)]
    baseline = [data for data in datas if not is_progressive(data)]
    rows = {}
    for kind, subset in ((f"{len(progressive)} progressive JPEGs", progressive),
                         (f"{len(baseline)} baseline JPEGs", baseline)):
        if subset:
            rows[f"hash + verify: {kind}"] = per_image_ms(verify_image, subset)
            rows[f"decode only, gray draft: {kind}"] = per_image_ms(pillow_draft, subset)
    if progressive:
        rows.update(measure_chroma_scans(progressive))
    rows["decode only, gray draft: all (Pillow)"] = per_image_ms(pillow_draft, datas)
    try:
        import simplejpeg
    except ImportError:
        print("simplejpeg is not installed: its row is left out (pip install simplejpeg)")
    else:
        rows["decode only, gray, >= 128 px: simplejpeg"] = per_image_ms(
            lambda data: simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=128, min_width=128), datas)
    try:
        from turbojpeg import TJPF_GRAY, TurboJPEG

        turbo = TurboJPEG()
    except (ImportError, RuntimeError, OSError) as error:
        print(f"PyTurboJPEG is not usable here ({type(error).__name__}): its row is left out")
    else:
        rows["decode only, gray, 1/2 scale: PyTurboJPEG"] = per_image_ms(
            lambda data: turbo.decode(data, pixel_format=TJPF_GRAY, scaling_factor=(1, 2)), datas)
    return rows


def measure_puts(datas: list[bytes], work: Path) -> dict[str, float]:
    import boto3
    from botocore.config import Config

    from dermflow.settings import load_settings
    from dermflow.storage import ObjectStore

    seaweed = bench_seaweed(work)
    seaweed.start()
    try:
        settings = load_settings(aws_endpoint_url=seaweed.endpoint_url, aws_access_key_id=seaweed.access_key,
                                 aws_secret_access_key=seaweed.secret_key, bucket="bench-cpu")
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        client = store.client
        # botocore's own default (a checksum of every put body), whatever the store sets
        default = boto3.session.Session().client(
            "s3", endpoint_url=seaweed.endpoint_url, aws_access_key_id=seaweed.access_key,
            aws_secret_access_key=seaweed.secret_key, region_name=settings.aws_default_region,
            config=Config(s3={"addressing_style": settings.s3_addressing_style},
                          request_checksum_calculation="when_supported"))
        results = {}
        for name, s3 in (("put (botocore default checksums)", default), ("put (store client)", client)):
            s3.put_object(Bucket="bench-cpu", Key="warm", Body=b"x")
            keys = iter(range(10**9))
            results[name] = per_image_ms(
                lambda data: s3.put_object(Bucket="bench-cpu", Key=f"{name[:12]}{next(keys)}", Body=data,
                                           ContentType="image/jpeg"), datas)
        # as the fetcher puts (the MD5 it already holds): through obstore, checked by the ETag
        # (the default), and through boto3 with Content-MD5 (bulk_s3_client=boto3)
        facts = {id(data): hashlib.md5(data).hexdigest() for data in datas}
        boto3_store = ObjectStore(store.bucket, client)
        for name, prefix, target in (("put (ObjectStore.put_bytes: obstore, ETag checked)", "obstore", store),
                                     ("put (ObjectStore.put_bytes: boto3, Content-MD5)", "boto3", boto3_store)):
            keys = iter(range(10**9))
            target.put_bytes(f"{prefix}-warm", datas[0], "image/jpeg", md5_hex=facts[id(datas[0])])
            results[name] = per_image_ms(lambda data, prefix=prefix, target=target: target.put_bytes(
                f"{prefix}-{next(keys)}", data, "image/jpeg", md5_hex=facts[id(data)]), datas)
        return results
    finally:
        seaweed.stop()


def flow_shard_budgets() -> tuple[int, int]:
    """Requests in flight and store threads of one shard of `derm/fetch` run with its defaults:
    the shards running at once share the fetch's budgets (`flows.fetch`, `shard_budgets`)."""
    from dermflow.ingestion.fetch import FetchOptions
    from dermflow.ingestion.parallelism import shard_budgets
    from flows.fetch import SHARD_PARALLELISM

    return shard_budgets(FetchOptions.host_concurrency, FetchOptions.store_workers, SHARD_PARALLELISM)


def measure_gets(n_images: int, work: Path, in_flight: int) -> float:
    """CPU per GET in this process, `in_flight` requests at once on one client (as in one
    shard); the atlas server runs in its own process (bench_fetch's)."""
    import csv

    from bench.bench_fetch import _start_image_server
    from dermflow.ingestion.fetch import IMAGE_ACCEPT, FetchOptions
    from dermflow.ingestion.guard import HostGuard
    from dermflow.ingestion.http import make_async_client, read_async
    from tests.support.image_servers import rewrite_csv_host

    server, rows_csv, base_url = _start_image_server(argparse.Namespace(latency=0.0, limit=n_images, copies=1), work)
    try:
        with rewrite_csv_host(rows_csv, base_url, work / "rows.csv").open() as handle:
            urls = [row["url"] for row in csv.DictReader(handle)]
        options = FetchOptions(allowed_hosts=("127.0.0.1",))

        async def run() -> float:
            guard = HostGuard(options.allowed_hosts)
            policy = options.read_policy()
            async with make_async_client(guard, policy, user_agent="bench", accept=IMAGE_ACCEPT) as client:
                await read_async(client, guard, urls[0], policy)  # warm: imports, first connection
                slots = asyncio.Semaphore(in_flight)

                async def one(url: str) -> None:
                    async with slots:
                        await read_async(client, guard, url, policy)

                start = time.process_time()
                await asyncio.gather(*(one(url) for url in urls))
                return (time.process_time() - start) / len(urls) * 1000

        return asyncio.run(run())
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    if atlas_is_absent():
        return 2
    from dermflow.ingestion.fetch import FetchOptions
    from dermflow.ingestion.images import verify_image

    paths = sorted((ATLAS / "images").glob("*.jpg"))[: args.images]
    datas = [path.read_bytes() for path in paths]
    rows = {"hash (old: RGB draft >= 256 px, one pHash)": per_image_ms(old_recipe, datas),
            "hash + verify (current: gray draft >= 128 px, three pHashes, MD5)": per_image_ms(verify_image, datas)}
    rows.update(measure_decodes(datas))
    work = Path(tempfile.mkdtemp(prefix="dermflow-bench-cpu-"))
    try:
        rows.update(measure_puts(datas, work))
        # httpcore's pool walks its connections at each request's start and end, so a GET costs
        # more with more in flight on one client: timed as `fetch_shard` alone runs and as one
        # shard of the default flow runs
        flow_in_flight, _ = flow_shard_budgets()
        for in_flight, where in ((FetchOptions.host_concurrency, "fetch_shard's default"),
                                 (flow_in_flight, "a shard of derm/fetch")):
            rows[f"GET (read_async, {in_flight} in flight: {where})"] = measure_gets(len(datas), work, in_flight)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"CPU per image over {len(datas)} atlas20 images ({sum(map(len, datas)) / len(datas) / 1e3:.0f} kB each):")
    for name, value in rows.items():
        print(f"  {name:<68} {value:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
