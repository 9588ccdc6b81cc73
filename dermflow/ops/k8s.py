"""`dermflow k8s setup`: the Prefect side of the Kubernetes deployment (docs/DEPLOY.md).

- the work pool `dermflow-k8s` (type kubernetes) with `deployments/k8s/base-job-template.json`;
- its queues: `default` (orchestrating flows, no limit) and `gpu` (training and tuning
  workers) with a concurrency limit of `--gpus`: the Kubernetes worker creates no pod for a
  `gpu` run beyond it, so a GPU pod is never requested (nor a GPU node scaled up) to wait for a
  slot. The `gpu` global concurrency limit the flows take inside the pods is set to the same
  size, so it never makes a pod that holds a GPU wait;
- with `--alerts`, after the deployments are registered: the failed-retrain automation that
  POSTs to `DERMFLOW_ALERT_WEBHOOK` (the same one `dermflow up` makes locally).
"""

from __future__ import annotations

import json
from pathlib import Path

from dermflow.ops.lifecycle import GPU_LIMIT, ORCHESTRATION_QUEUE, TRAINING_QUEUE, CommandError, configure_alerts
from dermflow.settings import PROJECT_ROOT, Settings, get_settings

K8S_POOL = "dermflow-k8s"
BASE_JOB_TEMPLATE = Path("deployments") / "k8s" / "base-job-template.json"


def setup_kubernetes(settings: Settings, gpus: int, pool: str = K8S_POOL,
                     template_path: Path | None = None) -> dict:
    """Create (or update) the pool, its queues and the `gpu` limit; returns what is set."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
        WorkPoolUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    if gpus < 1:
        raise CommandError(f"--gpus must be at least 1, got {gpus}")
    template_path = template_path or PROJECT_ROOT / BASE_JOB_TEMPLATE
    if not template_path.is_file():
        raise CommandError(f"no base job template at {template_path}: run from the project folder "
                           f"or pass --base-job-template")
    template = json.loads(template_path.read_text())
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
            if existing.type != "kubernetes":
                raise CommandError(f"work pool {pool!r} exists with type {existing.type!r}, not kubernetes")
            client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template))
        limits = {ORCHESTRATION_QUEUE: None, TRAINING_QUEUE: gpus}
        for queue, limit in limits.items():
            try:
                found = client.read_work_queue_by_name(queue, work_pool_name=pool)
                client.update_work_queue(found.id, concurrency_limit=limit)
            except ObjectNotFound:
                client.create_work_queue(name=queue, work_pool_name=pool, concurrency_limit=limit)
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=gpus))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpus))
    return {"pool": pool, "queues": limits, "gpu_limit": gpus}


def cmd_k8s_setup(args) -> int:
    settings = get_settings()
    done = setup_kubernetes(settings, args.gpus, args.pool, args.base_job_template)
    if args.alerts:
        try:
            done["alert"] = configure_alerts(settings)
        except Exception as error:  # noqa: BLE001 - ObjectNotFound and friends: one clear line
            raise CommandError(f"the alert needs the deployments registered first ({error})") from error
    print(json.dumps(done, indent=2))
    return 0


def add_parser(sub) -> None:
    """`dermflow k8s setup` on the CLI's subparsers."""
    k8s = sub.add_parser("k8s", help="Kubernetes: create the work pool, queues, gpu limit and alert")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    setup = k8s_sub.add_parser("setup", help="the pool dermflow-k8s, queues default and gpu, the gpu limit")
    setup.add_argument("--gpus", type=int, required=True, help="GPUs busy at once (gpu queue and gpu limit)")
    setup.add_argument("--pool", default=K8S_POOL)
    setup.add_argument("--base-job-template", type=Path, default=None,
                       help=f"default: {BASE_JOB_TEMPLATE} of the project folder")
    setup.add_argument("--alerts", action="store_true",
                       help="also the failed-retrain alert to DERMFLOW_ALERT_WEBHOOK (after `prefect deploy`)")
    setup.set_defaults(func=cmd_k8s_setup)
