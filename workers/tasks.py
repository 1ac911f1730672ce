"""Celery tasks: thin wrappers that hand a job id to the runner or a message id to the webhook sender."""

from __future__ import annotations

import logging

from celery import Celery, Task

from broker.celery_app import RENDER_TASK, WEBHOOK_TASK
from workers import services
from workers.runner import RetryLater
from workers.webhooks import deliver_once

log = logging.getLogger("editfarm.tasks")


def render(task: Task, job_id: str) -> None:
    try:
        services.runner().run(job_id)
    except RetryLater as exc:
        log.info("job %s: %s; retrying in %.1f s", job_id, exc.reason, exc.delay_s)
        raise task.retry(countdown=exc.delay_s, max_retries=None) from None


def deliver_webhook(task: Task, message_id: str) -> None:
    try:
        result = deliver_once(services.outbox(), message_id, services.webhook_config(), services.http_client())
    except LookupError:
        log.warning("webhook message %s is gone (expired?); dropping", message_id)
        return
    if result.outcome == "retry" and result.retry_in_s is not None:
        raise task.retry(countdown=result.retry_in_s, max_retries=None)


def register(app: Celery) -> None:
    """Register the tasks on ``app`` under the contract's names."""
    app.task(name=RENDER_TASK, bind=True, max_retries=None)(render)
    app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)(deliver_webhook)
