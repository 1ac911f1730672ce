"""Celery tasks: thin wrappers that hand a job id to the runner or a message id to the webhook sender."""

from __future__ import annotations

import logging
import os

import redis
from celery import Celery, Task

from broker.celery_app import NOTIFY_TASK, RENDER_TASK, WEBHOOK_TASK
from workers import metrics, services
from workers.runner import EXIT_GPU_BROKEN, GpuBroken, RetryLater
from workers.webhooks import DeliveryResult, deliver_once

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


def attempt_delivery(message_id: str) -> DeliveryResult | None:
    """One delivery attempt of a stored message, signed for its tenant and counted in the metrics;
    None if the message is gone. Raises redis.RedisError."""
    try:
        result = deliver_once(services.outbox(), message_id, services.webhook_config(), services.http_client(),
                              config_for=services.webhook_config)
    except LookupError:
        log.warning("webhook message %s is gone (expired?); dropping", message_id)
        return None
    metrics.WEBHOOKS.labels(outcome=result.outcome).inc()
    return result


def deliver_webhook(task: Task, message_id: str) -> None:
    """A queued (re)delivery: retries of first attempts, and redeliveries asked through the API."""
    result = attempt_delivery(message_id)
    if result is not None and result.outcome == "retry" and result.retry_in_s is not None:
        raise task.retry(countdown=result.retry_in_s, max_retries=None)


def deliver_first(message_id: str) -> None:
    """The first attempt of a message the notify task has just stored, made right here rather than
    queued as a webhook task: one Celery hop less between a job's end and its webhook. A retry is
    queued with its countdown, as the webhook task would reschedule itself. If no attempt could be
    made (Redis blinked), the delivery is queued instead, so the message is never left without one;
    the message's lock and state keep a queued run from sending what this one sent."""
    try:
        result = attempt_delivery(message_id)
    except redis.RedisError as exc:
        log.warning("webhook %s: first attempt not made (%s); queued instead", message_id, type(exc).__name__)
        services.queue_webhook(message_id)
        return
    if result is not None and result.outcome == "retry" and result.retry_in_s is not None:
        services.queue_webhook(message_id, result.retry_in_s)


def notify(task: Task, job_id: str, event: str) -> None:
    """Store a job's webhook message for ``event`` and make its first attempt. While Redis is
    unreachable the task is retried (storing is idempotent: one message per job and event)."""
    try:
        job = services.store().get(job_id)
        if job is None:
            log.warning("notify %s: job %s is unknown", event, job_id)
            return
        services.notifier(deliver_first)(job, event)
    except redis.RedisError as exc:
        log.warning("notify %s of job %s: Redis unreachable; retrying", event, job_id)
        raise task.retry(exc=exc, countdown=2, max_retries=60) from None


def register(app: Celery) -> None:
    """Register the tasks on ``app`` under the contract's names."""
    app.task(name=RENDER_TASK, bind=True, max_retries=None)(render)
    app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)(deliver_webhook)
    app.task(name=NOTIFY_TASK, bind=True, max_retries=3, default_retry_delay=2)(notify)
