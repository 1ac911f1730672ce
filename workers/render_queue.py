"""The render queue as a worker sees it: re-send a job, give way to higher priorities, look at what waits.

The runner and the reaper are handed a :class:`WorkQueue`; :class:`CeleryRenderQueue` is the
real one, over Celery's Redis lists (the queue names and message format are the contract's,
``broker.celery_app``).
"""

from __future__ import annotations

from typing import Any, Protocol

import redis

from broker.celery_app import RENDER_QUEUE_ORDER, RENDER_QUEUES, RenderMessages, enqueue_render
from broker.schema import Job


class WorkQueue(Protocol):
    """What the runner and the reaper ask of the render queue."""

    def requeue(self, job: Job) -> None:
        """Send a fresh render message for ``job`` (it was handed back, or its lease lapsed)."""

    def give_way(self, job: Job) -> bool:
        """If a job of a higher priority than ``job``'s waits, put ``job`` back first in its own queue
        and return True (``job`` had been taken while the device was busy)."""

    def jobs_waiting(self) -> bool:
        """Whether any render message waits that no worker has taken yet."""


class CeleryRenderQueue:
    """:class:`WorkQueue` over the Celery broker's Redis lists. Every method raises redis errors."""

    def __init__(self, *, redis_client: redis.Redis, celery: Any) -> None:
        self.redis, self.celery = redis_client, celery
        self._messages = RenderMessages()

    def requeue(self, job: Job) -> None:
        enqueue_render(self.celery, job.id, job.params.priority.value)

    def give_way(self, job: Job) -> bool:
        """Only messages no worker has taken are in those lists, so jobs waiting in other workers'
        render lanes do not count. ``job``'s message goes back with RPUSH: the consumer pops from
        the right, so it is the next one taken from its queue."""
        mine = RENDER_QUEUES[job.params.priority.value]
        if not self._messages_wait(RENDER_QUEUE_ORDER[:RENDER_QUEUE_ORDER.index(mine)]):
            return False
        queue, message = self._messages.build(job.id, job.params.priority.value)
        self.redis.rpush(queue, message)
        return True

    def jobs_waiting(self) -> bool:
        return self._messages_wait(RENDER_QUEUE_ORDER)

    def _messages_wait(self, queues: tuple[str, ...]) -> bool:
        """Whether any of these Celery Redis lists holds a message no worker has taken yet."""
        if not queues:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return any(pipe.execute())
