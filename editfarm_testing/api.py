"""In-process fakes for tests of the API (and of anything that drives it).

``fake_services()`` gives in-memory job and object stores (the job store keeps the
Celery messages pushed with its records and transitions: :func:`queued` reads the render
messages, :func:`notified` the notify messages), a redeliver that only records its calls, an
in-memory tenant store, rate limiter, idempotency store and delivery log, and an in-memory event
bus (publisher and SSE source in one), so a TestClient can run every route offline.
"""

from __future__ import annotations

import base64
import json

from pydantic import SecretStr

from api.delivery_log import InMemoryDeliveryLog
from api.deps import Services
from api.events import InMemoryEventBus
from api.idempotency import InMemoryIdempotencyStore
from api.limits import InMemoryRateLimiter
from api.settings import ApiSettings
from broker.celery_app import RENDER_QUEUES, WEBHOOK_QUEUE, render_job_id
from broker.jobstore import InMemoryJobStore
from broker.tenants import InMemoryTenantStore
from storage.store import InMemoryObjectStore

TEST_KEYS = {"acme": "key-acme-0123456789", "globex": "key-globex-9876543210"}


def make_settings(**overrides: object) -> ApiSettings:
    """ApiSettings with two tenants (see TEST_KEYS) that ignore the environment for keys."""
    values: dict[str, object] = {
        "api_keys": SecretStr(",".join(f"{t}:{k}" for t, k in TEST_KEYS.items())),
        **overrides,
    }
    return ApiSettings(**values)  # type: ignore[arg-type]


def queued(services: Services) -> list[tuple[str, str]]:
    """``(job id, priority)`` of every render message the in-memory job store was given, oldest first."""
    pushed: list[tuple[str, str]] | None = getattr(services.store, "pushed", None)
    assert pushed is not None, "queued() reads the messages an InMemoryJobStore was given"
    priority_of = {queue: priority for priority, queue in RENDER_QUEUES.items()}
    return [(render_job_id(message), priority_of[queue]) for queue, message in pushed if queue in priority_of]


def notified(services: Services) -> list[tuple[str, str]]:
    """``(job id, event)`` of every notify message the in-memory job store pushed, oldest first."""
    pushed: list[tuple[str, str]] | None = getattr(services.store, "pushed", None)
    assert pushed is not None, "notified() reads the messages an InMemoryJobStore was given"
    return [notify_args(message) for queue, message in pushed if queue == WEBHOOK_QUEUE]


def notify_args(message: str | bytes) -> tuple[str, str]:
    """The ``(job id, event)`` a notify task's Celery message carries."""
    args = json.loads(base64.b64decode(json.loads(message)["body"]))[0]
    return str(args[0]), str(args[1])


class RecordingRedeliver:
    """A redeliver function that appends message ids to ``sent``; ``down = True`` makes it raise."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = False

    def __call__(self, message_id: str) -> None:
        if self.down:
            raise ConnectionError("queue is down")
        self.sent.append(message_id)


def fake_services(settings: ApiSettings | None = None) -> Services:
    """Services over InMemoryJobStore, InMemoryObjectStore, a RecordingRedeliver, in-memory
    tenant store, rate limiter, idempotency store and delivery log, and one InMemoryEventBus as
    both publisher and event source (redis=None)."""
    bus = InMemoryEventBus()
    store = InMemoryJobStore()
    return Services(
        settings=settings or make_settings(),
        store=store,
        objects=InMemoryObjectStore(),
        publisher=bus,
        events=bus,
        tenants=InMemoryTenantStore(),
        redeliver=RecordingRedeliver(),
        limiter=InMemoryRateLimiter(store),
        idempotency=InMemoryIdempotencyStore(),
        deliveries=InMemoryDeliveryLog(),
    )
