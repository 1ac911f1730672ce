"""The outbox relay on real Redis: a pending message whose delivery was lost is queued again; one being
delivered, one with a retry scheduled, or one ended is not (workers/relay.py)."""

from __future__ import annotations

import time

import redis

from broker import keys
from broker.outbox import OutboxRecords
from workers.relay import OutboxRelay

AFTER_S = 30.0


def stored(records: OutboxRecords, message_id: str, **fields: str) -> None:
    assert records.put(message_id, {"url": "https://hooks.example/x", "body": b"{}", "tenant": "acme",
                                    "state": "pending", "attempts": "0", **fields})


def test_a_pending_message_nobody_delivers_is_queued_again_once_per_wait(redis_client: redis.Redis) -> None:
    records = OutboxRecords(redis_client)
    start = time.time()
    now = [start]
    queued: list[str] = []
    relay = OutboxRelay(records=records, enqueue=queued.append, after_s=AFTER_S, clock=lambda: now[0])
    stored(records, "lost")
    stored(records, "delivering")
    stored(records, "retrying", next_attempt_at=repr(now[0] + 3600))
    stored(records, "delivered")
    stored(records, "gone")
    assert relay.sweep() == 0 and queued == []  # too young: its first delivery may still be on its way
    assert records.lock("delivering", "token", 600_000)
    records.update("delivered", {"state": "delivered"})
    redis_client.delete(keys.webhook_message("gone"))
    now[0] += AFTER_S + 1
    assert relay.sweep() == 1 and queued == ["lost"]
    pending = {m.decode() for m in redis_client.zrange(keys.WEBHOOK_PENDING, 0, -1)}
    assert pending == {"lost", "delivering", "retrying"}  # the ended and the gone are dropped
    assert relay.sweep() == 0 and queued == ["lost"]  # handed a delivery just now: not again yet
    now[0] += AFTER_S + 1
    assert relay.sweep() == 1 and queued == ["lost", "lost"]  # still pending: lost again, sent again
    # the retry's own time comes: looked at then, and queued only once it is overdue by the wait
    now[0] = start + 3600 + 1
    relay.sweep()
    assert queued.count("retrying") == 0
    now[0] += AFTER_S + 1
    relay.sweep()
    assert queued.count("retrying") == 1


def test_a_redelivery_puts_an_ended_message_back_in_the_relays_index(redis_client: redis.Redis) -> None:
    records = OutboxRecords(redis_client)
    stored(records, "m")
    records.update("m", {"state": "failed"})
    records.forget(["m"])
    assert redis_client.zscore(keys.WEBHOOK_PENDING, "m") is None
    assert records.redeliver("m")
    assert redis_client.zscore(keys.WEBHOOK_PENDING, "m") is not None
