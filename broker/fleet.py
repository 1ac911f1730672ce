"""A model's live state in the fleet: which render workers serve it now and how long its renders take.

The job store knows what is queued and running per model; this module keeps what it does not: each
render worker's last heartbeat, per model (written by the worker's heartbeat thread), and the model's
last render durations (written by the worker after each render). ``GET /v1/models`` reads both.
One backend per class: :class:`RedisFleet` and, beside it, the in-memory :class:`MemoryFleet`.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import redis

from broker import keys

__all__ = ["FORGET_S", "RENDER_SAMPLES", "Fleet", "MemoryFleet", "RedisFleet"]

RENDER_SAMPLES = 50
"""Render durations kept per model: the median of the last this many renders."""


FORGET_S = 3600.0
"""A worker silent this long leaves its model's set (a pod that is gone must not grow it forever)."""


class Fleet:
    """Interface: the render workers of each model, and its recent render durations.

    A worker counts as serving its model for ``ttl_s`` after its last heartbeat said so (the worker
    knows its own heartbeat interval; the API reading this does not).
    """

    def worker_seen(self, model: str, worker: str, ttl_s: float) -> None:
        """``worker`` (ready: its model is loaded) is alive now, and counts for ``ttl_s`` more.
        Raises redis.RedisError."""
        raise NotImplementedError

    def worker_gone(self, model: str, worker: str) -> None:
        """``worker`` stopped (best effort: a killed one just goes stale). Raises redis.RedisError."""
        raise NotImplementedError

    def render_took(self, model: str, seconds: float) -> None:
        """One render of ``model`` took ``seconds``. Raises redis.RedisError."""
        raise NotImplementedError

    def workers(self, model: str) -> int:
        """Render workers of ``model`` whose heartbeat is fresh. Raises redis.RedisError."""
        raise NotImplementedError

    def median_render_s(self, model: str) -> float | None:
        """The median of ``model``'s last renders, None before the first. Raises redis.RedisError."""
        raise NotImplementedError


class RedisFleet(Fleet):
    """The fleet's state in Redis: per model, a sorted set of workers scored by when they stop counting,
    and a capped list of render durations."""

    def __init__(self, client: redis.Redis, *, clock: Callable[[], float] = time.time) -> None:
        self.redis, self.clock = client, clock

    def worker_seen(self, model: str, worker: str, ttl_s: float) -> None:
        now = self.clock()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.model_workers(model), {worker: now + ttl_s})
        pipe.zremrangebyscore(keys.model_workers(model), "-inf", now - FORGET_S)
        pipe.execute()

    def worker_gone(self, model: str, worker: str) -> None:
        self.redis.zrem(keys.model_workers(model), worker)

    def render_took(self, model: str, seconds: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(keys.render_seconds(model), f"{seconds:.3f}")
        pipe.ltrim(keys.render_seconds(model), 0, RENDER_SAMPLES - 1)
        pipe.execute()

    def workers(self, model: str) -> int:
        return int(self.redis.zcount(keys.model_workers(model), f"({self.clock()!r}", "+inf"))

    def median_render_s(self, model: str) -> float | None:
        samples = [float(v) for v in self.redis.lrange(keys.render_seconds(model), 0, RENDER_SAMPLES - 1)]
        return statistics.median(samples) if samples else None


class MemoryFleet(Fleet):
    """The same in one process (unit tests, the in-memory API)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, float]] = {}
        self._renders: dict[str, list[float]] = {}

    def worker_seen(self, model: str, worker: str, ttl_s: float) -> None:
        with self._lock:
            self._seen.setdefault(model, {})[worker] = self.clock() + ttl_s

    def worker_gone(self, model: str, worker: str) -> None:
        with self._lock:
            self._seen.get(model, {}).pop(worker, None)

    def render_took(self, model: str, seconds: float) -> None:
        with self._lock:
            samples = self._renders.setdefault(model, [])
            samples.insert(0, seconds)
            del samples[RENDER_SAMPLES:]

    def workers(self, model: str) -> int:
        now = self.clock()
        with self._lock:
            return sum(1 for until in self._seen.get(model, {}).values() if until > now)

    def median_render_s(self, model: str) -> float | None:
        with self._lock:
            samples = list(self._renders.get(model, []))
        return statistics.median(samples) if samples else None
