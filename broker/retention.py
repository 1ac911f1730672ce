"""Retention: how long a finished job stays in Redis, and the expiry index the sweeper reads.

A terminal job waits in ``keys.EXPIRY`` scored by ``finished_at + params.retention_s`` (written by
``lua/reindex.lua`` in the transition that ends it). ``lua/sweep_job.lua`` deletes one due job after
checking again, atomically, that it is still terminal and due. The retention a job gets is settled at
submission (:func:`job_retention_s`): the tenant's (``keys.tenant_retention``, else
``EDITFARM_JOB_RETENTION_S``), or a shorter one the job asked for.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from broker import keys, scripts
from broker.schema import Job

DEFAULT_JOB_RETENTION_S = 7 * 24 * 3600
"""EDITFARM_JOB_RETENTION_S's default; lua/reindex.lua uses it for records that carry none."""

MAX_JOB_RETENTION_S = 10 * 365 * 24 * 3600
"""The longest retention a job parameter or tenant setting may name."""

SWEEP_SCRIPT = scripts.source("reindex", "sweep_job")
BACKFILL_SCRIPT = scripts.source("reindex", "expiry_backfill")

DELETED, GONE, NOT_TERMINAL, NOT_DUE, WEBHOOK_NOT_STORED = 1, 0, -1, -2, -3
"""lua/sweep_job.lua's answers."""

NOTIFY_GRACE_S = 7 * 24 * 3600
"""A finished job that asked for a webhook waits at most this long for its terminal message to be
stored (the outbox's own TTL: past it a stored message may have expired)."""

WEBHOOK_RETRY_S = 60.0
"""How long a job waiting for its terminal webhook message waits before the next try."""

# the index sets lua/sweep_job.lua receives as KEYS[2..7] (the same order as the job store's)
_INDEX_KEYS = (*keys.QUEUED_ALL, keys.RUNNING, keys.INFLIGHT, keys.DEADLINES)


class RetentionTooLong(ValueError):
    """A job asked to be kept longer than its tenant's retention."""

    def __init__(self, asked_s: int, allowed_s: int) -> None:
        super().__init__(f"retention_s may be at most {allowed_s} (the tenant's retention), not {asked_s}")
        self.asked_s, self.allowed_s = asked_s, allowed_s


def job_retention_s(asked_s: int | None, tenant_s: int | None, default_s: int) -> int:
    """The retention a new job gets: the tenant's (``tenant_s``, else ``default_s``), or ``asked_s``
    when shorter.

    Raises:
        RetentionTooLong: ``asked_s`` is longer than the tenant's retention.
    """
    allowed = tenant_s if tenant_s is not None else default_s
    if asked_s is None:
        return allowed
    if asked_s > allowed:
        raise RetentionTooLong(asked_s, allowed)
    return asked_s


def data_removed(job: Job, object_retention_days: int, now: float | None = None) -> bool:
    """Whether the bucket's lifecycle rule (EDITFARM_OBJECT_RETENTION_DAYS; 0: off) has deleted the
    finished job's objects by ``now``: its record then says so instead of handing out dead links."""
    if object_retention_days <= 0 or job.finished_at is None or not job.status.is_terminal:
        return False
    now = time.time() if now is None else now
    return job.finished_at + object_retention_days * 86400 < now


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RetentionIndex:
    """The expiry index and the deletion of due jobs, on one Redis client (single node: the script
    derives the tenant's keys and the webhook messages' keys from the record)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._sweep = client.register_script(SWEEP_SCRIPT)
        self._backfill = client.register_script(BACKFILL_SCRIPT)

    def due(self, now: float, limit: int = 100) -> list[str]:
        """Up to ``limit`` job ids whose retention ended before ``now``, the longest-due first.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        rows: list[Any] = list(self.redis.zrangebyscore(keys.EXPIRY, "-inf", f"({now!r}", start=0, num=limit))
        return [_text(r) for r in rows]

    def expires_at(self, job_id: str) -> float | None:
        """When the job may leave Redis (None: not terminal, or no such job)."""
        score = self.redis.zscore(keys.EXPIRY, job_id)
        return None if score is None else float(score)

    def delete(self, job_id: str, now: float, *, notify_grace_s: float = NOTIFY_GRACE_S,
               retry_s: float = WEBHOOK_RETRY_S) -> int:
        """Delete the job if it is still terminal and due at ``now`` and, when it asked for a webhook,
        its terminal message is stored (or ``notify_grace_s`` passed since it finished):
        :data:`DELETED`, or why not (:data:`GONE`, :data:`NOT_TERMINAL`, :data:`NOT_DUE`,
        :data:`WEBHOOK_NOT_STORED`: tried again ``retry_s`` later).

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        script_keys = [keys.job(job_id), *_INDEX_KEYS, keys.EXPIRY, keys.job_webhooks(job_id)]
        return int(self._sweep(keys=script_keys, args=[job_id, repr(now), repr(notify_grace_s), repr(retry_s)]))

    def size(self) -> int:
        """Terminal jobs still in Redis."""
        return int(self.redis.zcard(keys.EXPIRY))

    def backfill(self, batch: int = 1000) -> int:
        """Index the terminal jobs that ended before retention existed (a SCAN over the job hashes:
        run once after upgrading, `editfarm retention backfill`); how many were added.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        added = 0
        prefix = keys.job("")
        for raw in self.redis.scan_iter(match=f"{prefix}*", count=batch, _type="hash"):
            key = _text(raw)
            job_id = key[len(prefix):]
            if ":" in job_id:  # editfarm:job:<id>:webhooks and the like
                continue
            added += int(self._backfill(keys=[key, keys.EXPIRY], args=[job_id]))
        return added
