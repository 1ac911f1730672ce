"""The Celery app and the names of its tasks and queues.

The API sends tasks by name (it never imports ``workers``); workers register
their functions under the same names. Celery's result backend is off: the
JobStore is the job record.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

RENDER_TASK = "editfarm.render"
WEBHOOK_TASK = "editfarm.webhook"

RENDER_QUEUE = "render"
WEBHOOK_QUEUE = "webhooks"


def make_celery(redis_url: str, visibility_timeout_s: int = 12 * 3600) -> Celery:
    """A Celery app on the Redis broker, configured so accepted work is never dropped.

    ``visibility_timeout_s`` must exceed the longest job (seconds).
    """
    app = Celery("editfarm", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # ack only after the task returns, and give the message back if the
        # worker process dies, so a killed worker never loses a job.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # one job at a time per GPU process: no job waits behind another one's render.
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(RENDER_QUEUE), Queue(WEBHOOK_QUEUE)],
        task_default_queue=RENDER_QUEUE,
        task_routes={RENDER_TASK: {"queue": RENDER_QUEUE}, WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE}},
        # events for Flower
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


def enqueue_render(app: Celery, job_id: str) -> None:
    """Queue a job for rendering (only its id travels)."""
    app.send_task(RENDER_TASK, args=[job_id], queue=RENDER_QUEUE)


def enqueue_webhook(app: Celery, message_id: str, countdown_s: float = 0) -> None:
    """Queue delivery of a stored webhook message (only its id travels)."""
    app.send_task(WEBHOOK_TASK, args=[message_id], queue=WEBHOOK_QUEUE, countdown=countdown_s or None)
