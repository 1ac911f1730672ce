"""The render queues: how a job becomes a render message, and how a worker sees what waits.

Each model has one set of Celery queues, one per priority (``keys.render_queue``), consumed in strict
order (high, normal, low); the one-model cluster's model (``keys.LEGACY_MODEL``, or None) keeps the
names from before the fleet (``render.high`` …). A message
carries only the job id. The API never sends it itself: the job store pushes it in the same atomic
step that records the job (:meth:`broker.jobstore.JobStore.create_and_enqueue`), so this module
builds it (:meth:`RenderQueue.message`); a worker requeues through Celery (:meth:`RenderQueue.enqueue`)
and looks at the lists for messages no worker has taken (:meth:`RenderQueue.waiting`).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable

import redis
from celery import Celery

from broker import keys
from broker.celery_app import RENDER_TASK, TaskMessages, render_job_id


def _priority(priority: object) -> str:
    """A priority's name (a ``Priority`` or its value); an unknown one is ``normal``."""
    name = str(getattr(priority, "value", priority))
    return name if name in keys.RENDER_PRIORITIES else "normal"


class RenderQueue:
    """One model's render queues.

    Without ``client`` and ``celery`` it names queues and builds messages (all the API needs).
    ``client`` (blocking Redis, the broker's) lets it look at and push onto the lists; ``celery`` (the
    app on the same broker) lets it send a message through Celery (with a delay).
    """

    def __init__(self, *, model: str | None = None, client: redis.Redis | None = None,
                 celery: Celery | None = None) -> None:
        self.model = model
        self.names = {p: keys.render_queue(p, model) for p in keys.RENDER_PRIORITIES}
        self.order = tuple(self.names[p] for p in keys.RENDER_PRIORITIES)
        self._client = client
        self._celery = celery
        self._messages = TaskMessages(RENDER_TASK, 1)

    def name(self, priority: object) -> str:
        """The list of ``priority`` (unknown: normal)."""
        return self.names[_priority(priority)]

    def message(self, job_id: str, priority: object = "normal") -> tuple[str, str]:
        """(the list of ``priority``'s queue, the render message for ``job_id`` to LPUSH onto it)."""
        queue = self.name(priority)
        return queue, self._messages.message(queue, job_id)

    def enqueue(self, job_id: str, priority: object = "normal", countdown_s: float = 0) -> None:
        """Send ``job_id``'s render message through Celery, ``countdown_s`` from now (a requeue).

        Raises:
            RuntimeError: built without ``celery``.
            kombu.exceptions.OperationalError: the broker is unreachable.
        """
        if self._celery is None:
            raise RuntimeError("this RenderQueue has no Celery app")
        self._celery.send_task(RENDER_TASK, args=[job_id], queue=self.name(priority),
                               countdown=countdown_s or None)

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError("this RenderQueue has no Redis client")
        return self._client

    def put_back_first(self, job_id: str, priority: object) -> None:
        """Push a fresh message for ``job_id`` at the head of its queue (RPUSH: consumers pop from the
        right), so it is the next of its priority to be taken.

        Raises:
            RuntimeError: built without ``client``.
            redis.RedisError: Redis is unreachable.
        """
        queue, message = self.message(job_id, priority)
        self._redis().rpush(queue, message)

    def waiting(self, priorities: Iterable[object] | None = None) -> bool:
        """Whether a message no worker has taken yet waits in these priorities' lists (None: all).
        Messages a worker has taken (prefetched, or held in its render lane) are not in the lists.

        Raises:
            RuntimeError: built without ``client``.
            redis.RedisError: Redis is unreachable.
        """
        queues = self.order if priorities is None else tuple(self.name(p) for p in priorities)
        if not queues:
            return False
        pipe = self._redis().pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return any(pipe.execute())

    def backlog(self, queues: Iterable[str]) -> tuple[int, int]:
        """(messages no worker has taken, jobs the store holds as queued) in these lists of this model's,
        in one round trip: a job can be queued while a worker holds its message (workers/priority.py).

        Raises:
            RuntimeError: built without ``client``.
            redis.RedisError: Redis is unreachable.
        """
        priority_of = {queue: priority for priority, queue in self.names.items()}
        names = tuple(queues)
        pipe = self._redis().pipeline(transaction=False)
        for queue in names:
            pipe.llen(queue)
        for queue in names:
            pipe.zcard(keys.queued(priority_of[queue], self.model))
        answers = [int(n) for n in pipe.execute()]
        return sum(answers[:len(names)]), sum(answers[len(names):])


    def held_job_ids(self) -> set[str]:
        """The jobs whose render message is somewhere: waiting in this model's lists, or held
        unacknowledged by a worker (kombu's unacked hash: prefetched, in a render lane, or waiting
        for a countdown). Reads whole lists: for a periodic check, not a hot path.

        Raises:
            RuntimeError: built without ``client``.
            redis.RedisError: Redis is unreachable.
        """
        pipe = self._redis().pipeline(transaction=False)
        for queue in self.order:
            pipe.lrange(queue, 0, -1)
        pipe.hvals(keys.KOMBU_UNACKED)
        *lists, unacked = pipe.execute()
        held = {_job_id(message) for messages in lists for message in messages}
        for entry in unacked:
            try:
                message, _exchange, routing_key = json.loads(entry)
            except (ValueError, TypeError):
                continue
            if routing_key in self.order:
                held.add(_job_id(json.dumps(message)))
        held.discard("")
        return held

    def stranded(self, before_s: float, limit: int = 100) -> list[str]:
        """Jobs of this model the store has queued since before ``before_s`` (epoch s) whose render
        message is nowhere (:meth:`held_job_ids`): lost with a Redis primary that died before its
        replica had the worker's bookkeeping. Empty without reading the lists when no job is that old.

        Raises:
            RuntimeError: built without ``client``.
            redis.RedisError: Redis is unreachable.
        """
        pipe = self._redis().pipeline(transaction=False)
        for priority in keys.RENDER_PRIORITIES:
            pipe.zrangebyscore(keys.queued(priority, self.model), "-inf", f"({before_s!r}", start=0, num=limit)
        old = [m.decode() if isinstance(m, bytes) else str(m) for ids in pipe.execute() for m in ids]
        if not old:
            return []
        held = self.held_job_ids()
        return [job_id for job_id in old if job_id not in held][:limit]


def _job_id(message: str | bytes) -> str:
    """The job id of a render message ('' if it is not one)."""
    try:
        return render_job_id(message)
    except (ValueError, TypeError, KeyError, IndexError, binascii.Error):
        return ""


class RenderQueues:
    """Every model's :class:`RenderQueue`, made once per model on the same ``client`` and ``celery``
    (the API's: neither, it only builds messages)."""

    def __init__(self, *, client: redis.Redis | None = None, celery: Celery | None = None) -> None:
        self._client, self._celery = client, celery
        self._by_model: dict[str, RenderQueue] = {}

    def of(self, model: str | None) -> RenderQueue:
        """The queues of ``model`` (None and the legacy model's name: the same, legacy queues)."""
        name = model or keys.LEGACY_MODEL
        queue = self._by_model.get(name)
        if queue is None:
            queue = self._by_model[name] = RenderQueue(model=name, client=self._client, celery=self._celery)
        return queue
