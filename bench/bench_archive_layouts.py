"""Archive layouts benchmark: derm/full on the 2,076 real atlas20 images from an archive in
each layout a researcher may receive, with every image URL dead; then, in the same run, the
import's rate next to the URL fetch's rate for the same images.

Layouts (one archive each, built in a temp dir from `../shared/data/atlas20`):

- `flat-zip`: `<md5>.jpg` at the root;
- `nested-zip`: `fitzpatrick17k/<label>/<md5>.jpg` (one folder per condition);
- `mixed-case-zip`: flat, extensions cycling `.jpg .JPG .jpeg .JPEG .Jpg`, every third stem
  in upper case;
- `junk-zip`: `images/<md5>.jpg` plus what hand-made archives carry: a `__MACOSX/._<name>`
  fork per image, `.DS_Store` files, a README and a LICENSE, `Thumbs.db`, JPEGs not named by an
  md5, JPEGs named by md5s that are not in the CSV; and, as archives made by hand do, one
  damaged (truncated) member and `--missing` rows left out. Those rows fall back to their dead
  URLs and end failed: the run must still complete;
- `nested-tar.gz`: `fitzpatrick17k/images/<md5[:2]>/<md5>.jpg` in a gzipped tar (streamed).

Every row's URL is rewritten to a local server that answers 404 to everything (and counts the
requests). One stack (`dermflow up` in a temp dir, as `tests/integration/stack.py` starts it)
serves all layouts; before each layout the bucket's `images/` and `manifests/` are deleted, so
each layout imports every image afresh (a run over already-stored images imports nothing).
Each layout runs

    prefect deployment run derm/full -p csv=ROWS -p images=ARCHIVE -p architectures=["baseline_cnn"]
        -p weights=none -p image_size=32 -p epochs=1 -p tune=false --watch

and prints: the derm flow run's state, rows imported (`source=archive`, ok), rows failed,
requests to the dead host, the members not used (from `plan-import`'s log line), the import's
rows/s (first `import-shard` start to last end) and the wall time; a sample of stored images
is compared byte for byte with the originals.

Rates (`--rates`, on by default): on the emptied bucket, `derm/fetch` from the flat zip with
dead URLs (the import), then, on the emptied bucket again, `derm/fetch` with the URLs served
live by the atlas mirror (`dermflow.ops.mirror.serve_atlas`, in a separate process, no added
latency unless `--latency`). Each gives images/s over its shards' window and images per
CPU-second (the derm flow-run process plus SeaweedFS over that window; the URL server's own
CPU is printed apart). `--repeats N` repeats the pair.

Usage: .venv/bin/python bench/bench_archive_layouts.py [--layouts flat-zip,...] [--no-rates]
       [--out figures.json]
Skips with a message when atlas20 is absent.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ATLAS = PROJECT_ROOT.parent / "shared" / "data" / "atlas20"
sys.path.insert(0, str(PROJECT_ROOT))

LAYOUTS = ("flat-zip", "nested-zip", "mixed-case-zip", "junk-zip", "nested-tar.gz")
MIXED_EXTENSIONS = (".jpg", ".JPG", ".jpeg", ".JPEG", ".Jpg")
SETTINGS = ("-p", 'architectures=["baseline_cnn"]', "-p", "weights=none", "-p", "image_size=32",
            "-p", "epochs=1", "-p", "tune=false")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def layout_members(layout: str, rows: list[dict]) -> list[tuple[str, str]]:
    """(member name, md5hash) for every row the layout holds, in archive order."""
    members = []
    for index, row in enumerate(rows):
        md5 = row["md5hash"]
        if layout == "flat-zip":
            members.append((f"{md5}.jpg", md5))
        elif layout == "nested-zip":
            members.append((f"fitzpatrick17k/{_slug(row['label'])}/{md5}.jpg", md5))
        elif layout == "mixed-case-zip":
            stem = md5.upper() if index % 3 == 0 else md5
            members.append((f"{stem}{MIXED_EXTENSIONS[index % len(MIXED_EXTENSIONS)]}", md5))
        elif layout == "junk-zip":
            members.append((f"images/{md5}.jpg", md5))
        elif layout == "nested-tar.gz":
            members.append((f"fitzpatrick17k/images/{md5[:2]}/{md5}.jpg", md5))
        else:
            raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return members


def junk_members(images: Path, rows: list[dict]) -> list[tuple[str, bytes]]:
    """What hand-made archives carry besides the images: forks, dot files, notes, thumbnails,
    images not named by an md5, and images named by md5s the CSV does not list."""
    from PIL import Image

    sample = (images / f"{rows[0]['md5hash']}.jpg").read_bytes()
    extra = []
    for quality in (70, 80, 90):  # re-encoded: valid JPEGs whose md5s are in no CSV row
        buffer = io.BytesIO()
        Image.open(io.BytesIO(sample)).convert("RGB").save(buffer, "JPEG", quality=quality)
        extra.append(buffer.getvalue())
    import hashlib

    junk = [(f"__MACOSX/images/._{row['md5hash']}.jpg", b"\x00\x05\x16\x07" + b"\x00" * 4092) for row in rows]
    junk += [(".DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 6140), ("images/.DS_Store", b"\x00\x00\x00\x01Bud1"),
             ("README.txt", b"Fitzpatrick 17k images, as sent on request.\n"), ("LICENSE", b"CC BY-NC-SA 3.0\n"),
             ("images/Thumbs.db", b"\xd0\xcf\x11\xe0" + b"\x00" * 508), ("notes/sources.csv", b"md5hash,source\n"),
             ("images/IMG_0001.jpg", extra[0]), ("previews/cover.JPG", extra[1])]
    junk += [(f"images/{hashlib.md5(body).hexdigest()}.jpg", body) for body in extra]
    return junk


def build_archive(layout: str, images: Path, rows: list[dict], folder: Path, missing: int) -> tuple[Path, dict]:
    """The archive of `layout` and what it holds: images, junk members, rows left out or damaged."""
    members = layout_members(layout, rows)
    junk: list[tuple[str, bytes]] = []
    damaged: set[str] = set()
    if layout == "junk-zip":
        junk = junk_members(images, rows)
        members = members[: len(members) - missing]  # rows the sender forgot: their URLs are dead
        damaged = {members[len(members) // 2][1]}  # a member cut short in transit
    entries = [(name, md5) for name, md5 in members]
    path = folder / (layout if layout.endswith(".tar.gz") else f"{layout}.zip")

    def body(md5: str) -> bytes:
        data = (images / f"{md5}.jpg").read_bytes()
        return data[: len(data) // 3] if md5 in damaged else data

    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as handle:
            for name, md5 in entries:
                handle.writestr(name, body(md5))
            for name, data in junk:
                handle.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz", compresslevel=1) as handle:
            for name, md5 in entries:
                data = body(md5)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                handle.addfile(info, io.BytesIO(data))
    return path, {"members_images": len(entries), "members_junk": len(junk), "rows_left_out": len(rows) - len(entries),
                  "damaged": sorted(damaged), "bytes": path.stat().st_size}


def empty_bucket_images(store) -> None:
    """Forget every stored image and manifest, so that the next run imports everything afresh
    (runs and the registry stay: each run has its own id)."""
    for prefix in ("images/", "manifests/"):
        store.delete_prefix(prefix)


async def facts_since(stack, since: float) -> dict:
    """The derm flow runs started after `since`, their states, task-run windows by name and the
    plan-import log line."""
    from datetime import datetime, timezone

    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterStartTime, LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterStartTime,
    )

    after = datetime.fromtimestamp(since, tz=timezone.utc)
    async with stack.prefect_client() as client:
        flow_runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)))
        names = {run.id: (await client.read_flow(run.flow_id)).name for run in flow_runs}
        task_runs = []
        while True:  # the API pages at 200
            page = await client.read_task_runs(
                task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=after)),
                limit=200, offset=len(task_runs))
            task_runs.extend(page)
            if len(page) < 200:
                break
        plans = [t.id for t in task_runs if t.name.startswith("plan-import")]
        logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=plans)), limit=50) if plans else []
    # the deployments' schedules add future derm/retrain runs: only runs that ran count
    flow_runs = [run for run in flow_runs if run.state_type and run.state_type.value != "SCHEDULED"]
    derm = [run for run in flow_runs if names[run.id] == "derm"]
    windows = {}
    for name in ("import-shard", "fetch-shard"):
        done = [t for t in task_runs if t.name.startswith(name) and t.start_time and t.end_time]
        if done:
            windows[name] = (min(t.start_time for t in done).timestamp(), max(t.end_time for t in done).timestamp(),
                             len(done))
    unused = [log.message for log in logs if log.message.startswith("image source ")]
    return {"derm_run_ids": [str(run.id) for run in derm], "states": [run.state_name for run in derm],
            "flow_runs": len(flow_runs), "task_runs": len(task_runs), "windows": windows,
            "plan_import": unused[-1] if unused else ""}


def manifest_counts(store) -> dict:
    manifest = store.get_dataframe_csv("manifests/fetch.csv")
    ok = manifest["status"] == "ok"
    return {"rows": len(manifest), "imported": int((ok & (manifest["source"] == "archive")).sum()),
            "by_url": int((ok & (manifest["source"] == "url")).sum()), "failed": int((~ok).sum()),
            "failed_reasons": manifest.loc[~ok, "reason"].value_counts().to_dict(),
            "damaged_reasons": manifest.loc[manifest["archive_reason"] != "", "archive_reason"].value_counts().to_dict()}


def check_bytes(store, images: Path, md5s: list[str]) -> int:
    """How many of `md5s` are stored byte-identical to the originals (raises on a difference)."""
    for md5 in md5s:
        if store.get_bytes(f"images/{md5}") != (images / f"{md5}.jpg").read_bytes():
            raise AssertionError(f"images/{md5} differs from the original")
    return len(md5s)


def rate(sampler, facts: dict, task: str, server_pid: int | None = None) -> dict:
    """images/s over the task's window and images per CPU-second of the flow run + SeaweedFS."""
    from bench.bench_scale import flow_run_pid

    if task not in facts["windows"]:
        return {}
    start, end, shards = facts["windows"][task]
    pid = flow_run_pid(sampler, facts["derm_run_ids"])
    weed = [p for p, (_, cmd) in sampler.peak.items() if "weed" in cmd]
    cpu_flow = sampler.cpu_between(pid, start, end) if pid else float("nan")
    cpu_weed = sum(sampler.cpu_between(p, start, end) for p in weed)
    return {"task": task, "shards": shards, "window_s": round(end - start, 2), "cpu_s_flow_run": round(cpu_flow, 2),
            "cpu_s_seaweedfs": round(cpu_weed, 2)}


def finish_rate(figures: dict, images: int, server_cpu: float | None = None) -> dict:
    if not figures:
        return figures
    cpu = figures["cpu_s_flow_run"] + figures["cpu_s_seaweedfs"]
    figures.update({"images": images, "images_per_s": round(images / figures["window_s"], 1),
                    "images_per_cpu_s": round(images / max(cpu, 1e-9), 1)})
    if server_cpu is not None:
        figures["cpu_s_url_server"] = round(server_cpu, 2)
    return figures


def run_layout(stack, sampler, layout: str, rows, folder: Path, args) -> dict:
    from tests.support.image_servers import serve_faults

    archive, held = build_archive(layout, ATLAS / "images", rows.to_dict("records"), folder, args.missing)
    store = stack.store()
    empty_bucket_images(store)
    with serve_faults({}) as dead:
        csv_path = folder / f"{layout}-rows.csv"
        rows.assign(url=[dead.url("404", md5) for md5 in rows["md5hash"]]).to_csv(csv_path, index=False)
        since = time.time()
        started = time.monotonic()
        result = stack.prefect("deployment", "run", "derm/full", "-p", f"csv={csv_path}", "-p", f"images={archive}",
                               *SETTINGS, "--watch", timeout=args.timeout, check=False)
        wall = time.monotonic() - started
        dead_requests = sum(dead.hits.values())
    facts = asyncio.run(facts_since(stack, since))
    figures = {"layout": layout, "archive": archive.name, **held, "exit": result.returncode,
               "state": ",".join(facts["states"]), "wall_s": round(wall, 1), "dead_url_requests": dead_requests,
               "flow_runs": facts["flow_runs"], "task_runs": facts["task_runs"], "plan_import": facts["plan_import"]}
    if result.returncode:
        print(result.stdout[-4000:], result.stderr[-2000:], flush=True)
    if store.exists("manifests/fetch.csv"):
        figures.update(manifest_counts(store))
        good = [md5 for md5 in rows["md5hash"][:: max(1, len(rows) // 50)] if md5 not in held["damaged"]]
        stored = set(store.list_keys("images/"))
        figures["bytes_checked"] = check_bytes(store, ATLAS / "images", [m for m in good if f"images/{m}" in stored])
    figures.update({f"import_{k}": v for k, v in finish_rate(rate(sampler, facts, "import-shard"),
                                                              figures.get("imported", 0)).items()})
    archive.unlink()  # 143 MB each: keep one on disk at a time
    print(json.dumps(figures), flush=True)
    return figures


SERVER_SCRIPT = """
import sys
from pathlib import Path
from tests.support.image_servers import serve_atlas
with serve_atlas(Path(sys.argv[1]), Path(sys.argv[2]), latency_s=float(sys.argv[3])) as server:
    print(server.base_url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    print(sum(server.hits.values()), flush=True)
"""


def measure_rates(stack, sampler, rows, folder: Path, args) -> dict:
    """derm/fetch from the flat zip (dead URLs), then derm/fetch by URL from a live local
    server, each on an emptied bucket; the same 2,076 images."""
    from bench.bench_fetch import cpu_seconds
    from tests.support.image_servers import rewrite_csv_host, serve_faults

    store = stack.store()
    archive, _ = build_archive("flat-zip", ATLAS / "images", rows.to_dict("records"), folder, 0)
    server = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(ATLAS / "images"), str(ATLAS / "rows.csv"),
                               str(args.latency)], cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    pairs = []
    try:
        live_csv = rewrite_csv_host(ATLAS / "rows.csv", server.stdout.readline().strip(), folder / "live-rows.csv")
        for repeat in range(args.repeats):
            pair = {}
            empty_bucket_images(store)
            with serve_faults({}) as dead:
                dead_csv = folder / "dead-rows.csv"
                rows.assign(url=[dead.url("404", m) for m in rows["md5hash"]]).to_csv(dead_csv, index=False)
                pair["import"] = fetch_once(stack, sampler, dead_csv, archive, "import-shard", args.timeout)
                pair["import"]["dead_url_requests"] = sum(dead.hits.values())
            empty_bucket_images(store)
            before = cpu_seconds(server.pid)
            pair["url"] = fetch_once(stack, sampler, live_csv, None, "fetch-shard", args.timeout)
            pair["url"]["cpu_s_url_server"] = round(cpu_seconds(server.pid) - before, 2)
            print(json.dumps({"repeat": repeat, **pair}), flush=True)
            pairs.append(pair)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        archive.unlink()
    return {"latency_s": args.latency, "pairs": pairs}


def fetch_once(stack, sampler, csv_path: Path, archive: Path | None, task: str, timeout: float) -> dict:
    """One derm/fetch run (from `archive` when given, else by URL) and its rate over `task`'s window."""
    store = stack.store()
    since = time.time()
    started = time.monotonic()
    images = ("-p", f"images={archive}") if archive else ()
    result = stack.prefect("deployment", "run", "derm/fetch", "-p", f"csv={csv_path}", *images, "--watch",
                           timeout=timeout, check=False)
    wall = time.monotonic() - started
    facts = asyncio.run(facts_since(stack, since))
    counts = manifest_counts(store) if store.exists("manifests/fetch.csv") else {}
    done = counts.get("imported" if archive else "by_url", 0)
    return {"exit": result.returncode, "state": ",".join(facts["states"]), "wall_s": round(wall, 1),
            "ok": done, "failed": counts.get("failed"), **finish_rate(rate(sampler, facts, task), done)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated, of: " + ", ".join(LAYOUTS))
    parser.add_argument("--missing", type=int, default=3, help="rows the junk-zip layout leaves out")
    parser.add_argument("--no-rates", dest="rates", action="store_false", help="skip the import-vs-URL rates")
    parser.add_argument("--repeats", type=int, default=1, help="import/URL fetch pairs to measure")
    parser.add_argument("--latency", type=float, default=0.0, help="added latency per URL request, seconds")
    parser.add_argument("--timeout", type=float, default=1800, help="per deployment run, seconds")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    layouts = [name for name in args.layouts.split(",") if name]
    if unknown := set(layouts) - set(LAYOUTS):
        parser.error(f"unknown layout(s) {sorted(unknown)}; known: {', '.join(LAYOUTS)}")
    if not (ATLAS / "rows.csv").exists():
        print(f"bench_archive_layouts: {ATLAS} is absent (../shared not laid beside the project); skipped")
        return 0
    import pandas as pd

    from bench.bench_scale import Sampler
    from tests.integration.stack import start_stack

    rows = pd.read_csv(ATLAS / "rows.csv", dtype=str, keep_default_na=False)
    figures: dict = {"rows": len(rows), "layouts": []}
    with tempfile.TemporaryDirectory(prefix="dermflow-bench-layouts-") as temp:
        folder = Path(temp)
        stack = start_stack(folder / "stack")
        sampler = Sampler(stack.env["DERMFLOW_DATA_DIR"]).start()
        try:
            for layout in layouts:
                figures["layouts"].append(run_layout(stack, sampler, layout, rows, folder, args))
            if args.rates:
                figures["rates"] = measure_rates(stack, sampler, rows, folder, args)
        finally:
            sampler.stop()
            stack.dermflow("down", check=False, timeout=120)
    print_table(figures)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    failed = [f for f in figures["layouts"] if f["exit"] != 0]
    return 1 if failed else 0


def print_table(figures: dict) -> None:
    print("\n| layout | state | rows imported | rows failed | dead-URL requests | import rows/s | wall |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for f in figures["layouts"]:
        print(f"| {f['layout']} | {f['state']} | {f.get('imported')} | {f.get('failed')} | {f['dead_url_requests']} | "
              f"{f.get('import_images_per_s')} | {f['wall_s']} s |")
    for pair in figures.get("rates", {}).get("pairs", []):
        for side, values in pair.items():
            print(f"{side}: {values.get('images_per_s')} images/s, {values.get('images_per_cpu_s')} images per "
                  f"CPU-s ({values.get('ok')} images, window {values.get('window_s')} s)")


if __name__ == "__main__":
    sys.exit(main())
