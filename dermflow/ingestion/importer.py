"""Importing a dataset's images from an image source (`dermflow.ingestion.archive`) into the
object store, with the fetcher's guarantees.

`plan_import` lists the source once, matches its members to the dataset's rows and cuts the
rows whose image is not stored yet into shards (a streamed tar.gz into at most `stripes`
shards, since each shard scans it once). `import_shard` reads a shard's members and, in a
pool of `FetchOptions.store_workers` threads, verifies each one with the fetcher's own
`verify_image` (full decode, Pillow's pixel cap, pHash once) and stores it at
`images/<md5hash>` with the fetcher's retrying put, so `md5_mismatch`, `content_md5` and
`phash` mean exactly what they mean for a fetched image. At most `2 * store_workers` members
are held at once. A member that is damaged or not an image yields a failed row with
`archive_reason` set: the caller fetches that row by URL instead.

Nothing is deleted or overwritten: rows already stored are left out of the plan, so a rerun
imports nothing new and a killed import resumes where it stopped (an object put just before
the kill is verified by the manifest's reconcile step).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dermflow import layout
from dermflow.config import RUN_DEFAULTS
from dermflow.ingestion import archive
from dermflow.ingestion.fetch import FetchOptions, verify_and_store
from dermflow.ingestion.images import ImageRejected
from dermflow.ingestion.manifest import manifest_row, ok_row, plan_shards

if TYPE_CHECKING:
    import pandas as pd

    from dermflow.storage import ObjectStore

logger = logging.getLogger("dermflow.ingestion.importer")


@dataclass
class ImportPlan:
    shards: list[list[dict]]  # shard rows: the fetch's shard fields plus `member`
    matched: int  # dataset md5hashes the source holds
    already_stored: int  # of those, already in the bucket (not imported again)
    members: int
    unused: dict  # archive.UnusedMembers.as_dict()

    def summary(self) -> dict:
        return {"members": self.members, "matched": self.matched, "already_stored": self.already_stored,
                "to_import": sum(len(shard) for shard in self.shards), "shards": len(self.shards),
                "unused": self.unused}


def plan_import(dataset: pd.DataFrame, source: archive.ImageSource, stored: set[str], shard_size: int,
                stripes: int = 4) -> ImportPlan:
    """The shards of dataset rows to import from `source`; `ArchiveError` when it holds none."""
    wanted = set(dataset["md5hash"].astype(str).str.strip().str.lower())
    match = archive.match_members(source.names(), wanted)
    if not match.matched:
        counts = match.unused.counts
        raise archive.ArchiveError(
            f"image source {source.label}: no member matches a CSV row ({match.members} file(s): {counts}); "
            "members must be named <md5hash>.<image extension>")
    held = dataset[dataset["md5hash"].astype(str).str.strip().str.lower().isin(match.matched.keys())]
    to_import = len(set(match.matched) - stored)
    if source.streamed and to_import:
        shard_size = max(shard_size, math.ceil(to_import / max(stripes, 1)))
    shards = plan_shards(held, stored, shard_size=shard_size)
    for shard in shards:
        for row in shard:
            row["member"] = match.matched[row["md5hash"]]
    return ImportPlan(shards=shards, matched=len(match.matched), already_stored=len(set(match.matched) & stored),
                      members=match.members, unused=match.unused.as_dict())


def _import_one(store: ObjectStore, row: dict, body: bytes | archive.MemberDamaged, options: FetchOptions) -> dict:
    if isinstance(body, archive.MemberDamaged):
        logger.info("%s: %s", row["member"], body.detail)
        return manifest_row(row, reason=body.reason, source="archive", archive_reason=body.reason)
    try:
        facts = verify_and_store(store, layout.image_key(row["md5hash"]), body, options)
    except ImageRejected as error:
        logger.info("%s: %s", row["member"], error.reason)
        return manifest_row(row, reason=error.reason, bytes=len(body), source="archive", archive_reason=error.reason)
    return ok_row(row, facts, len(body), attempts=0) | {"source": "archive"}


def import_shard(rows: list[dict], source: archive.ImageSource, store: ObjectStore,
                 options: FetchOptions | None = None) -> list[dict]:
    """Import one shard's members; one manifest row per input row, in input order (a member
    missing from the source is `damaged_member`)."""
    options = options or FetchOptions()
    by_member = {row["member"]: row for row in rows}
    results: dict[str, dict] = {}
    slots = threading.BoundedSemaphore(2 * options.store_workers)  # members held in memory at once
    with concurrent.futures.ThreadPoolExecutor(options.store_workers, thread_name_prefix="dermflow-import") as pool:
        futures = []
        for name, body in source.read_members(list(by_member)):
            slots.acquire()
            future = pool.submit(_import_one, store, by_member[name], body, options)
            future.add_done_callback(lambda _f: slots.release())
            futures.append((name, future))
        for name, future in futures:
            results[name] = future.result()
    missing = archive.MemberDamaged("damaged_member", "member not found when reading")
    return [results.get(row["member"]) or _import_one(store, row, missing, options) for row in rows]


def import_shard_from(rows: list[dict], spec: str, store: ObjectStore, options: FetchOptions | None = None,
                      spool_dir: Path | None = None) -> list[dict]:
    """`import_shard` with the source opened from its spec (what a task runs), shared with
    the process's other shards of the same archive (`archive.shared_source`)."""
    return import_shard(rows, archive.shared_source(spec, store, spool_dir), store, options)


def archive_reasons(results: list[dict]) -> dict[str, str]:
    """md5hash -> why its member was not imported, for the rows to fetch by URL instead."""
    return {row["md5hash"]: row["archive_reason"] for row in results if row.get("status") != "ok"}


def merge_fallback(import_results: list[dict], fetch_results: list[dict]) -> list[dict]:
    """This run's manifest rows: the imported ones, then the URL fetch's, each URL row of a
    damaged member keeping the member's reason (`archive_reason`, source `url`); a damaged
    member's row that was not fetched keeps its import row."""
    reasons = archive_reasons(import_results)
    fetched = {row["md5hash"] for row in fetch_results}
    rows = [row for row in import_results if row.get("status") == "ok" or row["md5hash"] not in fetched]
    for row in fetch_results:
        extra = {"archive_reason": reasons[row["md5hash"]]} if row["md5hash"] in reasons else {}
        rows.append({"source": "url", **row, **extra})
    return rows


def import_dataset(store: ObjectStore, dataset: pd.DataFrame, spec: str, *,
                   shard_size: int = RUN_DEFAULTS["shard_size"],
                   options: FetchOptions | None = None, progress=None) -> tuple[list[dict], dict]:
    """Import every row `spec` holds, shard after shard in this process (the CLI's import,
    without a flow run); (the manifest rows, the plan's summary). `progress(done, total)`."""
    from dermflow.ingestion.manifest import stored_image_md5s
    from dermflow.ingestion.spool import release_spool

    try:
        with archive.open_source(spec, store) as source:
            plan = plan_import(dataset, source, stored_image_md5s(store), shard_size, stripes=1)
            total = sum(len(shard) for shard in plan.shards)
            results: list[dict] = []
            for shard in plan.shards:
                results.extend(import_shard(shard, source, store, options))
                if progress is not None:
                    progress(len(results), total)
    finally:
        release_spool(spec)
    return results, plan.summary()
