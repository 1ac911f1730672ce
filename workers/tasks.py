"""Celery tasks: thin wrappers that hand a job id to the runner or a message id to the webhook sender."""

from __future__ import annotations

import logging
import os

from celery import Celery, Task

from broker.celery_app import NOTIFY_TASK, RENDER_TASK, WEBHOOK_TASK
from workers import metrics, services
from workers.runner import EXIT_GPU_BROKEN, GpuBroken, RetryLater
from workers.webhooks import deliver_once

log = logging.getLogger("editfarm.tasks")


def render(task: Task, job_id: str) -> None:
    try:
        services.runner().run(job_id)
    except RetryLater as exc:
        log.info("job %s: %s; retrying in %.1f s", job_id, exc.reason, exc.delay_s)
        raise task.retry(countdown=exc.delay_s, max_retries=None) from None
    except GpuBroken:
        # the job is already ended; this process's device is not trustworthy any more.
        # Exiting makes Celery start a fresh child (which reloads the model).
        log.critical("device broken; exiting so the worker restarts", exc_info=True)
        os._exit(EXIT_GPU_BROKEN)


def deliver_webhook(task: Task, message_id: str) -> None:
    outbox = services.outbox()
    message = outbox.get(message_id)
    if message is None:
        log.warning("webhook message %s is gone (expired?); dropping", message_id)
        return
    try:
        result = deliver_once(outbox, message_id, services.webhook_config(message.tenant), services.http_client())
    except LookupError:
        log.warning("webhook message %s is gone (expired?); dropping", message_id)
        return
    metrics.WEBHOOKS.labels(outcome=result.outcome).inc()
    if result.outcome == "retry" and result.retry_in_s is not None:
        raise task.retry(countdown=result.retry_in_s, max_retries=None)


def notify(task: Task, job_id: str, event: str) -> None:
    job = services.store().get(job_id)
    if job is None:
        log.warning("notify %s: job %s is unknown", event, job_id)
        return
    services.notifier()(job, event)


def register(app: Celery) -> None:
    """Register the tasks on ``app`` under the contract's names."""
    app.task(name=RENDER_TASK, bind=True, max_retries=None)(render)
    app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)(deliver_webhook)
    app.task(name=NOTIFY_TASK, bind=True, max_retries=3, default_retry_delay=2)(notify)
