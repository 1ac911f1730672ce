"""Celery tasks: thin wrappers that hand a job id to the runner or a message id to the webhook sender.

Each task gets its process's :class:`~workers.services.WorkerServices` from the ``services``
function given to :func:`register` (built at the process's start, see ``workers/celery_worker.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import redis
from celery import Celery, Task

from broker.celery_app import NOTIFY_TASK, RENDER_TASK, WEBHOOK_TASK
from workers import metrics
from workers.runner import EXIT_GPU_BROKEN, GpuBroken, RetryLater
from workers.services import WorkerServices
from workers.webhooks import DeliveryResult, deliver_once

log = logging.getLogger("editfarm.tasks")


def render(services: WorkerServices, task: Task, job_id: str) -> None:
    if services.runner is None:
        raise RuntimeError("a render task reached a worker without a model (EDITFARM_WORKER_ROLE?)")
    try:
        services.runner.run(job_id)
    except RetryLater as exc:
        log.info("job %s: %s; retrying in %.1f s", job_id, exc.reason, exc.delay_s)
        raise task.retry(countdown=exc.delay_s, max_retries=None) from None
    except GpuBroken:
        # the job is already ended; this process's device is not trustworthy any more.
        # Exiting makes Celery start a fresh child (which reloads the model).
        log.critical("device broken; exiting so the worker restarts", exc_info=True)
        os._exit(EXIT_GPU_BROKEN)


def attempt_delivery(services: WorkerServices, message_id: str) -> DeliveryResult | None:
    """One delivery attempt of a stored message, signed for its tenant and counted in the metrics;
    None if the message is gone. Raises redis.RedisError."""
    try:
        result = deliver_once(services.outbox, message_id, services.webhook_configs(), services.http,
                              config_for=services.webhook_configs)
    except LookupError:
        log.warning("webhook message %s is gone (expired?); dropping", message_id)
        return None
    metrics.WEBHOOKS.labels(outcome=result.outcome).inc()
    return result


def deliver_webhook(services: WorkerServices, task: Task, message_id: str) -> None:
    """A queued (re)delivery: retries of first attempts, and redeliveries asked through the API."""
    result = attempt_delivery(services, message_id)
    if result is not None and result.outcome == "retry" and result.retry_in_s is not None:
        raise task.retry(countdown=result.retry_in_s, max_retries=None)


def deliver_first(services: WorkerServices, message_id: str) -> None:
    """The first attempt of a message the notify task has just stored, made right here rather than
    queued as a webhook task: one Celery hop less between a job's end and its webhook. A retry is
    queued with its countdown, as the webhook task would reschedule itself. If no attempt could be
    made (Redis blinked), the delivery is queued instead, so the message is never left without one;
    the message's lock and state keep a queued run from sending what this one sent."""
    try:
        result = attempt_delivery(services, message_id)
    except redis.RedisError as exc:
        log.warning("webhook %s: first attempt not made (%s); queued instead", message_id, type(exc).__name__)
        services.queue_webhook(message_id)
        return
    if result is not None and result.outcome == "retry" and result.retry_in_s is not None:
        services.queue_webhook(message_id, result.retry_in_s)


def notify(services: WorkerServices, task: Task, job_id: str, event: str) -> None:
    """Store a job's webhook message for ``event`` and make its first attempt. While Redis is
    unreachable the task is retried (storing is idempotent: one message per job and event)."""
    try:
        job = services.store.get(job_id)
        if job is None:
            log.warning("notify %s: job %s is unknown", event, job_id)
            return
        services.notifier(lambda message_id: deliver_first(services, message_id))(job, event)
    except redis.RedisError as exc:
        log.warning("notify %s of job %s: Redis unreachable; retrying", event, job_id)
        raise task.retry(exc=exc, countdown=2, max_retries=60) from None


def register(app: Celery, services: Callable[[], WorkerServices]) -> None:
    """Register the tasks on ``app`` under the contract's names; each runs with ``services()``,
    its process's services."""

    def render_task(task: Task, job_id: str) -> None:
        render(services(), task, job_id)

    def webhook_task(task: Task, message_id: str) -> None:
        deliver_webhook(services(), task, message_id)

    def notify_task(task: Task, job_id: str, event: str) -> None:
        notify(services(), task, job_id, event)

    app.task(name=RENDER_TASK, bind=True, max_retries=None)(render_task)
    app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)(webhook_task)
    app.task(name=NOTIFY_TASK, bind=True, max_retries=3, default_retry_delay=2)(notify_task)
