"""The Celery app and the names of its tasks and queues.

The API sends tasks by name (it never imports ``workers``); workers register
their functions under the same names. Celery's result backend is off: the
JobStore is the job record.
"""

from __future__ import annotations

import base64
import functools
import json
import uuid
from typing import Any

from celery import Celery
from kombu.entity import Queue

from broker import keys
from broker.redis_conn import celery_broker
from broker.transport import install as install_transports

RENDER_TASK = "editfarm.render"
WEBHOOK_TASK = "editfarm.webhook"
NOTIFY_TASK = "editfarm.notify"

# One Redis list per priority (keys.render_queue; broker.queues.RenderQueue builds and reads render
# messages); workers consume them in this order (strict priority).
RENDER_QUEUES = {p: keys.render_queue(p) for p in keys.RENDER_PRIORITIES}
RENDER_QUEUE_ORDER = tuple(RENDER_QUEUES[p] for p in keys.RENDER_PRIORITIES)
RENDER_QUEUE = RENDER_QUEUES["normal"]
WEBHOOK_QUEUE = keys.WEBHOOK_QUEUE


def _queue(name: str) -> Queue:
    return Queue(name)  # type: ignore[no-untyped-call]  # kombu ships no annotations


def make_celery(redis_url: str, visibility_timeout_s: int = 12 * 3600,
                unacked_restore_interval_s: int | None = None) -> Celery:
    """A Celery app on the Redis broker, configured so accepted work is never dropped.

    ``visibility_timeout_s`` must exceed the longest job (seconds). ``unacked_restore_interval_s``
    sets how often a worker sweeps for messages unacked past the visibility timeout (kombu's
    default is about 100 s).
    """
    # kombu's transports for redis://, rediss:// and sentinel://, surviving a lost connection that
    # holds unacknowledged messages (broker/transport.py)
    install_transports()
    broker = celery_broker(redis_url)  # a redis+sentinel:// URL: kombu's sentinel transport
    app = Celery("editfarm", broker=broker.url, set_as_current=False)
    transport: dict[str, object] = {**broker.transport_options, "visibility_timeout": visibility_timeout_s,
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
        task_queues=[_queue(q) for q in (*RENDER_QUEUE_ORDER, WEBHOOK_QUEUE)],
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
    if broker.use_ssl is not None:
        app.conf.broker_use_ssl = broker.use_ssl
    return app


# Placeholders in a captured template, replaced per message (JSON-escaped).
_TASK_ID, _TAG, _BODY, _ARGSREPR, _QUEUE = (f"@@editfarm-{name}@@" for name in ("id", "tag", "body", "args", "queue"))


def _arg_marker(index: int) -> str:
    return f"@@editfarm-arg{index}@@"


@functools.cache
def _task_template(task: str, arity: int) -> tuple[str, str]:
    """(message JSON with placeholders, body JSON with one placeholder per positional argument).

    Made once per process by a real ``send_task`` on kombu's in-memory transport: the virtual
    transports share kombu's message envelope code with the Redis one (``prepare_message`` +
    ``_inplace_augment_message``), so this is what the Redis transport would LPUSH, without
    touching Redis. ``origin`` (this host and pid) stays as captured.
    """
    app = make_celery("memory://")
    app.conf.task_send_sent_event = False
    try:
        app.send_task(task, args=[_arg_marker(i) for i in range(arity)], queue=_QUEUE)
        with app.connection_for_write() as conn:
            # the message as the transport stored it (serializable(): the same dict the Redis
            # transport would LPUSH, its body base64-encoded)
            message: dict[str, Any] = conn.default_channel.basic_get(_QUEUE, no_ack=True).serializable()
    finally:
        app.close()
    body = base64.b64decode(message["body"]).decode()
    assert all(json.dumps(_arg_marker(i)) in body for i in range(arity)), "an argument is not in the body"
    task_id = message["headers"]["id"]
    message["body"] = _BODY
    message["headers"].update(id=_TASK_ID, root_id=_TASK_ID, argsrepr=_ARGSREPR)
    message["properties"].update(correlation_id=_TASK_ID, delivery_tag=_TAG)
    message["properties"]["delivery_info"]["routing_key"] = _QUEUE
    text = json.dumps(message)
    assert task_id not in text, "the task id is somewhere the template does not replace it"
    return text, body


def _json_text(value: str) -> str:
    return json.dumps(value)[1:-1]


class TaskMessages:
    """Celery messages of one task, built without ``send_task`` (for ``LPUSH`` inside a Lua script).

    ``send_task`` costs ~1 ms of CPU per message in kombu and needs its own round trip; instead the
    message is pushed in the same Redis script that changes the job, so the two happen together or
    not at all. The message is byte-for-byte what ``send_task`` would push (protocol 2, JSON, base64
    body, priority 0) but for the ids, and without Celery's ``task-sent`` event: Flower still sees
    ``task-received`` / ``task-started`` from the workers.
    """

    def __init__(self, task: str, arity: int) -> None:
        self.arity = arity
        self._template, self._body = _task_template(task, arity)

    def message(self, queue: str, *args: str) -> str:
        """The message carrying ``args`` (strings) for ``queue``."""
        assert len(args) == self.arity
        body = self._body
        for index, arg in enumerate(args):
            body = body.replace(json.dumps(_arg_marker(index)), json.dumps(arg))
        task_id = str(uuid.uuid4())
        return (self._template.replace(_TASK_ID, task_id).replace(_TAG, str(uuid.uuid4()))
                .replace(_BODY, base64.b64encode(body.encode()).decode())
                .replace(_ARGSREPR, _json_text(repr(list(args)))).replace(_QUEUE, _json_text(queue)))


class NotifyMessages:
    """Notify task messages (see :class:`TaskMessages`): a worker pushes one with a job's terminal
    transition, so a job never ends without its webhook being asked for."""

    def __init__(self) -> None:
        self._messages = TaskMessages(NOTIFY_TASK, 2)

    def build(self, job_id: str, event: str) -> tuple[str, str]:
        """(the webhook queue's Redis list, the message to LPUSH onto it)."""
        return WEBHOOK_QUEUE, self._messages.message(WEBHOOK_QUEUE, job_id, event)


def render_job_id(message: str | bytes) -> str:
    """The job id a render message carries (its task's only argument)."""
    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    job_id: str = body[0][0]
    return job_id


def enqueue_notify(app: Celery, job_id: str, event: str) -> None:
    """Ask a CPU worker to send a job's webhook for ``event`` (e.g. "job.canceled", "job.started")."""
    app.send_task(NOTIFY_TASK, args=[job_id, event], queue=WEBHOOK_QUEUE)


def enqueue_webhook(app: Celery, message_id: str, countdown_s: float = 0) -> None:
    """Queue delivery of a stored webhook message (only its id travels)."""
    app.send_task(WEBHOOK_TASK, args=[message_id], queue=WEBHOOK_QUEUE, countdown=countdown_s or None)
