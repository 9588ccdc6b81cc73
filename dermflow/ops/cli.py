"""`dermflow` command line: the stack (up, down, status), prediction, evaluation, reports.

This is the one module of `dermflow/` that may import Prefect: it wires the embedded stack
(SeaweedFS, Prefect server, work pool, workers, the `gpu` concurrency limit, deployments).
Exit codes: 0 success, 1 a command failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dermflow.errors import DermflowError
from dermflow.settings import PROJECT_ROOT, Settings, env_file_path, get_settings, load_settings

NOT_FOR_CLINICAL_USE = (
    "Research tool only: not a medical device and not for clinical use or diagnosis."
)
TRAINING_QUEUE = "gpu"
ORCHESTRATION_QUEUE = "default"
GPU_LIMIT = "gpu"
PROFILE = "dermflow"


class CommandError(DermflowError, RuntimeError):
    """A command failed with a message for the user (exit code 1)."""


# --- the stack -------------------------------------------------------------------------------

def _stack_env(settings: Settings) -> dict[str, str]:
    """Environment for workers and `prefect deploy`: this shell's, plus where the API and the
    project are, and the API's auth. `.env` is not copied in: every flow run reads it afresh
    (Settings), so an edit to `.env` counts from the next run on, without restarting the workers."""
    env = {**os.environ, "DERMFLOW_PROJECT_ROOT": str(PROJECT_ROOT), "PREFECT_API_URL": settings.prefect_api_url}
    if _auth_string(settings):
        env["PREFECT_API_AUTH_STRING"] = _auth_string(settings)
    return env


def _auth_string(settings: Settings) -> str | None:
    """The Prefect API's basic auth "user:password" (PREFECT_API_AUTH_STRING), if any."""
    secret = settings.prefect_api_auth_string
    return secret.get_secret_value() if secret else None


def _embedded_s3(settings: Settings) -> bool:
    from dermflow.ops.stack import is_local_url, url_port

    endpoint = settings.aws_endpoint_url or ""
    return bool(endpoint) and is_local_url(endpoint) and url_port(endpoint, 80) == settings.s3_port


def _seaweed(settings: Settings):
    from dermflow.ops.stack import SeaweedServer

    if not settings.aws_access_key_id or not settings.aws_secret_access_key:
        raise CommandError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set (make up writes them to .env)")
    return SeaweedServer(
        data_dir=settings.data_dir,
        s3_port=settings.s3_port,
        access_key=settings.aws_access_key_id,
        secret_key=settings.aws_secret_access_key.get_secret_value(),
        buckets=[settings.bucket],
    )


def _prefect_server(settings: Settings):
    from dermflow.ops.stack import PrefectServer, is_local_url, url_port

    if not is_local_url(settings.prefect_api_url):
        return None
    return PrefectServer(settings.data_dir, url_port(settings.prefect_api_url, settings.prefect_port),
                         auth_string=_auth_string(settings))


def gpu_slots(settings: Settings) -> int:
    from dermflow.ops.stack import detected_gpus

    return settings.gpu_slots or max(detected_gpus(), 1)


def _workers(settings: Settings) -> list:
    """One orchestration worker, and one training worker per GPU slot, each with `--limit 1`
    and, where GPUs exist, its own `CUDA_VISIBLE_DEVICES`: Prefect hands each training run to a
    free worker, so each run sees exactly one GPU."""
    from dermflow.ops.stack import Worker, detected_gpus

    state = settings.data_dir / "run"
    workers = [Worker("orchestrator", settings.work_pool, [ORCHESTRATION_QUEUE], state)]
    gpus = detected_gpus()
    for slot in range(gpu_slots(settings)):
        env = {"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus else {"CUDA_VISIBLE_DEVICES": ""}
        workers.append(Worker(f"trainer-{slot}", settings.work_pool, [TRAINING_QUEUE], state, 1, env))
    return workers


def configure_prefect(settings: Settings) -> None:
    """Work pool, its queues and the `gpu` global concurrency limit (created or resized)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
    )
    from prefect.exceptions import ObjectNotFound

    slots = gpu_slots(settings)
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(settings.work_pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=settings.work_pool, type="process"))
        for queue in (ORCHESTRATION_QUEUE, TRAINING_QUEUE):
            try:
                client.read_work_queue_by_name(queue, work_pool_name=settings.work_pool)
            except ObjectNotFound:
                client.create_work_queue(name=queue, work_pool_name=settings.work_pool)
        try:
            existing = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            if existing.limit != slots:
                client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


def _paused_deployments(names: list[str]) -> dict[str, bool]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    paused = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                paused[name] = bool(client.read_deployment_by_name(name).paused)
            except ObjectNotFound:
                pass
    return paused


def register_deployments(settings: Settings, env: dict[str, str], prefect_file: Path | None = None) -> None:
    """`prefect deploy --all` from `deployments/prefect.yaml`; a deployment paused in the UI
    (the weekly retrain, say) stays paused."""
    from prefect.client.orchestration import get_client

    prefect_file = prefect_file or PROJECT_ROOT / "deployments" / "prefect.yaml"
    scheduled = ["derm/retrain"]
    was_paused = _paused_deployments(scheduled)
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise CommandError(f"registering deployments failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with get_client(sync_client=True) as client:
        for name, paused in was_paused.items():
            if paused:
                client.pause_deployment(client.read_deployment_by_name(name).id)


ALERT_BLOCK = "dermflow-alerts"
ALERT_AUTOMATION = "derm-retrain-failed"


def configure_alerts(settings: Settings) -> bool:
    """A Prefect automation: when a `derm/retrain` run fails, crashes or times out, POST a
    notification (JSON `{"subject", "body"}`) to `DERMFLOW_ALERT_WEBHOOK`. Without the setting,
    a failed retrain shows only in the UI (runs, events)."""
    from prefect.automations import Automation, EventTrigger, SendNotification
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(ALERT_AUTOMATION):
            client.delete_automation(existing.id)
        if not settings.alert_webhook:
            return False
        deployment = client.read_deployment_by_name("derm/retrain")
    # The URL (it may carry a token) lives only in the block's secret field; `url` names it.
    block = CustomWebhookNotificationBlock(
        name=ALERT_BLOCK, url="{{webhook_url}}",
        secrets={"webhook_url": settings.alert_webhook.get_secret_value()},
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    block_id = block.save(ALERT_BLOCK, overwrite=True)
    Automation(
        name=ALERT_AUTOMATION,
        description="Notify when the scheduled retraining fails",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"},
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment.id}"},
            posture="Reactive",
            threshold=1,
            within=0,
        ),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="dermflow: derm/retrain failed",
            body="Flow run {{ flow_run.name }} of derm/retrain ended {{ flow_run.state.name }}: "
                 "{{ flow_run.state.message }}",
        )],
    ).create()
    return True


def set_prefect_profile(api_url: str, auth_string: str | None) -> None:
    """A `dermflow` Prefect profile, made active, so `prefect deployment run` in any new shell
    reaches this server (with its auth) rather than a throwaway ephemeral one. The profiles
    file then holds the auth string, so it is made owner-only, like `.env`."""
    from prefect.settings import PREFECT_PROFILES_PATH

    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run(prefect + ["profile", "create", PROFILE], capture_output=True, text=True)
    values = [f"PREFECT_API_URL={api_url}"] + ([f"PREFECT_API_AUTH_STRING={auth_string}"] if auth_string else [])
    subprocess.run(prefect + ["--profile", PROFILE, "config", "set", *values],
                   capture_output=True, text=True, check=True)
    subprocess.run(prefect + ["profile", "use", PROFILE], capture_output=True, text=True, check=True)
    profiles = Path(PREFECT_PROFILES_PATH.value())
    if profiles.exists():
        profiles.chmod(0o600)


def _settings_with_env_file():
    """Write the keys `.env` lacks (embedded stack, fresh keys), then the settings it gives."""
    from dermflow.ops.envfile import default_env_values, ensure_env_file

    base = load_settings()
    added = ensure_env_file(env_file_path(), default_env_values(base.s3_port, base.prefect_port))
    if added:
        print(f"wrote {', '.join(added)} to {env_file_path()}")
    get_settings.cache_clear()
    return load_settings()


def _start_storage(settings: Settings) -> None:
    """The embedded SeaweedFS (unless S3 is elsewhere), and the bucket."""
    from dermflow.storage import ObjectStore

    if _embedded_s3(settings):
        print(f"SeaweedFS S3        {settings.aws_endpoint_url}  (data in {settings.data_dir / 'seaweedfs'})")
        _seaweed(settings).start()
    else:
        print(f"S3 endpoint         {settings.aws_endpoint_url or 'AWS default'} (not embedded)")
    ObjectStore.from_settings(settings).ensure_bucket()
    print(f"bucket              s3://{settings.bucket}")


def _start_orchestration(settings: Settings) -> None:
    """The Prefect server (when local), the profile, the work pool and limit, the workers."""
    server = _prefect_server(settings)
    if server is not None:
        server.start()
    print(f"Prefect API / UI    {settings.prefect_api_url}  /  {settings.prefect_api_url.removesuffix('/api')}"
          + ("  (log in with PREFECT_API_AUTH_STRING of .env)" if _auth_string(settings) else ""))
    set_prefect_profile(settings.prefect_api_url, _auth_string(settings))
    configure_prefect(settings)
    print(f"work pool           {settings.work_pool} (process); gpu limit: {gpu_slots(settings)} slot(s)")
    for worker in _workers(settings):
        started = worker.start(settings.prefect_api_url, PROJECT_ROOT, _auth_string(settings))
        print(f"worker              {worker.name} ({'started' if started else 'running'})")


def cmd_up(args) -> int:
    settings = _settings_with_env_file()
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url  # this process's Prefect client
    if _auth_string(settings):
        os.environ["PREFECT_API_AUTH_STRING"] = _auth_string(settings)
    _start_storage(settings)
    _start_orchestration(settings)
    if not args.no_deploy:
        register_deployments(settings, _stack_env(settings))
        print("deployments         derm/full derm/fetch derm/refetch derm/retrain derm-train/default "
              "derm-tune/worker")
        if configure_alerts(settings):
            print("alerts              failed derm/retrain runs are posted to DERMFLOW_ALERT_WEBHOOK "
                  f"(kept in the secret block {ALERT_BLOCK})")
    return 0


def cmd_down(args) -> int:
    settings = load_settings()
    for worker in _workers(settings):
        if worker.stop():
            print(f"stopped worker {worker.name}")
    # Workers started with more slots than today's setting are stopped too.
    for pid_file in sorted((settings.data_dir / "run").glob("worker-*.pid")):
        from dermflow.ops.stack import ManagedProcess

        if ManagedProcess(pid_file.stem, pid_file.parent).stop():
            print(f"stopped {pid_file.stem}")
    server = _prefect_server(settings)
    if server is not None and server.stop():
        print("stopped Prefect server")
    if _embedded_s3(settings) and settings.aws_access_key_id and _seaweed(settings).stop():
        print("stopped SeaweedFS")
    return 0


def cmd_status(args) -> int:
    settings = load_settings()
    rows = []
    if _embedded_s3(settings):
        seaweed = _seaweed(settings)
        rows.append(("SeaweedFS", settings.aws_endpoint_url, seaweed.process.pid(), seaweed.healthy()))
    server = _prefect_server(settings)
    if server is not None:
        rows.append(("Prefect server", settings.prefect_api_url, server.process.pid(), server.healthy()))
    for worker in _workers(settings):
        pid = worker.process.pid()
        rows.append((f"worker {worker.name}", ",".join(worker.queues), pid, pid is not None))
    ok = all(row[3] for row in rows)
    if args.json:
        print(json.dumps([dict(zip(("service", "address", "pid", "healthy"), row)) for row in rows], indent=2))
    else:
        for name, address, pid, healthy in rows:
            print(f"{name:22} {'up' if healthy else 'DOWN':5} pid={pid or '-':<8} {address}")
    return 0 if ok else 1


# --- models ----------------------------------------------------------------------------------

def _model_bundle(args):
    """The model `--model`/`--arch` name (default: the champion), cached locally once."""
    from dermflow.evaluation.predict import load_model_bundle
    from dermflow.runs import check_run_reference
    from dermflow.storage import ObjectStore

    run = check_run_reference(args.model) if args.model is not None else None
    settings = get_settings()
    return load_model_bundle(ObjectStore.from_settings(settings), run, args.arch,
                             settings.local_cache_dir / "models")


def cmd_predict(args) -> int:
    """Exit 1 when any source could not be predicted (each one's error is printed; the others
    are still predicted)."""
    from dermflow.evaluation.predict import predict_images

    bundle = _model_bundle(args)
    results = predict_images(bundle, args.sources, top_k=args.top_k)
    if args.explain:
        from dermflow.evaluation.predict import explain_image

        explain_image(bundle, args.sources[0], Path(args.explain))
    failed = [result for result in results if result["error"]]
    if args.json:
        print(json.dumps({"model": bundle.describe(), "predictions": results,
                          "note": NOT_FOR_CLINICAL_USE}, indent=2))
    else:
        print(f"model: {bundle.describe()}")
        for result in results:
            print(result["source"])
            if result["error"]:
                print(f"  error: {result['error']}")
            for rank, item in enumerate(result["top"], start=1):
                print(f"  {rank}. {item['label']:<45} {item['probability']:.3f}")
        if args.explain:
            print(f"saliency map written to {args.explain}")
        print(NOT_FOR_CLINICAL_USE)
    if failed:
        print(f"dermflow predict: {len(failed)} of {len(results)} source(s) failed", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from dermflow.evaluation.predict import evaluate_dataset

    bundle = _model_bundle(args)
    with tqdm(desc="evaluating", unit="img", disable=args.json or not sys.stderr.isatty()) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = evaluate_dataset(bundle, Path(args.csv), Path(args.images), progress=progress, tta=args.tta)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
        return 0
    print(f"model: {bundle.describe()}")
    print(f"images scored {result['n']}  " + "  ".join(f"{k}={v}" for k, v in result.get("skipped", {}).items()))
    for md5hash, why in result.get("unreadable_errors", {}).items():
        print(f"  unreadable {md5hash}: {why}")
    for key in ("accuracy", "weighted_f1", "macro_f1", "top3_accuracy", "top5_accuracy"):
        if key in result:
            print(f"{key:15} {result[key]:.4f}")
    for name, values in result.get("per_range", {}).items():
        print(f"  range {name:8} n={values['n']:<5} accuracy={values['accuracy']:.4f} weighted_f1={values['weighted_f1']:.4f}")
    print(NOT_FOR_CLINICAL_USE)
    return 0


def _print_run_metrics(metrics: dict) -> None:
    """One line per architecture of a run's metrics.json: its test scores, or why it failed."""
    for arch, entry in metrics.get("architectures", {}).items():
        test = entry.get("test") or {}
        if entry.get("status") == "ok":
            print(f"  {arch:20} accuracy={test.get('accuracy', float('nan')):.4f} "
                  f"weighted_f1={test.get('weighted_f1', float('nan')):.4f}")
        else:
            print(f"  {arch:20} FAILED: {entry.get('error')}")


def cmd_report(args) -> int:
    from dermflow.layout import report_key, run_metrics_key
    from dermflow.registry.runs import list_runs, resolve_run_id
    from dermflow.runs import check_run_reference
    from dermflow.storage import ObjectStore, StorageError

    run = check_run_reference(args.run_id)  # before it reaches the store: `../x` is no run
    store = ObjectStore.from_settings(get_settings())
    run_id = resolve_run_id(store, run)
    key = report_key(run_id)
    try:
        if args.output:
            store.download_file(key, Path(args.output))
            print(f"report written to {args.output}")
        metrics = store.get_json(run_metrics_key(run_id))
    except StorageError as error:
        runs = [run for run in list_runs(store) if store.exists(report_key(run))]
        raise CommandError(f"{error}; runs with a report: {', '.join(runs[-10:]) or 'none'}") from error
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"report: {store.uri(key)}")
    url = store.presign(key)
    if url:
        print(f"open:   {url}")
    _print_run_metrics(metrics)
    return 0


def cmd_mirror(args) -> int:
    from dermflow.ops.mirror import run_mirror

    run_mirror(args.atlas_dir, args.port, args.csv_out, limit_per_label=args.limit_per_label)
    return 0


def cmd_import(args) -> int:
    """Import the CSV's images from an archive, folder or S3 prefix into the bucket, then write
    the fetch manifest (rows the source lacks stay `not_fetched` until a derm run fetches them)."""
    from dermflow import layout
    from dermflow.ingestion import importer, ingest
    from dermflow.ingestion.manifest import reconcile_manifest, summarize_manifest
    from dermflow.runs import make_run_id
    from dermflow.storage import ObjectStore

    store = ObjectStore.from_settings(get_settings(), max_pool_connections=64)
    store.ensure_bucket()
    dataset = ingest.load_dataset(args.csv, store=store)
    dataset_key = layout.dataset_key(ingest.dataset_fingerprint(dataset))
    store.put_dataframe_csv(dataset_key, dataset)

    def progress(done: int, total: int) -> None:
        print(f"\rimported {done} / {total}", end="", file=sys.stderr, flush=True)

    results, plan = importer.import_dataset(store, dataset, args.images, shard_size=args.shard_size,
                                            progress=progress)
    print(file=sys.stderr)
    previous = store.get_dataframe_csv(layout.FETCH_MANIFEST_KEY) if store.exists(layout.FETCH_MANIFEST_KEY) else None
    manifest = reconcile_manifest(dataset, store, previous, results)
    run_id = make_run_id("import")
    history_key = layout.fetch_manifest_history_key(run_id)
    store.put_dataframe_csv(history_key, manifest)
    store.put_dataframe_csv(layout.FETCH_MANIFEST_KEY, manifest)
    store.put_json(layout.FETCH_STATE_KEY, {"dataset_key": dataset_key, "manifest_key": history_key, "run_id": run_id})
    summary = {**summarize_manifest(manifest), "import": plan, "manifest": store.uri(history_key)}
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start SeaweedFS, the Prefect server, workers; register deployments")
    up.add_argument("--no-deploy", action="store_true", help="do not (re)register the deployments")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything `up` started").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="show the stack's services (exit 1 if one is down)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    model_help = "a run id (20261126-101500-brave-otter) or the flow run's name; default: the champion"
    predict = sub.add_parser("predict", help="top-5 conditions for images (paths or URLs)")
    predict.add_argument("sources", nargs="+", metavar="IMAGE_OR_URL")
    predict.add_argument("--model", help=model_help)
    predict.add_argument("--arch", help="architecture of that run (default: the run's best)")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--explain", metavar="OUT.png", help="write the first image with its Grad-CAM heatmap")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a model on a labelled set you bring")
    evaluate.add_argument("--csv", required=True, help="rows in the Fitzpatrick 17k schema")
    evaluate.add_argument("--images", required=True, help="directory of <md5hash>.<ext> images")
    evaluate.add_argument("--model", help=model_help)
    evaluate.add_argument("--arch", help="architecture of that run (default: the run's best)")
    evaluate.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    report = sub.add_parser("report", help="where a run's report is, and its headline metrics")
    report.add_argument("run_id", help="a run id or the flow run's name")
    report.add_argument("--output", "-o", help="download report.html here")
    report.add_argument("--json", action="store_true", help="print metrics.json")
    report.set_defaults(func=cmd_report)

    importer = sub.add_parser("import", help="import the dataset's images from an archive, folder or S3 prefix")
    importer.add_argument("--csv", required=True, help="the dataset CSV (path, https URL or s3:// URI)")
    importer.add_argument("--images", required=True,
                          help="a .zip/.tar/.tar.gz/.tgz (path, s3:// or https:// URI), a folder, or s3://bucket/prefix/")
    importer.add_argument("--shard-size", type=int, default=256, help="members read per batch")
    importer.set_defaults(func=cmd_import)

    mirror = sub.add_parser("mirror", help="serve a folder of dataset images locally, for runs without internet")
    mirror.add_argument("atlas_dir", type=Path, help="a folder with images/<md5hash>.jpg and rows.csv")
    mirror.add_argument("--port", type=int, default=8765)
    mirror.add_argument("--csv-out", type=Path, help="write a copy of rows.csv whose URLs point at the mirror")
    mirror.add_argument("--limit-per-label", type=int, help="only this many rows per label in --csv-out")
    mirror.set_defaults(func=cmd_mirror)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # dermflow's own errors, and a file the user named that is not there: one clear line, exit 1;
    # anything else is a bug and keeps its traceback
    except (DermflowError, FileNotFoundError) as error:
        print(f"dermflow {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
