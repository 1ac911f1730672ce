"""The worker process's services, built lazily once per process.

Lazily, because Celery's prefork parent imports this module and forks: Redis
connections, boto3 clients and above all CUDA must be created in the child.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from broker import keys, redis_conn
from broker.celery_app import (
    RENDER_QUEUE_ORDER,
    RENDER_QUEUES,
    NotifyMessages,
    RenderMessages,
    enqueue_notify,
    enqueue_render,
    enqueue_webhook,
    make_celery,
)
from broker.events import RedisEventPublisher
from broker.schema import Job
from broker.store import RedisJobStore
from broker.tenants import RedisTenantStore
from storage import S3Config, S3ObjectStore, StorageUnavailable
from workers import malloc, metrics
from workers.loras import LoraResolver, LoraSettings
from workers.notify import WebhookNotifier
from workers.pipeline.base import Renderer
from workers.pipelining import Pipelining, for_this_process
from workers.reaper import Reaper
from workers.runner import Runner, RunnerConfig
from workers.settings import WorkerSettings
from workers.webhooks import WebhookConfig, WebhookOutbox, make_client

log = logging.getLogger("editfarm.worker")


@functools.cache
def settings() -> WorkerSettings:
    return WorkerSettings()


@functools.cache
def celery_app():  # type: ignore[no-untyped-def]
    s = settings()
    return make_celery(s.redis_url, s.visibility_timeout_s, s.unacked_restore_interval_s)


@functools.cache
def _redis(pid: int) -> redis.Redis:
    return redis_conn.client_from_url(settings().redis_url, health_check_interval=30, socket_connect_timeout=5,
                                      socket_timeout=30)


def redis_client() -> redis.Redis:
    # keyed by pid: a connection pool must never be shared across fork
    return _redis(os.getpid())


def store() -> RedisJobStore:
    return RedisJobStore(redis_client())


@functools.cache
def _objects(pid: int) -> S3ObjectStore:
    s = settings()
    secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None
    return S3ObjectStore(S3Config(bucket=s.s3_bucket, endpoint_url=s.s3_endpoint_url, region=s.s3_region,
                                  access_key_id=s.s3_access_key_id, secret_access_key=secret,
                                  path_style=s.s3_path_style))


def objects() -> S3ObjectStore:
    return _objects(os.getpid())


def outbox() -> WebhookOutbox:
    return WebhookOutbox(redis_client())


# A tenant's signing secrets are read from Redis at most once per this many seconds per process,
# not on every delivery attempt: a rotation (`editfarm secrets rotate`) reaches deliveries within
# this delay, during which messages carry the previous secret's signature only (still valid: a
# rotation keeps the previous secret through its overlap, 24 h by default).
WEBHOOK_CONFIG_CACHE_S = 5.0
_webhook_configs: dict[str, tuple[float, WebhookConfig]] = {}  # tenant ("": none) → (expires, config)
_clock = time.monotonic  # the cache's clock (tests move it)


def webhook_config(tenant: str | None = None) -> WebhookConfig:
    """Delivery settings; a tenant with its own (rotated) secrets signs with those. Cached for
    WEBHOOK_CONFIG_CACHE_S (see there). Raises redis.RedisError."""
    now = _clock()
    cached = _webhook_configs.get(tenant or "")
    if cached is not None and now < cached[0]:
        return cached[1]
    s = settings()
    secrets = [s.webhook_secret.get_secret_value()] if s.webhook_secret else []
    if tenant:
        secrets = RedisTenantStore(redis_client()).signing_secrets(tenant) or secrets
    config = WebhookConfig(secrets=secrets, timeout_s=s.webhook_timeout_s,
                           max_attempts=len(s.webhook_retry_schedule_s),
                           retry_schedule_s=tuple(s.webhook_retry_schedule_s),
                           allow_private=s.webhook_allow_private, allow_http=s.webhook_allow_http)
    if len(_webhook_configs) > 10_000:  # bound the cache (tenants come and go)
        _webhook_configs.clear()
    _webhook_configs[tenant or ""] = (now + WEBHOOK_CONFIG_CACHE_S, config)
    return config


@functools.cache
def _http(pid: int) -> httpx.Client:
    # no redirects, no proxies from the environment (they would bypass the URL policy)
    return make_client(webhook_config())


def http_client() -> httpx.Client:
    return _http(os.getpid())


@functools.cache
def device() -> str:
    """The device this process renders on: EDITFARM_DEVICE, with 'auto' → 'cuda' if a GPU is
    visible, else 'cpu'. Touches CUDA: call only in the child."""
    requested = settings().device
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_renderer: Renderer | None = None


def renderer() -> Renderer:
    """The process's one model, loaded on first use (from_pretrained of EDITFARM_MODEL)."""
    global _renderer
    if _renderer is None and settings().renderer == "standin":
        from workers.standin import StandinRenderer

        log.warning("RENDER STAND-IN selected (EDITFARM_RENDERER=standin): no model, tests/benchmarks only")
        _renderer = StandinRenderer(settings().standin_render_s)
    if _renderer is None:
        from workers.pipeline import load_renderer

        s = settings()
        if not s.model:
            raise RuntimeError("EDITFARM_MODEL is not set (a model folder or hub id)")
        log.info("loading model %s on %s", s.model, device())
        _renderer = load_renderer(s.model, device(), compile_blocks=s.compile_transformer)
    return _renderer


def gpu_memory() -> dict[str, int]:
    """Bytes allocated by this process per CUDA device (empty on CPU or before the model loads)."""
    if _renderer is None or not str(_renderer.device).startswith("cuda"):
        return {}
    import torch

    return {str(_renderer.device): int(torch.cuda.memory_allocated())}


def _touch(path: str, text: str = "") -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text or str(time.time()))


def _heartbeat_loop(interval_s: float) -> None:
    """Liveness: the heartbeat file and Redis key go stale if this process wedges."""
    s = settings()
    while True:
        try:
            _touch(s.heartbeat_file)
            redis_client().set(keys.worker_heartbeat(s.process_name()), str(time.time()),
                               ex=int(interval_s * 6) + 1)
        except Exception:  # noqa: BLE001 - the file matters most; Redis may blink
            log.warning("heartbeat not recorded")
        time.sleep(interval_s)


def start_background(role: str) -> None:
    """Per-process threads: heartbeat and metrics (both roles), the reaper (webhook workers)."""
    s = settings()
    threading.Thread(target=_heartbeat_loop, args=(s.heartbeat_interval_s,), daemon=True,
                     name="editfarm-heartbeat").start()
    metrics.serve(s.metrics_port, store, gpu_memory)
    if role == "webhooks":
        reaper().start()


def _renders_on_cpu() -> bool:
    """Whether this process renders a real model on the CPU (touches CUDA: child only)."""
    s = settings()
    return s.renderer != "standin" and device() == "cpu"


def warm_up() -> None:
    """Load the model, check the device, run one short render, warm the rest of a job's path,
    then write the ready file."""
    tune_malloc = _renders_on_cpu() and settings().reuse_cpu_memory
    if tune_malloc:
        malloc.one_arena()  # before the model load and the warm-up render start any thread
    r = renderer()
    r.healthcheck()
    r.warmup()
    if tune_malloc and malloc.keep_freed_memory():
        log.info("CPU rendering: freed memory is kept for the next step (EDITFARM_REUSE_CPU_MEMORY)")
    warm_job_path()
    _touch(settings().ready_file, str(os.getpid()))
    log.info("worker warm and ready")


def warm_job_path() -> None:
    """Pay now, before the ready file, what a process's first job would pay inside its lease: the
    Redis connection, the boto3 client and its first request (~0.2 s of CPU), the encoders and the
    operations module, the render lane's and finisher's threads. Eight workers starting together on
    a busy host otherwise stretch their first jobs by ~0.4 s each (bench.scaleout's p99). An
    unreachable Redis or S3 is only logged: jobs wait for Redis and hand back on S3 errors."""
    from PIL import Image

    from broker.schema import OutputFormat
    from workers import encode, operations  # noqa: F401 - imported for its import cost

    try:
        redis_client().ping()
    except redis.RedisError as exc:
        log.warning("warm-up: Redis unreachable (%s); jobs will wait for it", type(exc).__name__)
    try:
        objects().check()
    except StorageUnavailable as exc:
        log.warning("warm-up: object store unreachable (%s)", exc)
    for fmt in OutputFormat:
        encode.encode_output(Image.new("RGB", (8, 8)), fmt)
    pipelining().start()


def requeue(job: Job) -> None:
    enqueue_render(celery_app(), job.id, job.params.priority.value)


@functools.cache
def _notify_app():  # type: ignore[no-untyped-def]
    # The same broker, without Celery's task-sent event: that event is one more Redis publish after
    # the message on the path that ends every job (a GPU worker's). Flower still sees the notify
    # task from the webhook worker's task-received/started/succeeded events.
    s = settings()
    app = make_celery(s.redis_url, s.visibility_timeout_s, s.unacked_restore_interval_s)
    app.conf.task_send_sent_event = False
    return app


def notify_via_queue(job: Job, event: str) -> None:
    enqueue_notify(_notify_app(), job.id, event)


def queue_webhook(message_id: str, countdown_s: float = 0) -> None:
    """Queue a delivery attempt of a stored message (the webhook task), ``countdown_s`` from now."""
    enqueue_webhook(celery_app(), message_id, countdown_s=countdown_s)


def _drain_key() -> str:
    """This worker process's drain key: its name plus a per-start instance id."""
    return keys.worker_drain(f"{settings().process_name()}:{os.environ.get('EDITFARM_WORKER_INSTANCE', '')}")


_drain_checked = [0.0, 0.0]  # (last check, drain_by)


def draining() -> bool:
    """True once this worker's drain window (set at SIGTERM) has passed; checked at most once a second."""
    now = time.time()
    if now - _drain_checked[0] >= 1.0:
        _drain_checked[0] = now
        raw = redis_client().get(_drain_key())
        _drain_checked[1] = float(raw) if raw else 0.0
    return bool(_drain_checked[1]) and now >= _drain_checked[1]


def start_drain() -> None:
    """Called in the worker's main process at SIGTERM: running jobs get drain_timeout_s to finish."""
    s = settings()
    drain_by = time.time() + s.drain_timeout_s
    redis_client().set(_drain_key(), repr(drain_by), ex=int(s.drain_timeout_s) + 3600)
    log.info("draining: a running job has %.0f s to finish before it is handed back", s.drain_timeout_s)


def runner_config() -> RunnerConfig:
    s = settings()
    return RunnerConfig(worker_name=s.process_name(), lease_s=s.lease_s,
                        heartbeat_interval_s=s.heartbeat_interval_s, max_attempts=s.max_attempts,
                        transient_retry_s=s.transient_retry_s, preview_every_n_steps=s.preview_every_n_steps,
                        lane_lead_s=s.lane_lead_s, progress_interval_s=s.progress_interval_s)


def pipelining() -> Pipelining:
    """This process's render lane and background finisher (per pid: threads don't survive fork)."""
    s = settings()
    return for_this_process(lambda: Pipelining(s.finish_in_background, s.render_lane))


@functools.cache
def _render_messages() -> RenderMessages:
    return RenderMessages()


def give_way(job: Job) -> bool:
    """If a render message of a higher priority than ``job``'s waits in Celery's Redis lists, put
    ``job``'s message back first in its own queue (RPUSH: the consumer pops from the right) and say so.

    Only messages no worker has taken are in those lists, so jobs waiting in other workers' render
    lanes do not count. Raises redis errors.
    """
    mine = RENDER_QUEUES[job.params.priority.value]
    if not _messages_wait(RENDER_QUEUE_ORDER[:RENDER_QUEUE_ORDER.index(mine)]):
        return False
    queue, message = _render_messages().build(job.id, job.params.priority.value)
    redis_client().rpush(queue, message)
    return True


def _messages_wait(queues: tuple[str, ...]) -> bool:
    """Whether any of these Celery Redis lists holds a message no worker has taken yet."""
    if not queues:
        return False
    pipe = redis_client().pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    return any(pipe.execute())


@functools.cache
def _notify_messages() -> NotifyMessages:
    return NotifyMessages()


def terminal_message(job_id: str, event: str) -> tuple[str, str]:
    """The notify task's message for a job's terminal event, pushed with the transition itself."""
    return _notify_messages().build(job_id, event)


def jobs_waiting() -> bool:
    """Whether any render message waits in Celery's Redis lists (not yet taken by a worker)."""
    return _messages_wait(RENDER_QUEUE_ORDER)


@functools.cache
def _lora_settings() -> LoraSettings:
    # read once per process: parsing the environment costs ~0.6 ms, and a Runner is made per task
    return LoraSettings()


def runner() -> Runner:
    loras = LoraResolver.from_settings(objects(), _lora_settings())
    return Runner(store(), objects(), RedisEventPublisher(redis_client()), renderer(), notify_via_queue,
                  runner_config(), requeue=requeue, draining=draining, observe=metrics.observe, loras=loras,
                  pipelining=pipelining(), give_way=give_way, jobs_waiting=jobs_waiting,
                  terminal_message=terminal_message)


def notifier(deliver: Callable[[str], None]) -> WebhookNotifier:
    """The notify task's notifier; ``deliver(message_id)`` sends a message it has stored."""
    s = settings()
    objs = objects()
    return WebhookNotifier(outbox(), lambda key: objs.presign_get(key, s.presign_expiry_s), deliver,
                           webhook_config, http_client())


def reaper() -> Reaper:
    s = settings()
    # expiring needs no model: a runner without a renderer only makes transitions
    finisher = Runner(store(), objects(), RedisEventPublisher(redis_client()), None, notify_via_queue,
                      runner_config(), observe=metrics.observe, terminal_message=terminal_message)

    def claim(job_id: str, lease_until: float) -> bool:
        return bool(redis_client().set(keys.reaped(job_id, lease_until), "1", nx=True, ex=3600))
    return Reaper(store(), requeue, finisher.expired, claim, s.reaper_interval_s)
