"""What the job routes share: the public view of a job, its base URL, the 503 and error responses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from api.deps import Services
from api.errors import STORE_ERRORS, ApiError, ErrorResponse
from api.metrics import ApiMetrics
from broker.retention import data_removed
from broker.schema import ErrorCode, Job, JobStatus
from broker.views import job_view

logger = logging.getLogger("editfarm.api")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "invalid_json / invalid_request", 401: "unauthorized", 404: "not_found",
        413: "payload_too_large", 415: "unsupported_media_type",
        422: "missing_field / invalid_parameter / unknown_operation / missing_image / invalid_image / "
             "unsupported_image_format / image_too_large / image_fetch_failed / url_not_allowed",
        503: "unavailable (object store, job store or queue) / store_unavailable (POST /v1/jobs: the job store's "
             "replicas did not confirm the job in time; retry with the same Idempotency-Key)",
    }.items()
}


def unavailable(what: str) -> ApiError:
    return ApiError(503, ErrorCode.UNAVAILABLE, f"{what} is unavailable; retry later")


async def tenant_job_or_404(services: Services, job_id: str, tenant: str) -> Job:
    """The tenant's job; 404 not_found for an unknown id or another tenant's job; 503 if the store is down."""
    try:
        job = await run_in_threadpool(services.store.get_for_tenant, job_id, tenant)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable reading a job: %s", type(exc).__name__)
        raise unavailable("the job store") from None
    if job is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, "no such job")
    return job


# (scheme, server, Host header, root path) → the request's base URL: building it with Starlette's URL
# parses and reassembles it on every request, for an answer that rarely changes. Bounded: the Host
# header is the client's to choose.
_BASE_URLS: dict[tuple[Any, ...], str] = {}
_BASE_URLS_MAX = 64


def public_base_url(request: Request, services: Services) -> str:
    configured = services.settings.public_base_url.rstrip("/")
    if configured:
        return configured
    scope = request.scope
    server = scope.get("server")  # a tuple from uvicorn, a list from some test clients
    key = (scope.get("scheme"), tuple(server) if server else None, request.headers.get("host"),
           scope.get("root_path"), scope.get("app_root_path"))
    cached = _BASE_URLS.get(key)
    if cached is None:
        cached = str(request.base_url).rstrip("/")
        if len(_BASE_URLS) < _BASE_URLS_MAX:
            _BASE_URLS[key] = cached
    return cached


def presign(services: Services, key: str) -> str:
    return services.objects.presign_get(key, services.settings.presign_expiry_s)


def public_view(job: Job, base_url: str, services: Services, queue_position: int | None) -> dict[str, Any]:
    """The public view of ``job``: :func:`broker.views.job_view` plus ``queue_position`` after ``status``."""
    view: dict[str, Any] = {}
    removed = data_removed(job, services.settings.object_retention_days)
    for name, value in job_view(job, lambda key: presign(services, key), base_url, data_removed=removed).items():
        view[name] = value
        if name == "status":
            view["queue_position"] = queue_position if job.status is JobStatus.QUEUED else None
    return view


def read_view(job: Job, base_url: str, services: Services) -> dict[str, Any]:
    """The view with the job's current queue position (blocking; raises the store's errors)."""
    position = services.store.queue_position(job.id, job.params.model) if job.status is JobStatus.QUEUED else None
    return public_view(job, base_url, services, position)


def metrics_of(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics

