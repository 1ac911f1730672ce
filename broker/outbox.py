"""The webhook outbox's layout in Redis, for both of its users: the webhook workers, which store
messages and deliver them (``workers/outbox.py``), and the API, which shows and re-arms a job's
deliveries (``api/delivery_log.py``).

* ``keys.webhook_message(id)``: hash ``url, body, tenant, state (pending|delivered|failed), attempts,
  created_at, finished_at, status_code, error, next_attempt_at`` (times in epoch seconds, as text);
* ``keys.webhook_attempts(id)``: list of JSON attempts ``{attempt, at, status_code, error, duration_ms}``;
* ``keys.webhook_lock(id)``: a token held while one delivery attempt is in flight;
* ``keys.job_webhooks(job_id)``: set of the message ids a job produced (its delivery log);
* ``keys.WEBHOOK_PENDING``: sorted set of the messages that may still need a delivery (the relay's).

Every record expires ``ttl_s`` after its last write. The scripts are ``broker/lua/outbox_*.lua``.
Every method raises ``redis.RedisError`` when Redis is unreachable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from broker import keys, scripts

DEFAULT_TTL_S = 7 * 24 * 3600
"""How long a message and its attempts are kept after their last write."""

REDELIVERY_FIELDS = {"state": "pending", "attempts": "0", "finished_at": "", "status_code": "", "error": "",
                     "next_attempt_at": ""}
"""What a redelivery writes: pending again, with a fresh attempt budget and no outcome."""


def _flat(fields: Mapping[str, Any]) -> list[Any]:
    return [x for kv in fields.items() for x in kv]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def attempt_text(attempt: Mapping[str, Any]) -> str:
    """An attempt record as it is stored (compact JSON)."""
    return json.dumps(attempt, separators=(",", ":"))


class OutboxRecords:
    """The outbox's records on one Redis client (either ``decode_responses`` setting): raw fields in,
    raw hash fields and attempt texts out; what they mean is the caller's."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._put = client.register_script(scripts.source("outbox_put"))
        self._update = client.register_script(scripts.source("outbox_update"))
        self._record = client.register_script(scripts.source("outbox_record"))
        self._unlock = client.register_script(scripts.source("outbox_unlock"))
        self._claim = client.register_script(scripts.source("outbox_claim"))
        self._finish = client.register_script(scripts.source("outbox_finish"))
        self._reset = client.register_script(scripts.source("outbox_reset"))

    def put(self, message_id: str, fields: Mapping[str, Any], job_id: str | None = None) -> bool:
        """Create the message once, pending (False: it exists, unchanged); with ``job_id`` add it to that
        job's delivery log either way."""
        ks = [keys.webhook_message(message_id), keys.WEBHOOK_PENDING,
              *([keys.job_webhooks(job_id)] if job_id else [])]
        return int(self._put(keys=ks, args=[self.ttl_s, message_id, repr(time.time()), *_flat(fields)])) == 1

    def update(self, message_id: str, fields: Mapping[str, str]) -> bool:
        """Set fields of an existing message (False: no such message, nothing written)."""
        return int(self._update(keys=[keys.webhook_message(message_id)], args=[self.ttl_s, *_flat(fields)])) == 1

    def record_attempt(self, message_id: str, attempt: Mapping[str, Any]) -> int:
        """Append an attempt and bump the count; the new count (0: no such message)."""
        ks = [keys.webhook_message(message_id), keys.webhook_attempts(message_id)]
        return int(self._record(keys=ks, args=[self.ttl_s, attempt_text(attempt)]))

    def claim(self, message_id: str, token: str, lock_ttl_ms: int) -> tuple[bool, dict[Any, Any]]:
        """(whether ``token`` now holds the delivery lock — only while the message is pending —, the
        message's raw fields; empty: no such message)."""
        locked, flat = self._claim(keys=[keys.webhook_message(message_id), keys.webhook_lock(message_id)],
                                   args=[token, lock_ttl_ms])
        return bool(locked), dict(zip(flat[::2], flat[1::2], strict=True))

    def finish(self, message_id: str, attempt: Mapping[str, Any], fields: Mapping[str, str], token: str) -> int:
        """Record an attempt, set ``fields`` and release ``token``'s lock in one step; the new attempt
        count (0: no such message; the lock is released anyway)."""
        ks = [keys.webhook_message(message_id), keys.webhook_attempts(message_id), keys.webhook_lock(message_id)]
        return int(self._finish(keys=ks, args=[self.ttl_s, attempt_text(attempt), token, *_flat(fields)]))

    def lock(self, message_id: str, token: str, ttl_ms: int) -> bool:
        """Take the delivery lock for ``token`` if nobody holds it."""
        return bool(self.redis.set(keys.webhook_lock(message_id), token, nx=True, px=ttl_ms))

    def unlock(self, message_id: str, token: str) -> None:
        """Release the delivery lock if ``token`` still holds it."""
        self._unlock(keys=[keys.webhook_lock(message_id)], args=[token])

    def fields(self, message_id: str) -> dict[Any, Any]:
        """The message's raw fields (empty: no such message)."""
        return dict(self.redis.hgetall(keys.webhook_message(message_id)))

    def attempts(self, message_id: str) -> list[Any]:
        """The message's raw attempt texts, oldest first."""
        return list(self.redis.lrange(keys.webhook_attempts(message_id), 0, -1))

    def fields_and_attempts(self, message_id: str) -> tuple[dict[Any, Any], list[Any]]:
        """:meth:`fields` and :meth:`attempts` in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.webhook_message(message_id))
        pipe.lrange(keys.webhook_attempts(message_id), 0, -1)
        raw, attempts = pipe.execute()
        return dict(raw), list(attempts)

    def job_message_ids(self, job_id: str) -> set[str]:
        """The message ids in a job's delivery log."""
        return {_text(m) for m in self.redis.smembers(keys.job_webhooks(job_id))}

    def redeliver(self, message_id: str) -> bool:
        """Make the message pending again (:data:`REDELIVERY_FIELDS`), keeping its attempt log, both for
        another ``ttl_s``. False if it does not exist."""
        ks = [keys.webhook_message(message_id), keys.webhook_attempts(message_id), keys.WEBHOOK_PENDING]
        return bool(self._reset(keys=ks, args=[self.ttl_s, message_id, repr(time.time()),
                                               *_flat(REDELIVERY_FIELDS)]))

    # -- the relay's view (workers/relay.py) --

    def pending_due(self, now: float, limit: int = 100) -> list[str]:
        """Up to ``limit`` messages of the pending index due for a look at ``now`` (epoch s)."""
        return [_text(m) for m in self.redis.zrangebyscore(keys.WEBHOOK_PENDING, "-inf", repr(now), start=0,
                                                           num=limit)]

    def delivery_states(self, message_ids: list[str]) -> list[tuple[str | None, float | None, bool]]:
        """Per message: (its state, None if it is gone; its next attempt time, None if none is set;
        whether a delivery holds its lock), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for message_id in message_ids:
            pipe.hmget(keys.webhook_message(message_id), "state", "next_attempt_at")
            pipe.exists(keys.webhook_lock(message_id))
        answers = pipe.execute()
        states: list[tuple[str | None, float | None, bool]] = []
        for (state, next_at), locked in zip(answers[0::2], answers[1::2], strict=True):
            next_text = _text(next_at) if next_at is not None else ""
            states.append((_text(state) if state is not None else None, float(next_text) if next_text else None,
                           bool(locked)))
        return states

    def look_again(self, message_id: str, at: float) -> None:
        """Keep ``message_id`` in the pending index, to be looked at again at ``at`` (epoch s)."""
        self.redis.zadd(keys.WEBHOOK_PENDING, {message_id: at}, xx=True)

    def forget(self, message_ids: list[str]) -> None:
        """Take ended (or gone) messages out of the pending index."""
        if message_ids:
            self.redis.zrem(keys.WEBHOOK_PENDING, *message_ids)
