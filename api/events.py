"""Where the API reads a job's live events from (the read side of :mod:`broker.events`).

:class:`RedisEventSource` subscribes to the job's pub/sub channel with
``redis.asyncio``, one connection per subscription: a pub/sub connection is
dedicated to its subscriber anyway, and a per-stream connection is tied to the
event loop of the request that opened it. :class:`InMemoryEventBus` is a
publisher and a source in one, for unit tests without Redis.

A subscription must be closed; :class:`api.sse.EventStreamResponse` closes it
whatever way the stream ends (done, client gone, server shutting down).
"""

from __future__ import annotations

import abc
import json
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import anyio
import redis.asyncio as aioredis

from broker import keys, redis_conn
from broker.events import InMemoryEventPublisher

logger = logging.getLogger("editfarm.api")


class Subscription(abc.ABC):
    """An open subscription to one job's events."""

    @abc.abstractmethod
    async def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event (``{"type", "job_id", "time", "data"}``), or None after ``timeout`` seconds.

        Raises an exception if the subscription broke (for example Redis went away).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Unsubscribe and release the connection. Idempotent; never raises."""


class EventSource(abc.ABC):
    """Opens subscriptions to jobs' event channels."""

    @abc.abstractmethod
    async def subscribe(self, job_id: str) -> Subscription:
        """Subscribe to ``job_id``'s events; returns once the subscription is active.

        Every event published after this returns is delivered. Raises if the
        source is unavailable.
        """


def _decode_event(payload: Any) -> dict[str, Any] | None:
    """A published event from its JSON payload; None if it is not one."""
    try:
        event = json.loads(payload)
    except (TypeError, ValueError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    if not isinstance(event.get("data"), dict):
        event["data"] = {}
    return event


class RedisSubscription(Subscription):
    def __init__(self, client: aioredis.Redis, pubsub: Any) -> None:
        self._client = client
        self._pubsub = pubsub
        self._closed = False

    async def get(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
            if message is None or message.get("type") != "message":
                continue
            event = _decode_event(message.get("data"))
            if event is not None:
                return event

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # shielded: this runs while the stream's task is being cancelled (client gone)
        with anyio.CancelScope(shield=True):
            for closing in (self._pubsub, self._client):
                try:
                    await closing.aclose()
                except Exception as exc:  # noqa: BLE001 - closing a broken connection may fail; it is gone
                    logger.debug("closing an event subscription: %s", type(exc).__name__)


class RedisEventSource(EventSource):
    """Subscriptions on the Redis pub/sub channel ``broker.keys.job_events(job_id)``.

    Each is its own connection, named ``CLIENT_NAME`` in ``CLIENT LIST``.
    """

    CLIENT_NAME = "editfarm-api-events"

    def __init__(self, redis_url: str, connect_timeout_s: float = 5.0) -> None:
        self.redis_url = redis_url
        self.connect_timeout_s = connect_timeout_s

    async def subscribe(self, job_id: str) -> Subscription:
        client = redis_conn.async_client_from_url(
            self.redis_url, socket_connect_timeout=self.connect_timeout_s, socket_keepalive=True,
            client_name=self.CLIENT_NAME,
        )
        pubsub = client.pubsub()
        subscription = RedisSubscription(client, pubsub)
        try:
            with anyio.fail_after(self.connect_timeout_s):
                await pubsub.subscribe(keys.job_events(job_id))
                # wait for Redis to confirm, so nothing published from now on is missed
                while True:
                    message = await pubsub.get_message(timeout=self.connect_timeout_s)
                    if message is not None and message.get("type") == "subscribe":
                        break
        except BaseException:
            await subscription.close()
            raise
        return subscription


class _MemorySubscription(Subscription):
    def __init__(self, bus: InMemoryEventBus, job_id: str) -> None:
        self._bus = bus
        self.job_id = job_id
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.closed = False

    async def get(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                return self.queue.get_nowait()
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await anyio.sleep(min(0.005, remaining))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus._remove(self)


class InMemoryEventBus(InMemoryEventPublisher, EventSource):
    """An event publisher that is also an event source (thread-safe), for unit tests.

    ``events`` keeps every published event; subscribers get the ones published
    after they subscribed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._subscribers: list[_MemorySubscription] = []

    def publish(self, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
        super().publish(job_id, kind, data)
        event = self.events[-1]
        with self._lock:
            targets = [s for s in self._subscribers if s.job_id == job_id]
        for subscription in targets:
            subscription.queue.put(json.loads(json.dumps(event)))

    async def subscribe(self, job_id: str) -> Subscription:
        subscription = _MemorySubscription(self, job_id)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def subscriber_count(self, job_id: str) -> int:
        """Open subscriptions to ``job_id``'s events."""
        with self._lock:
            return sum(1 for s in self._subscribers if s.job_id == job_id)

    def undelivered(self, job_id: str) -> int:
        """Events published to ``job_id``'s subscribers that they have not taken yet."""
        with self._lock:
            return sum(s.queue.qsize() for s in self._subscribers if s.job_id == job_id)

    def _remove(self, subscription: _MemorySubscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)
