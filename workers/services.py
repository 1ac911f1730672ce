"""The worker process's services, built lazily once per process.

Lazily, because Celery's prefork parent imports this module and forks: Redis
connections, boto3 clients and above all CUDA must be created in the child.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import httpx
import redis

from broker.celery_app import enqueue_webhook, make_celery
from broker.events import RedisEventPublisher
from broker.store import RedisJobStore
from storage import S3Config, S3ObjectStore
from workers.notify import WebhookNotifier
from workers.pipeline.base import Renderer
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
    return make_celery(s.redis_url, s.visibility_timeout_s)


@functools.cache
def _redis(pid: int) -> redis.Redis:
    return redis.Redis.from_url(settings().redis_url, health_check_interval=30)


def redis_client() -> redis.Redis:
    # keyed by pid: a connection pool must never be shared across fork
    return _redis(os.getpid())


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


def webhook_config() -> WebhookConfig:
    s = settings()
    secrets = [s.webhook_secret.get_secret_value()] if s.webhook_secret else []
    return WebhookConfig(secrets=secrets, timeout_s=s.webhook_timeout_s,
                         max_attempts=len(s.webhook_retry_schedule_s),
                         retry_schedule_s=tuple(s.webhook_retry_schedule_s),
                         allow_private=s.webhook_allow_private, allow_http=s.webhook_allow_http)


@functools.cache
def _http(pid: int) -> httpx.Client:
    # no redirects, no proxies from the environment (they would bypass the URL policy)
    return make_client(webhook_config())


def http_client() -> httpx.Client:
    return _http(os.getpid())


def resolve_device(requested: str) -> str:
    """'auto' → 'cuda' if a GPU is visible, else 'cpu'. Touches CUDA: call only in the child."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_renderer: Renderer | None = None


def renderer() -> Renderer:
    """The process's one model, loaded on first use (from_pretrained of EDITFARM_MODEL)."""
    global _renderer
    if _renderer is None:
        from workers.pipeline import load_renderer

        s = settings()
        if not s.model:
            raise RuntimeError("EDITFARM_MODEL is not set (a model folder or hub id)")
        device = resolve_device(s.device)
        log.info("loading model %s on %s", s.model, device)
        _renderer = load_renderer(s.model, device)
    return _renderer


def warm_up() -> None:
    """Load the model, run one short render and write the ready file, before taking work."""
    r = renderer()
    r.healthcheck()
    r.warmup()
    ready = settings().ready_file
    if ready:
        Path(ready).parent.mkdir(parents=True, exist_ok=True)
        Path(ready).write_text(str(os.getpid()))
    log.info("worker warm and ready")


def runner() -> Runner:
    s = settings()
    objs = objects()
    app = celery_app()
    notify = WebhookNotifier(outbox(), lambda key: objs.presign_get(key, s.presign_expiry_s),
                             lambda message_id: enqueue_webhook(app, message_id))
    config = RunnerConfig(worker_name=s.process_name(), lease_s=s.lease_s,
                          heartbeat_interval_s=s.heartbeat_interval_s, max_attempts=s.max_attempts,
                          transient_retry_s=s.transient_retry_s)
    return Runner(RedisJobStore(redis_client()), objs, RedisEventPublisher(redis_client()),
                  renderer(), notify, config)
