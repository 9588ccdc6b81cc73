"""Scale benchmark: derm/full on the whole real CSV (and N times it) from an archive of
generated images, through the real stack.

For every row of `../shared/data/fitzpatrick17k.csv` (repeated `--scale` times), a distinct
noise JPEG is generated and the row's md5hash is rewritten to the md5 of those bytes (labels,
skin types and qc kept; URLs emptied: every image must come from the archive). The images go
into one zip, in nested folders. Then a stack is started in a temp dir (`dermflow up`:
SeaweedFS, Prefect server, workers, deployments) and

    prefect deployment run derm/full -p csv=... -p images=ARCHIVE -p architectures=["baseline_cnn"]
        -p weights=none -p image_size=32 -p epochs=1 --watch

runs while every process of the stack (those with its DERMFLOW_DATA_DIR in their
environment) is sampled every 0.5 s. Printed (and written
to `--out`): wall time, import rows/s (first import-shard start to last import-shard end, from
the Prefect API), import images per CPU-second (the flow-run process's CPU over that window,
plus SeaweedFS's), peak RSS of the flow-run process and of the whole stack, flow-run and
task-run counts, and the split sizes.

Usage: .venv/bin/python bench/bench_scale.py [--scale 1] [--size 64] [--import-only]
Skips with a message when the real CSV is absent.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FULL_CSV = PROJECT_ROOT.parent / "shared" / "data" / "fitzpatrick17k.csv"
sys.path.insert(0, str(PROJECT_ROOT))


def build_archive(csv_path: Path, scale: int, size: int, folder: Path) -> tuple[Path, Path, int]:
    """(the rewritten CSV, the zip, rows): one distinct noise JPEG per row and repeat."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rows = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(0)
    out_rows = []
    archive = folder / "fitzpatrick17k-images.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as handle:
        for repeat in range(scale):
            for row in rows.to_dict("records"):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
                body = buffer.getvalue()
                md5 = hashlib.md5(body).hexdigest()
                handle.writestr(f"images/{md5[:2]}/{md5}.jpg", body)
                out_rows.append({**row, "md5hash": md5, "url": "", "url_alphanum": ""})
        handle.writestr("README.txt", b"generated noise images for bench_scale")
    csv_out = folder / "rows.csv"
    pd.DataFrame(out_rows).to_csv(csv_out, index=False)
    return csv_out, archive, len(out_rows)


class Sampler:
    """Samples RSS and CPU of every process every `interval` s: peak RSS per process, and
    (time, cpu seconds) of each process for windowed CPU totals."""

    def __init__(self, data_dir: Path, interval: float = 0.5) -> None:
        import psutil

        self.data_dir = str(data_dir)
        self.ours: dict[int, bool] = {}  # pid -> started by this stack (DERMFLOW_DATA_DIR in its env)
        self.psutil = psutil
        self.interval = interval
        self.peak: dict[int, tuple[int, str]] = {}
        self.cpu: dict[int, list[tuple[float, float]]] = {}
        self.peak_total = 0
        self.flow_run_of: dict[int, str] = {}  # pid -> the Prefect flow run it executes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            now = time.time()
            for process in self.psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(process.info["cmdline"] or [])
                    if process.pid not in self.ours:
                        env = process.environ()
                        self.ours[process.pid] = env.get("DERMFLOW_DATA_DIR") == self.data_dir
                        self.flow_run_of[process.pid] = env.get("PREFECT__FLOW_RUN_ID", "")
                    if not self.ours[process.pid]:
                        continue
                    rss = process.memory_info().rss
                    times = process.cpu_times()
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                total += rss
                if rss > self.peak.get(process.pid, (0, ""))[0]:
                    self.peak[process.pid] = (rss, cmd[:160])
                self.cpu.setdefault(process.pid, []).append((now, times.user + times.system))
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_between(self, pid: int, start: float, end: float) -> float:
        samples = self.cpu.get(pid, [])
        before = [cpu for t, cpu in samples if t <= start] or [0.0]
        after = [cpu for t, cpu in samples if t <= end] or [0.0]
        return after[-1] - before[-1]


async def run_facts(api_url: str) -> dict:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        flow_runs = await client.read_flow_runs()
        task_runs = []
        while True:  # the API pages at 200
            page = await client.read_task_runs(limit=200, offset=len(task_runs))
            task_runs.extend(page)
            if len(page) < 200:
                break
        names = {run.id: (await client.read_flow(run.flow_id)).name for run in flow_runs if run.start_time}
    imports = [t for t in task_runs if t.name.startswith("import-shard") and t.start_time and t.end_time]
    window = (min(t.start_time for t in imports).timestamp(), max(t.end_time for t in imports).timestamp()) if imports else None
    started = [run for run in flow_runs if run.start_time]  # not the scheduler's upcoming derm/retrain runs
    return {"flow_runs": len(started), "task_runs": len(task_runs), "import_shards": len(imports),
            "import_window": window, "derm_run_ids": [str(i) for i, name in names.items() if name == "derm"]}


def flow_run_pid(sampler: Sampler, derm_run_ids: list[str]) -> int | None:
    """The derm flow run's process (the process worker sets PREFECT__FLOW_RUN_ID in its env)."""
    candidates = [(sampler.peak[pid][0], pid) for pid, run in sampler.flow_run_of.items() if run in derm_run_ids]
    return max(candidates)[1] if candidates else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="repeat the CSV this many times (new md5s, same labels)")
    parser.add_argument("--size", type=int, default=64, help="generated image side, pixels")
    parser.add_argument("--image-size", type=int, default=32, help="training input size")
    parser.add_argument("--mode", default="full", choices=["full", "fetch"], help="fetch: the import only")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--timeout", type=float, default=4 * 3600,
                        help="stop watching the run after this many seconds (figures so far are still printed)")
    args = parser.parse_args(argv)
    if not FULL_CSV.exists():
        print(f"bench_scale: {FULL_CSV} is absent (../shared not laid beside the project); skipped")
        return 0
    from tests.integration.stack import start_stack

    with tempfile.TemporaryDirectory(prefix="dermflow-bench-scale-") as temp:
        folder = Path(temp)
        started = time.monotonic()
        csv_path, archive, rows = build_archive(FULL_CSV, args.scale, args.size, folder)
        print(f"archive: {rows} rows, {archive.stat().st_size / 2**20:.0f} MiB, built in {time.monotonic() - started:.0f}s",
              flush=True)
        stack = start_stack(folder / "stack", extra_env={"DERMFLOW_ALLOWED_HOSTS": ""})
        try:
            sampler = Sampler(stack.env["DERMFLOW_DATA_DIR"]).start()
            started = time.monotonic()
            try:
                result = stack.prefect(
                    "deployment", "run", f"derm/{args.mode}", "-p", f"csv={csv_path}", "-p", f"images={archive}",
                    "-p", 'architectures=["baseline_cnn"]', "-p", "weights=none", "-p", f"image_size={args.image_size}",
                    "-p", "epochs=1", "--watch", timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                result = subprocess.CompletedProcess([], returncode=124, stdout="", stderr="timed out")
            wall = time.monotonic() - started
            sampler.stop()
            print(f"derm/{args.mode}: exit {result.returncode} after {wall:.0f}s", flush=True)
            if result.returncode:
                print(result.stdout[-5000:], result.stderr[-3000:], flush=True)
            facts = asyncio.run(run_facts(stack.env["PREFECT_API_URL"]))
            figures = summarize(args, rows, wall, result.returncode, sampler, facts, stack)
        finally:
            stack.dermflow("down", check=False, timeout=120)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0 if result.returncode == 0 else 1


def summarize(args, rows: int, wall: float, returncode: int, sampler: Sampler, facts: dict, stack) -> dict:
    pid = flow_run_pid(sampler, facts["derm_run_ids"])
    weed = [p for p, (_, cmd) in sampler.peak.items() if "weed" in cmd]
    figures = {"scale": args.scale, "rows": rows, "returncode": returncode, "wall_s": round(wall, 1),
               "flow_runs": facts["flow_runs"], "task_runs": facts["task_runs"],
               "import_shards": facts["import_shards"],
               "peak_rss_flow_run_gb": round(sampler.peak[pid][0] / 2**30, 2) if pid else None,
               "peak_rss_stack_gb": round(sampler.peak_total / 2**30, 2)}
    if facts["import_window"]:
        start, end = facts["import_window"]
        seconds = end - start
        cpu = sampler.cpu_between(pid, start, end) if pid else float("nan")
        cpu_weed = sum(sampler.cpu_between(p, start, end) for p in weed)
        figures.update({"import_s": round(seconds, 1), "import_rows_per_s": round(rows / seconds, 1),
                        "import_cpu_s_flow_run": round(cpu, 1), "import_cpu_s_seaweedfs": round(cpu_weed, 1),
                        "import_images_per_cpu_s": round(rows / max(cpu + cpu_weed, 1e-9), 1)})
    store = stack.store()
    splits = [k for k in store.iter_keys("manifests/") if k.startswith("manifests/split-") and k.endswith(".json")]
    if splits:
        summary = store.get_json(splits[0])
        figures["split_sizes"] = summary.get("sizes")
        figures["labels"] = len(summary.get("per_label", {}))
    manifest_summary = {}
    if store.exists("manifests/fetch.csv"):
        manifest = store.get_dataframe_csv("manifests/fetch.csv")
        manifest_summary = manifest["source"].value_counts().to_dict() if "source" in manifest else {}
    figures["by_source"] = manifest_summary
    return figures


if __name__ == "__main__":
    sys.exit(main())
