"""The outbox relay: a pending webhook message that nobody is delivering gets a delivery again.

A message's deliveries travel as Celery tasks; one that is lost in flight (published to a Redis
primary that died before its replica had it, a notify task that failed to queue its delivery during a
failover) would leave the message pending forever. The store keeps every message that may still need
a delivery in an index (``keys.WEBHOOK_PENDING``); every ``interval_s`` the relay looks at those due,
drops the ended ones, and queues a delivery for a pending one that no delivery holds, has no retry
scheduled within ``after_s`` and was last handed a delivery more than ``after_s`` ago. A second
delivery of a message is harmless: a delivery claims the message (pending, under its lock), so it is
sent once (workers/webhooks.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from broker.outbox import OutboxRecords
from workers.periodic import Periodic

log = logging.getLogger("editfarm.webhooks")


class OutboxRelay:
    """Re-queues lost deliveries through ``enqueue(message_id)`` (the webhook task). Raises nothing from
    its thread: a failed pass is logged and the next one runs."""

    def __init__(self, *, records: OutboxRecords, enqueue: Callable[[str], None], after_s: float = 60.0,
                 interval_s: float = 5.0, batch: int = 100, clock: Callable[[], float] = time.time) -> None:
        self.records, self.enqueue, self.after_s, self.batch, self.clock = records, enqueue, after_s, batch, clock
        self.interval_s = interval_s
        self._periodic = Periodic(name="editfarm-outbox-relay", interval_s=interval_s, task=self.sweep)

    def sweep(self) -> int:
        """One pass; returns how many deliveries were queued again.

        Raises:
            redis.RedisError, kombu.exceptions.OperationalError: Redis or the broker is unreachable.
        """
        now = self.clock()
        due = self.records.pending_due(now - self.after_s, self.batch)
        if not due:
            return 0
        ended: list[str] = []
        queued = 0
        for message_id, (state, next_at, locked) in zip(due, self.records.delivery_states(due), strict=True):
            if state != "pending":
                ended.append(message_id)
            elif locked:
                self.records.look_again(message_id, now)  # a delivery is under way: look after it ends
            elif next_at is not None and next_at > now - self.after_s:
                self.records.look_again(message_id, next_at)  # its retry is scheduled: look after that
            else:
                log.warning("webhook %s: pending with no delivery in %.0f s; queued again", message_id, self.after_s)
                self.enqueue(message_id)
                self.records.look_again(message_id, now)
                queued += 1
        self.records.forget(ended)
        return queued

    def start(self) -> object:
        """Relay every ``interval_s`` on a daemon thread."""
        return self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
