"""A worker process's services, wired in one place: :class:`WorkerServices`.

Built once per process at its start (``workers/celery_worker.py``) and handed to the tasks: a
render worker's pool child builds its own after fork (Redis connections, boto3 clients and above
all CUDA must be made in the child; the Celery parent never touches CUDA), a webhook worker's
main process builds one for its reaper, heartbeat and task threads. Building makes clients only:
nothing connects until first use, except the model load of :meth:`WorkerServices.for_render`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from broker import keys, redis_conn
from broker.catalog import CatalogError, ModelSpec, load_catalog
from broker.celery_app import NotifyMessages, enqueue_notify, enqueue_webhook, make_celery
from broker.events import RedisEventPublisher
from broker.fleet import RedisFleet
from broker.jobstore import RedisJobStore
from broker.outbox import OutboxRecords
from broker.retention import RetentionIndex
from broker.schema import Job
from broker.tenants import RedisTenantStore
from storage import S3Config, S3ObjectStore, StorageUnavailable
from workers import malloc, metrics
from workers.lifecycle import Drain, Heartbeat, touch
from workers.loras import LoraResolver, LoraSettings
from workers.notify import WebhookNotifier
from workers.object_sweeper import ObjectSweeper
from workers.pipeline.base import Renderer
from workers.pipelining import Pipelining
from workers.reaper import Reaper
from workers.relay import OutboxRelay
from workers.render_queue import CeleryRenderQueue
from workers.runner import Runner, RunnerConfig
from workers.serving import served_model
from workers.settings import WorkerSettings
from workers.sweeper import RetentionSweeper
from workers.transitions import Transitions
from workers.webhook_configs import WebhookConfigs
from workers.webhooks import WebhookOutbox, make_client

log = logging.getLogger("editfarm.worker")


def worker_celery(settings: WorkerSettings) -> Any:
    """The workers' Celery app (tasks are registered on it by ``workers.celery_worker``)."""
    return make_celery(settings.redis_url, settings.visibility_timeout_s, settings.unacked_restore_interval_s)


def connect_redis(settings: WorkerSettings) -> redis.Redis:
    """A Redis client for this process (a connection pool must never be shared across fork)."""
    return redis_conn.client_from_url(settings.redis_url, health_check_interval=30, socket_connect_timeout=5,
                                      socket_timeout=30)


def drain_of(settings: WorkerSettings, redis_client: redis.Redis) -> Drain:
    """This worker's drain (its per-start instance id is set in the environment at Celery's start)."""
    key = Drain.key_for(settings.process_name(), os.environ.get("EDITFARM_WORKER_INSTANCE", ""))
    return Drain(redis_client=redis_client, key=key, timeout_s=settings.drain_timeout_s)


def _consumed_queues(celery: Any) -> tuple[str, ...] | None:
    """The queues ``celery`` (a worker's app) consumes, None when it names none (all of them)."""
    try:
        return tuple(celery.amqp.queues.consume_from) or None
    except AttributeError:
        return None


def runner_config(settings: WorkerSettings) -> RunnerConfig:
    s = settings
    return RunnerConfig(worker_name=s.process_name(), lease_s=s.lease_s,
                        heartbeat_interval_s=s.heartbeat_interval_s, max_attempts=s.max_attempts,
                        transient_retry_s=s.transient_retry_s, preview_every_n_steps=s.preview_every_n_steps,
                        lane_lead_s=s.lane_lead_s, progress_interval_s=s.progress_interval_s)


def render_device(settings: WorkerSettings) -> str:
    """The device to render on: EDITFARM_DEVICE, with 'auto' → 'cuda' if a GPU is visible, else
    'cpu'. Touches CUDA: call only in the pool child."""
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_renderer(settings: WorkerSettings, device: str, spec: ModelSpec | None = None) -> Renderer:
    """The process's one model: the stand-in, or from_pretrained on ``device`` of ``spec`` (the
    catalog entry this worker serves: its source, as its pipeline class, with its fused LoRAs,
    scheduler overrides and profile; see ``workers.render_setup``), or without one of
    EDITFARM_MODEL as a QwenImageEditPipeline serving every operation.

    Raises:
        RuntimeError: no ``spec`` and EDITFARM_MODEL is not set (and what loading the model raises).
    """
    if settings.renderer == "standin":
        from workers.standin import StandinRenderer

        log.warning("RENDER STAND-IN selected (EDITFARM_RENDERER=standin): no model, tests/benchmarks only")
        return StandinRenderer(settings.standin_render_s)
    from workers.pipeline import load_renderer as load_model

    source = spec.source if spec is not None else settings.model
    if not source:
        raise RuntimeError("EDITFARM_MODEL is not set (a model folder or hub id)")
    from workers.render_setup import load_options

    options = load_options(settings, spec)
    log.info("loading model %s from %s as %s on %s (profile %s)", spec.name if spec is not None else "(EDITFARM_MODEL)",
             source, options["pipeline"], device, options["profile"].name)
    return load_model(source, device, **options)


def _observe(fleet: RedisFleet, model: str, name: str, value: float) -> None:
    """The runner's metrics hook, plus the model's render times that GET /v1/models reports."""
    metrics.observe(name, value)
    if name == "render":
        try:
            fleet.render_took(model, value)
        except redis.RedisError:
            log.warning("render time of %s not recorded", model)


@dataclass
class WorkerServices:
    """Everything a worker process's tasks and threads use. ``renderer``, ``pipelining`` and
    ``runner`` are set in a render worker only (:meth:`for_render`)."""

    settings: WorkerSettings
    redis: redis.Redis
    celery: Any  # sends tasks: re-sent renders, webhook retries
    notify_celery: Any  # sends the non-terminal notify tasks (see :meth:`connect`)
    objects: S3ObjectStore
    store: RedisJobStore
    publisher: RedisEventPublisher
    queue: CeleryRenderQueue
    transitions: Transitions
    webhook_configs: WebhookConfigs
    outbox: WebhookOutbox
    drain: Drain
    heartbeat: Heartbeat
    renderer: Renderer | None = None
    pipelining: Pipelining | None = None
    runner: Runner | None = None
    model: str | None = None  # the model a render worker serves (workers/serving.py)

    @classmethod
    def connect(cls, settings: WorkerSettings, *, celery: Any, model: str | None = None) -> WorkerServices:
        """The services of any worker process, without a model. ``celery``: the workers' app; ``model``: the
        model whose queues a render worker consumes (None: a webhook worker's, which consumes none)."""
        s = settings
        client = connect_redis(s)
        secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None
        objects = S3ObjectStore(S3Config(bucket=s.s3_bucket, endpoint_url=s.s3_endpoint_url, region=s.s3_region,
                                         access_key_id=s.s3_access_key_id, secret_access_key=secret,
                                         path_style=s.s3_path_style))
        # The same broker, without Celery's task-sent event: that event is one more Redis publish
        # after the message on the path that ends every job (a GPU worker's). Flower still sees the
        # notify task from the webhook worker's task-received/started/succeeded events.
        notify_celery = worker_celery(s)
        notify_celery.conf.task_send_sent_event = False
        store = RedisJobStore(client, replicas=s.replica_policy(metrics.replica_shortfall))
        publisher = RedisEventPublisher(client)
        notify_messages = NotifyMessages()

        def notify(job: Job, event: str) -> None:
            enqueue_notify(notify_celery, job.id, event)
        transitions = Transitions(store=store, publisher=publisher, notify=notify, config=runner_config(s),
                                  observe=metrics.observe, terminal_message=notify_messages.build)
        webhook_configs = WebhookConfigs(settings=s, tenants=RedisTenantStore(client))
        return cls(
            settings=s, redis=client, celery=celery, notify_celery=notify_celery, objects=objects, store=store,
            publisher=publisher,
            # the queues this worker consumes: its -Q, selected in the Celery parent before the fork
            queue=CeleryRenderQueue(redis_client=client, celery=celery, model=model,
                                    consumed=_consumed_queues(celery), give_way_wait_s=s.give_way_wait_s),
            transitions=transitions, webhook_configs=webhook_configs, outbox=WebhookOutbox(client),
            drain=drain_of(s, client),
            heartbeat=Heartbeat(redis_client=client, process_name=s.process_name(), file=s.heartbeat_file,
                                interval_s=s.heartbeat_interval_s),
        )

    @classmethod
    def for_render(cls, settings: WorkerSettings, *, celery: Any, renderer: Renderer | None = None) -> WorkerServices:
        """A render worker's services: :meth:`connect`'s, the model loaded (``renderer``: one made
        already, e.g. a benchmark's), the render lane and the runner. Touches CUDA: pool child only."""
        served = served_model(settings)
        services = cls.connect(settings, celery=celery, model=served.name)
        services.model = served.name
        metrics.set_model(served.name)
        if renderer is None:
            device = render_device(settings)
            if settings.renderer != "standin" and device == "cpu" and settings.reuse_cpu_memory:
                malloc.one_arena()  # before the model load and the warm-up render start any thread
            renderer = load_renderer(settings, device, served.spec)
        services.renderer = renderer
        metrics.model_loaded(served.name, renderer.identity())
        services.pipelining = Pipelining(settings.finish_in_background, settings.render_lane)
        fleet = RedisFleet(services.redis)
        name = settings.process_name()
        # counted as its model's worker until three beats are missed (GET /v1/models)
        services.heartbeat.also = functools.partial(fleet.worker_seen, served.name, name,
                                                    3 * settings.heartbeat_interval_s)
        services.runner = Runner(
            transitions=services.transitions, objects=services.objects, renderer=renderer, queue=services.queue,
            config=services.transitions.config, pipelining=services.pipelining, draining=services.drain.draining,
            observe=functools.partial(_observe, fleet, served.name),
            loras=LoraResolver.from_settings(services.objects, LoraSettings()), model=served.name,
        )
        return services

    def leave_fleet(self) -> None:
        """A render worker that stops: its model no longer counts it (best effort: a killed one goes stale)."""
        if self.model is None:
            return
        try:
            RedisFleet(self.redis).worker_gone(self.model, self.settings.process_name())
        except redis.RedisError:
            log.warning("could not take this worker out of its model's workers")

    # -- a render worker's start -----------------------------------------------------------------

    def warm_up(self) -> None:
        """Check the device, run one short render, warm the rest of a job's path, then write the
        ready file."""
        assert self.renderer is not None, "warm_up is for render workers (for_render)"
        self.renderer.healthcheck()
        self.renderer.warmup()
        if self._renders_on_cpu() and self.settings.reuse_cpu_memory and malloc.keep_freed_memory():
            log.info("CPU rendering: freed memory is kept for the next step (EDITFARM_REUSE_CPU_MEMORY)")
        self.warm_job_path()
        touch(self.settings.ready_file, str(os.getpid()))
        log.info("worker warm and ready")

    def _renders_on_cpu(self) -> bool:
        return self.settings.renderer != "standin" and str(getattr(self.renderer, "device", "")) == "cpu"

    def warm_job_path(self) -> None:
        """Pay now, before the ready file, what a process's first job would pay inside its lease:
        the Redis connection, the boto3 client and its first request, the encoders and the
        operations module, the render lane's and finisher's threads (several workers starting
        together on a busy host otherwise stretch their first jobs: bench.scaleout's p99). An
        unreachable Redis or S3 is only logged: jobs wait for Redis and hand back on S3 errors."""
        from PIL import Image

        from broker.schema import OutputFormat
        from workers import encode, operations  # noqa: F401 - imported for its import cost

        try:
            self.redis.ping()
        except redis.RedisError as exc:
            log.warning("warm-up: Redis unreachable (%s); jobs will wait for it", type(exc).__name__)
        try:
            self.objects.check()
        except StorageUnavailable as exc:
            log.warning("warm-up: object store unreachable (%s)", exc)
        for fmt in OutputFormat:
            encode.encode_output(Image.new("RGB", (8, 8)), fmt)
        if self.pipelining is not None:
            self.pipelining.start()

    def gpu_memory(self) -> dict[str, int]:
        """Bytes allocated by this process per CUDA device (empty on CPU or without a model)."""
        if self.renderer is None or not str(self.renderer.device).startswith("cuda"):
            return {}
        import torch

        return {str(self.renderer.device): int(torch.cuda.memory_allocated())}

    def start_background(self, role: str) -> None:
        """Per-process threads: heartbeat and metrics (both roles), the reaper, the retention sweeper
        and, with ``EDITFARM_OBJECT_SWEEPER``, the object sweeper (webhook workers)."""
        self.heartbeat.start()
        metrics.serve(self.settings.metrics_port, lambda: self.store, self.gpu_memory, self.models)
        if role == "webhooks":
            self.reaper().start()
            self.sweeper().start()
            self.relay().start()
            if (objects := self.object_sweeper()) is not None:
                objects.start()

    @functools.cached_property
    def models(self) -> tuple[str, ...]:
        """The models this process looks after (its /metrics, a webhook worker's reaper): a render worker's
        own; a webhook worker's catalog (every model), read once, or the one-model cluster's."""
        if self.model is not None:
            return (self.model,)
        s = self.settings
        if not (s.models_file or s.model):
            return (keys.LEGACY_MODEL,)
        try:
            return load_catalog(models_file=s.models_file, model=s.model).names
        except CatalogError as exc:
            log.error("%s; looking after the one-model cluster's queues only", exc)
            return (keys.LEGACY_MODEL,)

    # -- webhooks --------------------------------------------------------------------------------

    @functools.cached_property
    def http(self) -> httpx.Client:
        """The webhook deliveries' client (kept alive between them), made on first use: a render
        worker delivers none and may have no webhook secret set. No redirects, no proxies from the
        environment (they would bypass the URL policy). Raises ValueError: no webhook secret."""
        return make_client(self.webhook_configs())

    def queue_webhook(self, message_id: str, countdown_s: float = 0) -> None:
        """Queue a delivery attempt of a stored message (the webhook task), ``countdown_s`` from now."""
        enqueue_webhook(self.celery, message_id, countdown_s=countdown_s)

    def notifier(self, deliver: Callable[[str], None]) -> WebhookNotifier:
        """The notify task's notifier; ``deliver(message_id)`` sends a message it has stored."""
        expiry_s = self.settings.presign_expiry_s
        return WebhookNotifier(self.outbox, lambda key: self.objects.presign_get(key, expiry_s), deliver,
                               self.webhook_configs, self.http)

    def reaper(self) -> Reaper:
        def claim(job_id: str, lease_until: float) -> bool:
            return bool(self.redis.set(keys.reaped(job_id, lease_until), "1", nx=True, ex=3600))
        after_s = self.settings.stranded_after_s

        def claim_stranded(job_id: str) -> bool:
            return bool(self.redis.set(keys.resent(job_id), "1", nx=True, ex=max(1, int(after_s))))

        # every model's queues: a webhook worker's reaper looks after the whole fleet
        models = [self.queue.by_model.of(model) for model in self.models]

        def find_stranded(before_s: float) -> list[str]:
            return [job_id for queue in models for job_id in queue.stranded(before_s)]

        return Reaper(store=self.store, transitions=self.transitions, queue=self.queue, claim=claim,
                      interval_s=self.settings.reaper_interval_s, find_stranded=find_stranded,
                      claim_stranded=claim_stranded, stranded_after_s=after_s,
                      stranded_every_s=min(30.0, after_s / 2))

    def object_sweeper(self) -> ObjectSweeper | None:
        """The object sweeper if this process runs one (``EDITFARM_OBJECT_SWEEPER`` with an object
        retention); None otherwise."""
        s = self.settings
        if not s.object_sweeper:
            return None
        if s.object_retention_days <= 0:
            log.warning("EDITFARM_OBJECT_SWEEPER is on but EDITFARM_OBJECT_RETENTION_DAYS is 0: objects are kept")
            return None
        return ObjectSweeper(objects=self.objects, store=self.store, retention_s=s.object_retention_days * 86400,
                             interval_s=s.object_sweep_interval_s)

    def relay(self) -> OutboxRelay:
        """The outbox relay: a pending webhook message whose delivery was lost gets one again."""
        return OutboxRelay(records=OutboxRecords(self.redis), enqueue=self.queue_webhook,
                           after_s=self.settings.webhook_relay_after_s,
                           interval_s=min(5.0, self.settings.webhook_relay_after_s / 2))

    def sweeper(self) -> RetentionSweeper:
        return RetentionSweeper(store=self.store, index=RetentionIndex(self.redis),
                                archive=self.objects if self.settings.archive_jobs else None,
                                interval_s=self.settings.retention_sweep_interval_s)
