"""The services the API runs on, and the FastAPI dependencies that hand them out.

Routes never build clients themselves: :func:`api.app.create_app` puts one
:class:`Services` on ``app.state.services`` (real Redis/S3/Celery, or fakes in
unit tests) and routes ask for it through :data:`ServicesDep`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
from fastapi import Depends, Request
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from api.delivery_log import DeliveryLog, InMemoryDeliveryLog, RedisDeliveryLog
from api.events import EventSource, RedisEventSource
from api.idempotency import IdempotencyStore, InMemoryIdempotencyStore, RedisIdempotencyStore
from api.limits import InMemoryRateLimiter, RateLimiter, RedisRateLimiter
from api.settings import ApiSettings
from broker import redis_conn
from broker.celery_app import RenderMessages, enqueue_notify, enqueue_webhook, make_celery
from broker.events import EventPublisher, RedisEventPublisher
from broker.store import JobStore, RedisJobStore
from broker.tenants import InMemoryTenantStore, RedisTenantStore, TenantStore
from storage.store import ObjectStore, S3ObjectStore


def _no_redeliver(message_id: str) -> None:
    raise RuntimeError("no webhook queue is configured")


@dataclass
class Services:
    """Everything a request handler may touch.

    ``render_messages`` builds a job's Celery render message, which
    :meth:`JobStore.create_and_enqueue` pushes in the same step that records the job;
    ``notify(job_id, event)`` asks a CPU worker to send
    the job's webhook for ``event`` (e.g. ``"job.canceled"``); ``redeliver(message_id)``
    queues one more delivery of a stored webhook message; both raise if the
    broker is unreachable. ``limiter`` counts submissions per tenant,
    ``idempotency`` remembers Idempotency-Keys and ``deliveries`` reads the
    webhook outbox (a job's delivery log). ``publisher`` sends a job's live events and
    ``events`` subscribes to them (SSE). ``redis`` is only used by ``/readyz``;
    None skips that check. ``closers`` run at application shutdown (a coroutine
    they return is awaited).
    """

    settings: ApiSettings
    store: JobStore
    objects: ObjectStore
    notify: Callable[[str, str], None]
    publisher: EventPublisher
    events: EventSource
    redis: redis.Redis | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)
    # API keys created with `editfarm keys create` (hashed in Redis), besides EDITFARM_API_KEYS
    tenants: TenantStore = field(default_factory=InMemoryTenantStore)
    redeliver: Callable[[str], None] = field(default=_no_redeliver)
    limiter: RateLimiter = field(default_factory=InMemoryRateLimiter)
    idempotency: IdempotencyStore = field(default_factory=InMemoryIdempotencyStore)
    deliveries: DeliveryLog = field(default_factory=InMemoryDeliveryLog)
    render_messages: RenderMessages = field(default_factory=RenderMessages)

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> Services:
        """The real cluster: Redis job store and pub/sub, S3 object store, Celery queues.

        Builds clients only; nothing connects until first use (``/readyz`` checks).
        """
        # bounded socket timeouts so a dead Redis fails a request instead of hanging it
        client = redis_conn.client_from_url(  # plain Redis or Sentinel (broker/redis_conn.py)
            settings.redis_url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30,
        )
        # the submission path (limits, record + message) runs on the event loop: no thread hops.
        # Connections are made on first use, on the loop of the server process (one per process).
        # No socket_timeout: the store and the limiter bound each call themselves (10 s), which costs
        # no task per command as redis-py's own timeout does
        # After a Redis restart every pooled connection is dead and fails its next command once:
        # retry those on a fresh connection (redis.asyncio does not by default)
        on_loop = redis_conn.async_client_from_url(
            settings.redis_url, socket_connect_timeout=5, socket_timeout=None, health_check_interval=30,
            retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        )
        celery = make_celery(settings.redis_url, settings.visibility_timeout_s)
        return cls(
            settings=settings,
            store=RedisJobStore(client, on_loop),
            objects=S3ObjectStore(settings.s3_config()),
            notify=functools.partial(enqueue_notify, celery),
            publisher=RedisEventPublisher(client),
            events=RedisEventSource(settings.redis_url),
            redis=client,
            closers=[client.close, celery.close, on_loop.aclose],
            tenants=RedisTenantStore(client),
            redeliver=functools.partial(enqueue_webhook, celery),
            limiter=RedisRateLimiter(client, on_loop),
            idempotency=RedisIdempotencyStore(client),
            deliveries=RedisDeliveryLog(client),
        )


async def get_services(request: Request) -> Services:
    """The app's :class:`Services` (set by create_app); ``async`` so FastAPI calls it on the loop
    instead of a thread-pool hop per request."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

