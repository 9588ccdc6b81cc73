"""The local stack's lifecycle behind `dermflow up`, `down` and `status`: SeaweedFS, the Prefect
server, the work pool and its workers, the `gpu` concurrency limit, the deployments, the
alert automations (`dermflow.ops.alerts`), the supervisor (`dermflow.ops.supervisor`) and the
Prefect profile. With `dermflow.ops.cli` (which parses the command line), the only place in
`dermflow/` that imports Prefect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dermflow.errors import DermflowError
from dermflow.settings import PROJECT_ROOT, Settings, env_file_path, get_settings, load_settings

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
    """One orchestration worker that sees no GPU, and one training worker per GPU slot, each
    with `--limit 1`, its own `CUDA_VISIBLE_DEVICES` and the trainers' backend
    (`dermflow.ops.gpu_env.trainer_envs`): Prefect hands each training run to a free worker, so
    each run sees exactly one GPU."""
    from dermflow.ops.gpu_env import gpu_extra_installed, hidden_gpu_env, trainer_backend, trainer_envs
    from dermflow.ops.stack import Worker, detected_gpus

    state = settings.data_dir / "run"
    gpus = detected_gpus()
    workers = [Worker("orchestrator", settings.work_pool, [ORCHESTRATION_QUEUE], state, env=hidden_gpu_env(gpus))]
    backend = trainer_backend(gpu_extra_installed())
    for slot, env in enumerate(trainer_envs(gpus, gpu_slots(settings), backend)):
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
    (the weekly retrain, say) stays paused, and the retrain's schedule keeps its on/off and the
    parameters `dermflow schedule set` gave it (the first deploy leaves the schedule off)."""
    from prefect.client.orchestration import get_client

    prefect_file = prefect_file or PROJECT_ROOT / "deployments" / "prefect.yaml"
    from dermflow.ops.schedule import restore_retrain, snapshot_retrain

    scheduled = ["derm/retrain"]
    was_paused = _paused_deployments(scheduled)
    with get_client(sync_client=True) as client:
        retrain = snapshot_retrain(client)  # deploy resets its schedule's on/off and its parameters
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
        restore_retrain(client, retrain)


def configure_alerts(settings: Settings) -> bool:
    """The alert automations (`dermflow.ops.alerts`): True when DERMFLOW_ALERT_WEBHOOK is set."""
    from dermflow.ops.alerts import configure_alerts as configure

    return configure(settings)


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


def supervised_services(settings: Settings) -> list:
    """The services `dermflow.ops.supervisor` restarts when they die: SeaweedFS (embedded),
    the Prefect server (local) and each worker."""
    from dermflow.ops.supervisor import Service

    services = []
    if _embedded_s3(settings):
        seaweed = _seaweed(settings)
        services.append(Service("seaweedfs", lambda: seaweed.process.pid() is not None, seaweed.start,
                                seaweed.process.log_tail))
    server = _prefect_server(settings)
    if server is not None:
        services.append(Service("prefect-server", lambda: server.process.pid() is not None, server.start,
                                server.process.log_tail))
    for worker in _workers(settings):
        services.append(Service(
            f"worker-{worker.name}", lambda w=worker: w.process.pid() is not None,
            lambda w=worker: w.start(settings.prefect_api_url, PROJECT_ROOT, _auth_string(settings)),
            worker.process.log_tail))
    return services


def _start_orchestration(settings: Settings) -> None:
    """The Prefect server (when local), the profile, the work pool and limit, the workers."""
    from dermflow.ops.readiness import call_when_ready

    server = _prefect_server(settings)
    if server is not None:
        server.start()
    print(f"Prefect API / UI    {settings.prefect_api_url}  /  {settings.prefect_api_url.removesuffix('/api')}"
          + ("  (log in with PREFECT_API_AUTH_STRING of .env)" if _auth_string(settings) else ""))
    set_prefect_profile(settings.prefect_api_url, _auth_string(settings))
    # Retried until the API answers the calls it makes (a server just (re)started may not yet).
    call_when_ready(lambda: configure_prefect(settings), settings.prefect_api_url)
    print(f"work pool           {settings.work_pool} (process); gpu limit: {gpu_slots(settings)} slot(s)")
    for worker in _workers(settings):
        started = worker.start(settings.prefect_api_url, PROJECT_ROOT, _auth_string(settings))
        print(f"worker              {worker.name} ({'started' if started else 'running'})")


def _use_stack_api(settings: Settings) -> None:
    """This process's Prefect client talks to the stack's API, with its auth."""
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    if _auth_string(settings):
        os.environ["PREFECT_API_AUTH_STRING"] = _auth_string(settings)


def cmd_up(args) -> int:
    from dermflow.ops.supervisor import lifecycle_lock, start_supervisor, write_systemd_units

    if args.systemd_units:
        for unit in write_systemd_units(Path(args.systemd_units), sys.executable, PROJECT_ROOT, env_file_path()):
            print(f"wrote {unit}")
        print("enable it with: systemctl --user daemon-reload && systemctl --user enable --now dermflow "
              "(and `loginctl enable-linger $USER` to start it at boot without a login)")
        return 0
    settings = _settings_with_env_file()
    _use_stack_api(settings)
    with lifecycle_lock(settings.data_dir / "run"):  # the supervisor restarts nothing meanwhile
        _start_storage(settings)
        _start_orchestration(settings)
    if not args.no_deploy:
        register_deployments(settings, _stack_env(settings))
        print("deployments         derm/full derm/fetch derm/refetch derm/retrain derm-train/default "
              "derm-tune/worker derm-tune-run/default derm-rescore/default")
        from dermflow.ops.readiness import call_when_ready

        if call_when_ready(lambda: configure_alerts(settings), settings.prefect_api_url):
            print("alerts              failed, late or missing derm/retrain runs and partial failures are "
                  "posted to DERMFLOW_ALERT_WEBHOOK (kept in the secret block dermflow-alerts)")
        else:
            print("alerts              not wired: set DERMFLOW_ALERT_WEBHOOK in .env, then rerun `dermflow up`")
    if not args.no_supervisor:
        started = start_supervisor(settings.data_dir / "run")
        print(f"supervisor          restarts crashed services ({'started' if started else 'running'})")
    return 0


def cmd_down(args) -> int:
    from dermflow.ops.stack import ManagedProcess
    from dermflow.ops.supervisor import supervisor_process

    settings = load_settings()
    if supervisor_process(settings.data_dir / "run").stop():  # first: it would restart the others
        print("stopped supervisor")
    for worker in _workers(settings):
        if worker.stop():
            print(f"stopped worker {worker.name}")
    # Workers started with more slots than today's setting are stopped too.
    for pid_file in sorted((settings.data_dir / "run").glob("worker-*.pid")):
        if ManagedProcess(pid_file.stem, pid_file.parent).stop():
            print(f"stopped {pid_file.stem}")
    server = _prefect_server(settings)
    if server is not None and server.stop():
        print("stopped Prefect server")
    if _embedded_s3(settings) and settings.aws_access_key_id and _seaweed(settings).stop():
        print("stopped SeaweedFS")
    return 0


def cmd_status(args) -> int:
    from dermflow.ops.status import print_status, stack_status

    settings = load_settings()
    _use_stack_api(settings)
    status = stack_status(settings)
    print_status(status, as_json=args.json)
    return 0 if all(row["healthy"] for row in status["services"]) else 1
