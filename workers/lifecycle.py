"""A worker process's liveness and shutdown: its heartbeat, and its drain window after SIGTERM.

- :class:`Heartbeat`: a thread that touches the heartbeat file (``editfarm probe live``) and
  renews the process's heartbeat key in Redis; both go stale if the process wedges.
- :class:`Drain`: at SIGTERM the worker's main process records a drain deadline in Redis; the
  render child's runner reads it (:meth:`Drain.draining`) and hands a running job back once the
  deadline has passed. The key carries a per-start instance id: a restarted worker must not
  inherit its predecessor's deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from broker import keys

log = logging.getLogger("editfarm.worker")


def touch(path: str, text: str = "") -> None:
    """Write ``text`` (default: the time now) to ``path``, its folder made if needed; '' is no file."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text or str(time.time()))


class Heartbeat:
    """This process's liveness, beaten every ``interval_s`` by a daemon thread. ``also``: called at
    each beat after the Redis key (a render worker: it is alive for its model, broker/fleet.py)."""

    def __init__(self, *, redis_client: redis.Redis, process_name: str, file: str, interval_s: float,
                 also: Callable[[], None] | None = None) -> None:
        self.redis, self.process_name, self.file, self.interval_s = redis_client, process_name, file, interval_s
        self.also = also

    def beat(self) -> None:
        """One beat: the file first (it is what the liveness probe reads), then the Redis key
        (expiring after six missed beats). Raises OSError, redis.RedisError."""
        touch(self.file)
        self.redis.set(keys.worker_heartbeat(self.process_name), str(time.time()),
                       ex=int(self.interval_s * 6) + 1)
        if self.also is not None:
            self.also()

    def _loop(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the file matters most; Redis may blink
                log.warning("heartbeat not recorded")
            time.sleep(self.interval_s)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, daemon=True, name="editfarm-heartbeat")
        thread.start()
        return thread


class Drain:
    """This worker's drain deadline in Redis under ``key`` (:meth:`key_for`)."""

    # the deadline is read from Redis at most this often per process (the runner asks every step)
    CHECK_INTERVAL_S = 1.0

    def __init__(self, *, redis_client: redis.Redis, key: str, timeout_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis, self.key, self.timeout_s, self.clock = redis_client, key, timeout_s, clock
        self._checked_at = float("-inf")
        self._drain_by = 0.0  # 0: no deadline set

    @staticmethod
    def key_for(process_name: str, instance: str) -> str:
        """The drain key of a worker process: its name plus its per-start instance id."""
        return keys.worker_drain(f"{process_name}:{instance}")

    def start(self) -> None:
        """Called in the worker's main process at SIGTERM: a running job gets ``timeout_s`` to finish.
        Raises redis.RedisError (then the job's lease lapses and the reaper re-sends it)."""
        drain_by = self.clock() + self.timeout_s
        self.redis.set(self.key, repr(drain_by), ex=int(self.timeout_s) + 3600)
        log.info("draining: a running job has %.0f s to finish before it is handed back", self.timeout_s)

    def draining(self) -> bool:
        """True once the drain window has passed. Raises redis.RedisError."""
        now = self.clock()
        if now - self._checked_at >= self.CHECK_INTERVAL_S:
            self._checked_at = now
            raw = self.redis.get(self.key)
            self._drain_by = float(raw) if raw else 0.0
        return bool(self._drain_by) and now >= self._drain_by
