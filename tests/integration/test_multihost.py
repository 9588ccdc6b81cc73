"""Three hosts that share nothing but the Prefect API and S3 (network namespaces on one machine,
tests/support/netns.py): `derm/full` with fetch shards on a Dask cluster, distributed tuning and
two trainings, every part on the host Prefect and Dask sent it to.

- head (10.231.N.1): SeaweedFS and the Prefect server bound to its address, the Dask
  scheduler, the orchestration worker (queue `default`; the derm flow runs, the tuning chiefs);
- w1, w2 (.2, .3): one `gpu`-queue worker with `--limit 1` each, and one Dask worker each;
- the test process (.254 on the bridge): the image server, and the checks.

Each host runs dermflow from a wheel in a venv of its own, with its own HOME and working
directory; its processes see neither the checkout nor the other hosts' folders. The CSV is a
local file on the head host only: the run stages it to the bucket.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.netns import Host, Lan, build_wheel

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[2]
ATLAS = ROOT.parent / "shared" / "data" / "atlas20"
S3_PORT, PREFECT_PORT, DASK_PORT = 8333, 4200, 8786
LABELS, PER_LABEL = 4, 16
ARCHITECTURES = ["baseline_cnn", "vgg16"]
# DERMFLOW_MULTIHOST_ONE_HOST=1: every process on the head host (the same workers, the same run),
# only to time the same run on one host; the where-did-it-run checks are then skipped.
ONE_HOST = os.environ.get("DERMFLOW_MULTIHOST_ONE_HOST") == "1"


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    reason = Lan.available()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    base = tmp_path_factory.mktemp("multihost")
    wheel = build_wheel(ROOT, base / "wheel")
    network = Lan(base)
    try:
        for name in ("head",) if ONE_HOST else ("head", "w1", "w2"):
            network.install(network.add_host(name), wheel)
        yield network
    finally:
        network.close()


def _sample(tmp_path: Path) -> tuple[Path, list[dict]]:
    """(images folder, rows) of a few labels of atlas20, or a synthetic set of the same shape."""
    if (ATLAS / "rows.csv").exists():
        images, rows_csv = ATLAS / "images", ATLAS / "rows.csv"
    else:
        from tests.support.image_servers import synthetic_atlas

        root = synthetic_atlas(tmp_path / "synthetic", n_labels=LABELS, per_label=PER_LABEL, size=64)
        images, rows_csv = root / "images", root / "rows.csv"
    with open(rows_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = sorted({row["label"] for row in rows})[:LABELS]
    per_label: Counter = Counter()
    chosen = []
    for row in rows:
        if row["label"] in labels and per_label[row["label"]] < PER_LABEL:
            per_label[row["label"]] += 1
            chosen.append(row)
    return images, chosen


@contextmanager
def _image_server(address: str, images: Path, rows: list[dict]):
    """The atlas host's URL shape (`/img?imageId=N`) on the bridge address."""
    by_id = {parse_qs(urlsplit(r["url"]).query)["imageId"][0]: r["md5hash"] for r in rows}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            image_id = (parse_qs(urlsplit(self.path).query).get("imageId") or [""])[0]
            path = images / f"{by_id.get(image_id)}.jpg"
            body, status = (path.read_bytes(), 200) if image_id in by_id and path.exists() else (b"", 404)
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _write_csv(rows: list[dict], base_url: str, out: Path) -> Path:
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            parts = urlsplit(row["url"])
            writer.writerow({**row, "url": f"{base_url}{parts.path}?{parts.query}"})
    return out


def _wait(check, what: str, timeout: float, logs: list[Path] = ()) -> None:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            if check():
                return
        except Exception as error:  # noqa: BLE001 - not up yet
            last = error
        time.sleep(1)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"{what} not ready after {timeout:.0f} s ({last})\n{tails}")


def _start_storage(head: Host, keys: dict[str, str]):
    """SeaweedFS as `dermflow up` runs it (dermflow.ops.stack), bound to the head's address."""
    from dermflow.ops.stack import SeaweedServer

    server = SeaweedServer(data_dir=head.root / "seaweed", s3_port=S3_PORT, access_key=keys["AWS_ACCESS_KEY_ID"],
                           secret_key=keys["AWS_SECRET_ACCESS_KEY"])
    server.write_security_config()
    weed = head.root / "weed"
    shutil.copy(Path(server.argv()[0]), weed)
    argv = [str(weed), *(a.replace("127.0.0.1", head.address) for a in server.argv()[1:])]
    process = head.spawn(argv, "seaweedfs", env=keys, cwd=server.security_dir)

    def client():
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=f"http://{head.address}:{S3_PORT}", region_name="us-east-1",
                            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def ready():
        s3 = client()
        s3.create_bucket(Bucket="dermflow")
        s3.put_object(Bucket="dermflow", Key="probe", Body=b"ok")
        return s3.get_object(Bucket="dermflow", Key="probe")["Body"].read() == b"ok"

    _wait(ready, "SeaweedFS on the head host", 120, [process.log_path])
    return client()


def _start_prefect(head: Host) -> str:
    api = f"http://{head.address}:{PREFECT_PORT}/api"
    process = head.spawn([head.python, "-m", "prefect", "server", "start", "--host", head.address,
                          "--port", str(PREFECT_PORT)], "prefect-server",
                         env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"})
    import httpx

    _wait(lambda: httpx.get(f"{api}/health", timeout=5, trust_env=False).status_code == 200,
          "the Prefect server on the head host", 240, [process.log_path])
    return api


def _configure_and_deploy(head: Host, api: str, env: dict[str, str]) -> None:
    """The pool, its queues and a 2-slot `gpu` limit (as `dermflow up` makes them), then the
    deployments registered from the head host's installed flows."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dermflow.ops.lifecycle import configure_prefect
    from dermflow.settings import load_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        configure_prefect(load_settings(gpu_slots=2, work_pool="dermflow"))
    shutil.copy(ROOT / "deployments" / "prefect.yaml", head.work / "prefect.yaml")
    result = head.run([head.python, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                       str(head.work / "prefect.yaml")], env=env, cwd=head.site_packages, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def cluster(lan):
    head, w1, w2 = (lan.hosts * 3)[:3]
    keys = {"AWS_ACCESS_KEY_ID": "mh-" + secrets.token_hex(4), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    s3 = _start_storage(head, keys)
    api = _start_prefect(head)
    scheduler = f"tcp://{head.address}:{DASK_PORT}"
    # What every host is told: the API, the bucket, and which image host it may fetch from.
    env = {**keys, "PREFECT_API_URL": api, "AWS_ENDPOINT_URL": f"http://{head.address}:{S3_PORT}",
           "AWS_DEFAULT_REGION": "us-east-1", "DERMFLOW_BUCKET": "dermflow",
           "DERMFLOW_ALLOWED_HOSTS": lan.address, "DERMFLOW_TUNING_ORACLE_HOST": head.address,
           "PREFECT_WORKER_QUERY_SECONDS": "3", "CUDA_VISIBLE_DEVICES": ""}
    _configure_and_deploy(head, api, env)
    head.spawn([head.python, "-m", "distributed.cli.dask_scheduler", "--host", head.address, "--port",
                str(DASK_PORT), "--no-dashboard"], "dask-scheduler", env=env)
    head.spawn([head.python, "-m", "prefect", "worker", "start", "--pool", "dermflow", "--work-queue", "default",
                "--name", "head-orchestrator", "--type", "process"], "worker-default", env=env)
    for name, host in (("w1", w1), ("w2", w2)):
        host.spawn([host.python, "-m", "prefect", "worker", "start", "--pool", "dermflow", "--work-queue", "gpu",
                    "--limit", "1", "--name", f"{name}-gpu", "--type", "process"], f"worker-gpu-{name}", env=env)
        host.spawn([host.python, "-m", "distributed.cli.dask_worker", scheduler, "--host", host.address,
                    "--name", name, "--nthreads", "2", "--no-dashboard"], f"dask-worker-{name}", env=env)
    from distributed import Client

    dask = Client(scheduler, timeout=60)
    logs = [p.log_path for h in lan.hosts for p in h.processes]
    _wait(lambda: len(dask.scheduler_info()["workers"]) == 2, "two Dask workers", 180, logs)
    _wait(lambda: len(_online_workers(api)) == 3, "three Prefect workers", 180, logs)
    yield {"api": api, "s3": s3, "dask": dask, "env": env, "scheduler": scheduler}
    dask.close()


def _online_workers(api: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return {w.name for w in client.read_workers_for_work_pool("dermflow") if w.status.value == "ONLINE"}


def _run_derm(lan: Lan, cluster: dict, tmp_path: Path):
    """derm/full on the sample, from the API (as a user would); (flow run, seconds, task stream)."""
    from distributed import get_task_stream
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    head = lan.hosts[0]
    images, rows = _sample(tmp_path)
    with _image_server(lan.address, images, rows) as base_url:
        csv_path = _write_csv(rows, base_url, head.work / "rows.csv")  # a file on the head host only
        parameters = {"csv": str(csv_path), "image_size": 32, "epochs": 1, "batch_size": 16,
                      "architectures": ARCHITECTURES, "weights": "none", "tune": True, "tune_workers": 2,
                      "max_trials": 2, "task_runner": "dask", "dask_address": cluster["scheduler"],
                      "shard_size": 8, "drop_small_labels": True, "seed": 3}
        started = time.monotonic()
        with temporary_settings(updates={PREFECT_API_URL: cluster["api"]}), \
                get_task_stream(client=cluster["dask"]) as stream:
            run = run_deployment("derm/full", parameters=parameters, timeout=2400)
        seconds = time.monotonic() - started
    return run, seconds, stream.data


def _runs_and_workers(api: str) -> list[dict]:
    """Every flow run on the (fresh) server: flow, name, id, state, times, and the worker that
    ran it as Prefect recorded it (its "Worker '<name>' submitting flow run" log line)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    found = []
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flows = {flow.id: flow.name for flow in client.read_flows()}
        for run in client.read_flow_runs():
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            messages = [log.message for log in logs]
            worker = next((m.group(1) for text in messages
                           if (m := re.search(r"Worker '([^']+)' submitting flow run", text))), None)
            found.append({"flow": flows[run.flow_id], "name": run.name, "id": str(run.id),
                          "state": run.state.name if run.state else None, "worker": worker,
                          "start": run.start_time, "end": run.end_time, "logs": messages})
    return found


def _host_of_worker(worker: str | None) -> str | None:
    return worker.split("-")[0] if worker else None


def test_derm_full_runs_across_three_hosts(lan, cluster, tmp_path):
    head, w1, w2 = (lan.hosts * 3)[:3]
    run, seconds, stream = _run_derm(lan, cluster, tmp_path)
    runs = _runs_and_workers(cluster["api"])
    summary = [{k: r[k] for k in ("flow", "name", "id", "state", "worker")} for r in runs]
    print(json.dumps({"hosts": {h.name: h.address for h in lan.hosts}, "wall_seconds": round(seconds, 1),
                      "flow_runs": summary}, indent=2))
    assert run.state.is_completed(), (run.state, summary, _tails(lan))
    if ONE_HOST:
        return  # the timing baseline: everything ran on the head host
    # the derm run itself on the head host, through the orchestration worker
    derm = next(r for r in runs if r["id"] == str(run.id))
    assert derm["worker"] == "head-orchestrator"

    # fetch shards: Prefect task runs on the Dask cluster, executed by both worker hosts' Dask workers
    ran_on = Counter(urlsplit(t["worker"]).hostname for t in stream)
    assert set(ran_on) == {w1.address, w2.address}, ran_on

    # each architecture trained by a different host's gpu worker, at the same time
    trainings = [r for r in runs if r["flow"] == "derm-train"]
    assert sorted(r["state"] for r in trainings) == ["Completed", "Completed"], summary
    assert {_host_of_worker(r["worker"]) for r in trainings} == {"w1", "w2"}, summary
    first, second = sorted(trainings, key=lambda r: r["start"])
    assert second["start"] < first["end"], "the two trainings did not overlap"

    # distributed tuning: chiefs on the head host's address, workers on both worker hosts
    searches = [r for r in runs if r["flow"] == "derm-tune-search"]
    assert len(searches) == len(ARCHITECTURES)
    for search in searches:
        assert any(f"serving on {head.address}:" in m for m in search["logs"]), search["logs"]
    tuners = [r for r in runs if r["flow"] == "derm-tune"]
    assert len(tuners) == 2 * len(ARCHITECTURES) and all(r["state"] == "Completed" for r in tuners), summary
    assert {_host_of_worker(r["worker"]) for r in tuners} == {"w1", "w2"}, summary
    trials = sum(int(m.group(1)) for r in tuners for text in r["logs"] if (m := re.search(r"ran (\d+) trial", text)))
    assert trials >= len(ARCHITECTURES), "no tuning worker ran a trial it got from a chief on another host"

    # the report and both models in the bucket; the head-local CSV was staged there
    keys = [o["Key"] for page in cluster["s3"].get_paginator("list_objects_v2").paginate(Bucket="dermflow")
            for o in page.get("Contents", [])]
    reports = [k for k in keys if k.startswith("runs/") and k.endswith("/report.html")]
    assert len(reports) == 1, keys
    run_prefix = reports[0].rsplit("/", 1)[0]
    for architecture in ARCHITECTURES:
        assert f"{run_prefix}/models/{architecture}/model.keras" in keys
    assert any(k.startswith("private/inputs/") and k.endswith("/rows.csv") for k in keys)


def _tails(lan: Lan) -> str:
    return "\n".join(f"--- {h.name} {p.log_path.name}\n{p.log_path.read_text(errors='replace')[-2500:]}"
                     for h in lan.hosts for p in h.processes)
