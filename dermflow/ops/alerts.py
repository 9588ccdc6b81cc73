"""The alert automations that `dermflow up` creates, and whether they are wired.

Every alert goes through one secret notification block (`dermflow-alerts`, a custom webhook
holding DERMFLOW_ALERT_WEBHOOK) and these Prefect automations:

- `derm-retrain-failed`: a `derm/retrain` run ended Failed, Crashed or TimedOut, or went Late
  (scheduled, but no worker picked it up: workers down, or the pool paused);
- `derm-retrain-missing`: no `derm/retrain` run Completed within the schedule's period plus a
  day (the server was down at the scheduled time, or every run failed). It is enabled only
  while the retrain's schedule is on: the schedule starts paused (README, "Scheduled
  retraining"), and a user who never turned it on expects no retrain, so no alert;
  `dermflow schedule resume`/`pause` switch it with the schedule;
- `derm-partial-failure`: a `derm` run completed, but some architectures failed (the
  `dermflow.run.partial-failure` event of `tasks.runs.report_partial_failure`).

`dermflow up` is the one way to wire them: it deletes and recreates them from `.env` on each
run, so setting DERMFLOW_ALERT_WEBHOOK later takes a rerun of `dermflow up`.
"""

from __future__ import annotations

from datetime import timedelta

from dermflow.runs import PARTIAL_FAILURE_EVENT
from dermflow.settings import Settings

ALERT_BLOCK = "dermflow-alerts"
RETRAIN_DEPLOYMENT = "derm/retrain"
FAILED_AUTOMATION = "derm-retrain-failed"
MISSING_AUTOMATION = "derm-retrain-missing"
PARTIAL_AUTOMATION = "derm-partial-failure"
AUTOMATIONS = (FAILED_AUTOMATION, MISSING_AUTOMATION, PARTIAL_AUTOMATION)
# Without a schedule to read the period from (a retrain deployment with none), a week.
DEFAULT_PERIOD = timedelta(days=7)
GRACE = timedelta(days=1)


def retrain_period(deployment) -> timedelta:
    """The time between two scheduled runs of the deployment (its first schedule)."""
    for schedule in getattr(deployment, "schedules", None) or []:
        spec = schedule.schedule
        if getattr(spec, "interval", None):
            return spec.interval
        if getattr(spec, "cron", None):
            from prefect.server.schemas.schedules import CronSchedule
            from prefect.utilities.asyncutils import run_coro_as_sync

            cron = CronSchedule(cron=spec.cron, timezone=spec.timezone or "UTC")
            first, second = run_coro_as_sync(cron.get_dates(n=2))
            return second - first
    return DEFAULT_PERIOD


def _retrain_automations(deployment, block_id, schedule_on: bool):
    from prefect.automations import Automation, EventTrigger, SendNotification

    related = {"prefect.resource.id": f"prefect.deployment.{deployment.id}"}
    within = retrain_period(deployment) + GRACE
    failed = Automation(
        name=FAILED_AUTOMATION,
        description="Notify when a scheduled retraining fails, crashes, times out or goes Late",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut",
                    "prefect.flow-run.Late"},
            match_related=related, posture="Reactive", threshold=1, within=0,
        ),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="dermflow: derm/retrain {{ flow_run.state.name }}",
            body="Flow run {{ flow_run.name }} of derm/retrain is {{ flow_run.state.name }}: "
                 "{{ flow_run.state.message }} (Late: no worker picked it up; run `dermflow status`)",
        )],
    )
    missing = Automation(
        name=MISSING_AUTOMATION, enabled=schedule_on,
        description=f"Notify when no derm/retrain run completed within {within}",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Completed"}, match_related=related,
            posture="Proactive", threshold=1, within=within,
        ),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="dermflow: no derm/retrain completed",
            body=f"No derm/retrain run completed in the last {within}: is the Prefect server up, are the "
                 "workers up (`dermflow status`), is the schedule paused?",
        )],
    )
    return [failed, missing]


def _partial_failure_automation(block_id):
    from prefect.automations import Automation, EventTrigger, SendNotification

    return Automation(
        name=PARTIAL_AUTOMATION,
        description="Notify when a derm run completed but some architectures failed",
        trigger=EventTrigger(expect={PARTIAL_FAILURE_EVENT}, posture="Reactive", threshold=1, within=0),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="dermflow: partial failure in run {{ event.payload.run_id }}",
            body="{{ event.payload.summary }}",
        )],
    )


def configure_alerts(settings: Settings) -> bool:
    """(Re)create the automations when DERMFLOW_ALERT_WEBHOOK is set (True), else delete them
    (False): a failed or late retrain then shows only in the UI (runs, events)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in AUTOMATIONS:
            for existing in client.read_automations_by_name(name):
                client.delete_automation(existing.id)
        if not settings.alert_webhook:
            return False
        deployment = client.read_deployment_by_name(RETRAIN_DEPLOYMENT)
        schedule_on = retrain_schedule_on(client, deployment)
    # The URL (it may carry a token) lives only in the block's secret field; `url` names it.
    block = CustomWebhookNotificationBlock(
        name=ALERT_BLOCK, url="{{webhook_url}}",
        secrets={"webhook_url": settings.alert_webhook.get_secret_value()},
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    block_id = block.save(ALERT_BLOCK, overwrite=True)
    for automation in [*_retrain_automations(deployment, block_id, schedule_on), _partial_failure_automation(block_id)]:
        automation.create()
    return True


def retrain_schedule_on(client, deployment) -> bool:
    """Whether the retrain will run on its schedule: the deployment not paused, a schedule on."""
    schedules = client.read_deployment_schedules(deployment.id)
    return not deployment.paused and any(schedule.active for schedule in schedules)


def follow_schedule(client, schedule_on: bool) -> bool:
    """Enable the missing-retrain alert while the schedule is on, disable it while it is off;
    False when alerts are not wired (no automation to switch)."""
    found = client.read_automations_by_name(MISSING_AUTOMATION)
    for automation in found:
        if automation.enabled != schedule_on:
            (client.resume_automation if schedule_on else client.pause_automation)(automation.id)
    return bool(found)


def alerts_status() -> dict:
    """{"wired": bool, "automations": {name: enabled}}: wired when every automation exists and
    is enabled, the missing-retrain one only while the schedule is on (what `dermflow status`
    reports); needs the Prefect API."""
    from prefect.client.orchestration import get_client

    found = {}
    with get_client(sync_client=True) as client:
        for name in AUTOMATIONS:
            automations = client.read_automations_by_name(name)
            if automations:
                found[name] = all(a.enabled for a in automations)
        deployment = client.read_deployment_by_name(RETRAIN_DEPLOYMENT) if found else None
        schedule_on = retrain_schedule_on(client, deployment) if deployment is not None else False
    expected = {name: (schedule_on if name == MISSING_AUTOMATION else True) for name in AUTOMATIONS}
    return {"wired": found == expected, "automations": found, "retrain_schedule_on": schedule_on}
