"""The render queue as a worker sees it: re-send a job, give way to higher priorities, look at what waits.

The runner and the reaper are handed a :class:`WorkQueue`; :class:`CeleryRenderQueue` is the
real one, over the contract's :class:`broker.queues.RenderQueue` (queue names, message format).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

import redis

from broker.queues import RenderQueues
from broker.schema import Job, model_of
from workers.priority import PriorityGate


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
    """:class:`WorkQueue` over the Celery broker's Redis lists. Every method raises redis errors.

    ``consumed``: the render queues this worker takes messages from (its ``-Q``; None: all);
    ``give_way_wait_s``: see :class:`workers.priority.PriorityGate`.
    """

    def __init__(self, *, redis_client: redis.Redis, celery: Any, model: str | None = None,
                 consumed: Collection[str] | None = None, give_way_wait_s: float = 0.0) -> None:
        # a render worker only ever holds its own model's jobs; the reaper (in a webhook worker, which
        # serves none) re-sends any model's, each on its own model's queues
        self.by_model = RenderQueues(client=redis_client, celery=celery)
        self.queues = self.by_model.of(model)
        self.gate = PriorityGate(client=redis_client, queues=self.queues, consumed=consumed,
                                 wait_s=give_way_wait_s)

    def requeue(self, job: Job) -> None:
        """Re-send ``job`` on its own model's queue of its priority."""
        self.by_model.of(model_of(job)).enqueue(job.id, job.params.priority)

    def give_way(self, job: Job) -> bool:
        """Strict priority for a job the render lane took early (workers/priority.py): ``job``'s
        message goes back first in its own queue when a higher job waits, wherever its message is."""
        return self.gate.give_way(job)

    def jobs_waiting(self) -> bool:
        return self.queues.waiting()
