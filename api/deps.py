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

from api.delivery_log import DeliveryLog, RedisDeliveryLog
from api.events import EventSource, RedisEventSource
from api.idempotency import IdempotencyStore, RedisIdempotencyStore
from api.limits import RateLimiter, RedisRateLimiter
from api.settings import ApiSettings
from broker import redis_conn
from broker.catalog import Catalog, load_catalog
from broker.celery_app import NotifyMessages, enqueue_webhook, make_celery
from broker.events import EventPublisher, RedisEventPublisher
from broker.fleet import Fleet, MemoryFleet, RedisFleet
from broker.jobstore import JobStore, RedisJobStore
from broker.queues import RenderQueues
from broker.settings import ClusterSettings
from broker.tenants import RedisTenantStore, TenantStore
from storage.store import ObjectStore, S3ObjectStore


def api_catalog(settings: ClusterSettings | None = None) -> Catalog:
    """The API's model catalog: ``EDITFARM_MODELS_FILE``, else ``EDITFARM_MODEL`` alone, else (the
    API does not load weights, so it need not know where they are) the one-model catalog whose
    workers name the weights themselves.

    Raises:
        CatalogError: the file is invalid, or both settings are set.
    """
    if settings is not None and (settings.models_file or settings.model):
        return load_catalog(models_file=settings.models_file, model=settings.model)
    return Catalog.single("(EDITFARM_MODEL of the render workers)")


@dataclass(kw_only=True)
class Services:
    """Everything a request handler may touch. Each service is given explicitly (the real ones by
    :meth:`from_settings`, in-memory ones by ``editfarm_testing.api.fake_services``): none defaults to a
    fake that would pass unnoticed in production.

    ``catalog`` names the models jobs may ask for (``EDITFARM_MODELS_FILE``; the one-model catalog
    otherwise). ``render_queues`` builds a job's Celery render message for its model's queues, which
    :meth:`JobStore.create_and_enqueue` pushes in the same step that records the job;
    ``notify_messages`` builds the notify task's message that a cancel pushes with its
    transition (the job's ``job.canceled`` webhook is asked for in the same atomic step);
    ``redeliver(message_id)`` queues one more delivery of a stored webhook message (raises if
    the broker is unreachable). ``tenants`` holds the API keys created with ``editfarm keys
    create`` (hashed in Redis), besides EDITFARM_API_KEYS. ``limiter`` counts submissions per
    tenant, ``idempotency`` remembers Idempotency-Keys and ``deliveries`` reads the webhook
    outbox (a job's delivery log). ``publisher`` sends a job's live events and ``events``
    subscribes to them (SSE). ``redis`` is only used by ``/readyz``; None skips that check.
    ``closers`` run at application shutdown (a coroutine they return is awaited).
    """

    settings: ApiSettings
    store: JobStore
    objects: ObjectStore
    publisher: EventPublisher
    events: EventSource
    tenants: TenantStore
    redeliver: Callable[[str], None]
    limiter: RateLimiter
    idempotency: IdempotencyStore
    deliveries: DeliveryLog
    redis: redis.Redis | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)
    # message builders: pure functions of their arguments, the same in tests and production
    render_queues: RenderQueues = field(default_factory=RenderQueues)
    # which workers serve each model, and its render times (GET /v1/models)
    fleet: Fleet = field(default_factory=MemoryFleet)
    catalog: Catalog = field(default_factory=api_catalog)
    notify_messages: NotifyMessages = field(default_factory=NotifyMessages)

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
            catalog=api_catalog(settings),
            store=RedisJobStore(client, on_loop, replicas=settings.replica_policy()),
            objects=S3ObjectStore(settings.s3_config()),
            publisher=RedisEventPublisher(client),
            events=RedisEventSource(settings.redis_url),
            redis=client,
            closers=[client.close, celery.close, on_loop.aclose],
            tenants=RedisTenantStore(client),
            fleet=RedisFleet(client),
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

