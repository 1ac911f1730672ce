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
NOTIFY_TASK = "editfarm.notify"

# One Redis list per priority; workers consume them in this order (strict priority).
RENDER_QUEUES = {"high": "render.high", "normal": "render.normal", "low": "render.low"}
RENDER_QUEUE_ORDER = (RENDER_QUEUES["high"], RENDER_QUEUES["normal"], RENDER_QUEUES["low"])
RENDER_QUEUE = RENDER_QUEUES["normal"]
WEBHOOK_QUEUE = "webhooks"


def make_celery(redis_url: str, visibility_timeout_s: int = 12 * 3600,
                unacked_restore_interval_s: int | None = None) -> Celery:
    """A Celery app on the Redis broker, configured so accepted work is never dropped.

    ``visibility_timeout_s`` must exceed the longest job (seconds). ``unacked_restore_interval_s``
    sets how often a worker sweeps for messages unacked past the visibility timeout (kombu's
    default is about 100 s).
    """
    app = Celery("editfarm", broker=redis_url, set_as_current=False)
    transport: dict[str, object] = {"visibility_timeout": visibility_timeout_s,
                                    # poll the queues in the order given to the worker
                                    # (-Q render.high,render.normal,render.low), not round-robin
                                    "queue_order_strategy": "priority"}
    if unacked_restore_interval_s is not None:
        transport.update(unacked_restore_interval=unacked_restore_interval_s, unacked_restore_throttle=1)
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
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_queues=[*(Queue(q) for q in RENDER_QUEUE_ORDER), Queue(WEBHOOK_QUEUE)],
        task_default_queue=RENDER_QUEUE,
        task_routes={RENDER_TASK: {"queue": RENDER_QUEUE}, WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
                     NOTIFY_TASK: {"queue": WEBHOOK_QUEUE}},
        # events for Flower
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        # loading ~40 GB of weights and warming up happens in the child before it reports alive
        worker_proc_alive_timeout=1800,
    )
    return app


def enqueue_render(app: Celery, job_id: str, priority: str = "normal", countdown_s: float = 0) -> None:
    """Queue a job for rendering on its priority's queue (only its id travels)."""
    app.send_task(RENDER_TASK, args=[job_id], queue=RENDER_QUEUES.get(priority, RENDER_QUEUE),
                  countdown=countdown_s or None)


def enqueue_notify(app: Celery, job_id: str, event: str) -> None:
    """Ask a CPU worker to send a job's webhook for ``event`` (e.g. "job.canceled", "job.started")."""
    app.send_task(NOTIFY_TASK, args=[job_id, event], queue=WEBHOOK_QUEUE)


def enqueue_webhook(app: Celery, message_id: str, countdown_s: float = 0) -> None:
    """Queue delivery of a stored webhook message (only its id travels)."""
    app.send_task(WEBHOOK_TASK, args=[message_id], queue=WEBHOOK_QUEUE, countdown=countdown_s or None)
