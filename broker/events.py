"""Progress events: what a job's watchers (SSE clients, the CLI) are told as it moves.

Events go out on a Redis pub/sub channel per job. They are a live feed only;
the job record in the JobStore stays the truth, so a watcher that connects late
reads the record first and then follows the channel.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from broker import keys

STATUS = "status"
PROGRESS = "progress"
PREVIEW = "preview"


def make_event(kind: str, job_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """An event as a plain dict: ``{"type", "job_id", "time" (epoch s), "data"}``."""
    return {"type": kind, "job_id": job_id, "time": time.time(), "data": dict(data)}


class EventPublisher(abc.ABC):
    @abc.abstractmethod
    def publish(self, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
        """Send one event; never raises for lack of listeners."""


class RedisEventPublisher(EventPublisher):
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def publish(self, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
        self.redis.publish(keys.job_events(job_id), json.dumps(make_event(kind, job_id, data)))


class InMemoryEventPublisher(EventPublisher):
    """Collects events in a list, for unit tests."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
        self.events.append(make_event(kind, job_id, data))
