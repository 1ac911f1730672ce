"""Strict priority for a job the render lane took early: give way to a higher one queued since.

A render task takes its job while the device still renders the one before (workers/pipelining.py).
By the time the device frees, a job of a higher priority may have been queued. Where its Celery
message is decides what this worker must do:

* in one of the Redis lists this worker consumes: put our job's message back first in its own
  queue and end the task; the worker's next pop takes the higher message (Celery polls the
  lists in priority order).
* nowhere in those lists, although the job store says it is ``queued``: a worker has taken the
  message and not started the job yet — a render task fetching its inputs, another worker's
  lane, or a message Celery reserved early (an ETA retry raises the worker's prefetch, and
  that worker may be this one: its parent then holds the higher message until our task ends).
  Wait a moment with the device free: if the job starts elsewhere, render ours; if its message
  comes back to a list, give way. If neither happens, give way anyway so a message our own
  Celery parent holds can reach the device; a job gives way like that at most
  ``max_blind_rounds`` times, so a higher message stranded with a dead worker (until the
  broker restores it) cannot starve the lower queues.

Only the queues this worker consumes count: a worker that serves ``render.low`` alone never
waits for high jobs it would never take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import redis

from broker import keys
from broker.queues import RenderQueue
from broker.schema import Job

log = logging.getLogger("editfarm.priority")

@dataclass(frozen=True)
class Higher:
    """What is queued above a job, in the queues a worker consumes."""

    messages: int   # render messages no worker has taken yet
    jobs: int       # jobs the store holds as queued (their messages anywhere)


class PriorityGate:
    """Decides, when the device frees, whether the job the lane took early must give way.

    ``queues``: the model's render queues (names, and where a message is put back).
    ``consumed``: the render queues this worker takes messages from (None: all of them).
    ``wait_s``: how long to wait, device free, for a higher job whose message a worker holds.
    """

    def __init__(self, *, client: redis.Redis, queues: RenderQueue, consumed: Collection[str] | None,
                 wait_s: float, poll_s: float = 0.05, max_blind_rounds: int = 2, round_ttl_s: int = 3600,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client, self.queues = client, queues
        self.consumed = None if consumed is None else frozenset(consumed)
        self.wait_s, self.poll_s = wait_s, poll_s
        self.max_blind_rounds, self.round_ttl_s = max_blind_rounds, round_ttl_s
        self.clock, self.sleep = clock, sleep

    def higher_queues(self, job: Job) -> tuple[str, ...]:
        """The render queues above ``job``'s that this worker consumes, highest first."""
        order = self.queues.order
        above = order[:order.index(self.queues.name(job.params.priority))]
        return tuple(q for q in above if self.consumed is None or q in self.consumed)

    def higher(self, queues: tuple[str, ...]) -> Higher:
        """Messages waiting and jobs queued in ``queues`` (one round trip). Raises redis errors."""
        messages, jobs = self.queues.backlog(queues)
        return Higher(messages=messages, jobs=jobs)

    def give_way(self, job: Job) -> bool:
        """True once ``job``'s message is back first in its own queue (the caller ends the task
        without starting the job); False: render it now. May wait up to ``wait_s``.

        Raises redis errors (the caller renders the job: it cannot tell).
        """
        queues = self.higher_queues(job)
        if not queues:
            return False
        deadline = self.clock() + self.wait_s
        while True:
            above = self.higher(queues)
            if above.messages:
                return self._push_back(job)
            if not above.jobs:
                return False
            if self.clock() >= deadline:
                return self._blind_round(job)
            self.sleep(self.poll_s)

    def _blind_round(self, job: Job) -> bool:
        """A higher job stayed queued, its message in no list: give way, at most max_blind_rounds times."""
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(keys.gave_way(job.id))
        pipe.expire(keys.gave_way(job.id), self.round_ttl_s)
        rounds = int(pipe.execute()[0])
        if rounds > self.max_blind_rounds:
            log.info("job %s: a job of higher priority stays queued with its message taken; rendering "
                     "this one (gave way %d times)", job.id, self.max_blind_rounds)
            return False
        return self._push_back(job)

    def _push_back(self, job: Job) -> bool:
        # first among its priority: Celery's consumer pops from the right
        self.queues.put_back_first(job.id, job.params.priority)
        return True
