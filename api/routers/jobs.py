"""/v1/jobs: list and read jobs, cancel them, watch them (SSE). Submission is :mod:`api.routers.submit`."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import TenantDep
from api.deps import Services, ServicesDep
from api.errors import STORE_ERRORS, ApiError, ErrorResponse, from_validation_errors
from api.intake import capped_stream, reject_constant
from api.models import CancelRequest, JobList, JobOut
from api.retention import archived_job
from api.sse import EventStreamResponse, JobEventStream
from api.views import (
    ERRORS,
    metrics_of,
    presign,
    public_base_url,
    public_view,
    read_view,
    tenant_job_or_404,
    unavailable,
)
from broker import events
from broker.schema import ErrorCode, Job, JobStatus, model_of
from storage import StorageUnavailable

logger = logging.getLogger("editfarm.api")
router = APIRouter(tags=["jobs"])


@router.get(
    "/v1/jobs/{job_id}", summary="Get a job", response_model=None,
    responses={200: {"model": JobOut, "description": "The job."}, **ERRORS},
)
async def get_job(job_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """The job with presigned output URLs and, while queued, its ``queue_position``.

    Another tenant's job answers exactly like an unknown id (404). A finished job that left Redis
    (its retention) answers from the archive when EDITFARM_ARCHIVE_JOBS is on."""
    job = await _live_or_archived(services, job_id, tenant)
    try:
        view = await run_in_threadpool(read_view, job, public_base_url(request, services), services)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable reading a job: %s", type(exc).__name__)
        raise unavailable("the job store") from None
    # presigned URLs are credentials for a while: keep them out of shared caches
    return JSONResponse(view, headers={"Cache-Control": "no-store"})


async def _live_or_archived(services: Services, job_id: str, tenant: str) -> Job:
    """The tenant's job from Redis, else from the archive. Raises ApiError 404, or 503 when a store
    is down."""
    try:
        return await tenant_job_or_404(services, job_id, tenant)
    except ApiError as exc:
        if exc.status_code != 404 or not services.settings.archive_jobs:
            raise
    try:
        job = await run_in_threadpool(archived_job, services, job_id, tenant)
    except StorageUnavailable:
        logger.warning("object store unavailable reading an archived job")
        raise unavailable("the object store") from None
    if job is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, "no such job")
    return job


# -- listing -------------------------------------------------------------------------------------

# jobs examined per list request when a status filter skips most of them; the page then ends early
# with a next_cursor, so one request never scans a tenant's whole history
_LIST_SCAN_LIMIT = 1000
_LIST_BATCH = 100


def _encode_cursor(position: tuple[float, str]) -> str:
    raw = json.dumps({"c": position[0], "i": position[1]}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    """(created_at, job id) of the last job of the previous page. Raises ApiError 422 invalid_parameter."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        created, job_id = data["c"], data["i"]
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
            raise ValueError("bad time")
        if not isinstance(job_id, str) or not 0 < len(job_id) <= 64:
            raise ValueError("bad id")
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise ApiError(422, ErrorCode.INVALID_PARAMETER, "cursor is not one this API returned",
                       param="cursor") from None
    return float(created), job_id


def _parse_statuses(values: list[str] | None) -> frozenset[JobStatus]:
    """``status=queued&status=running`` or ``status=queued,running``; empty → no filter."""
    statuses: set[JobStatus] = set()
    for value in values or []:
        for name in (v.strip() for v in value.split(",")):
            if not name:
                continue
            try:
                statuses.add(JobStatus(name))
            except ValueError:
                allowed = ", ".join(s.value for s in JobStatus)
                raise ApiError(422, ErrorCode.INVALID_PARAMETER, f"status must be one of: {allowed}",
                               param="status") from None
    return frozenset(statuses)


def _list_page(services: Services, tenant: str, statuses: frozenset[JobStatus], limit: int,
               after: tuple[float, str] | None, base_url: str) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the tenant's jobs, newest first, and the cursor of the next one (blocking)."""
    store = services.store
    page: list[dict[str, Any]] = []
    position = after
    examined = 0
    while len(page) < limit and examined < _LIST_SCAN_LIMIT:
        want = _LIST_BATCH if statuses else limit - len(page)
        batch = store.tenant_job_ids_before(tenant, position, want)
        for job_id, created in batch:
            examined += 1
            position = (created, job_id)
            job = store.get(job_id)
            if job is None or job.tenant != tenant or (statuses and job.status not in statuses):
                continue
            page.append(read_view(job, base_url, services))
            if len(page) == limit:
                break
        else:
            if len(batch) < want:
                return page, None  # the tenant's history is exhausted
    if position is None or not store.tenant_job_ids_before(tenant, position, 1):
        return page, None
    return page, _encode_cursor(position)


@router.get(
    "/v1/jobs", summary="List your jobs", response_model=None,
    responses={200: {"model": JobList, "description": "A page of jobs, newest first."},
               **{k: v for k, v in ERRORS.items() if k in (401, 422, 503)}},
)
async def list_jobs(
    request: Request, tenant: TenantDep, services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page (1..100).")] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    status: Annotated[list[str] | None, Query(
        description="Only jobs in these statuses: repeat the parameter or comma-separate "
                    "(`queued,running`).")] = None,
) -> JSONResponse:
    """The caller's jobs, newest first, with cursor pagination.

    Follow ``next_cursor`` until it is null. Cursors stay valid while new jobs
    arrive (new jobs appear on the first page, never shift later ones). With a
    status filter a page may hold fewer than ``limit`` jobs, or none, while
    ``next_cursor`` is still set. The list ends with the oldest job still in Redis:
    jobs past their retention are not listed (``includes_archived`` is false), even when
    archived; ``GET /v1/jobs/{id}`` reads those.
    """
    statuses = _parse_statuses(status)
    after = _decode_cursor(cursor) if cursor else None
    try:
        page, next_cursor = await run_in_threadpool(
            _list_page, services, tenant, statuses, limit, after, public_base_url(request, services))
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable listing jobs: %s", type(exc).__name__)
        raise unavailable("the job store") from None
    return JSONResponse({"data": page, "next_cursor": next_cursor, "includes_archived": False},
                        headers={"Cache-Control": "no-store"})


# -- cancel --------------------------------------------------------------------------------------

_CANCEL_BODY_LIMIT = 16 * 1024
_CANCEL_BODY = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/CancelRequest"}},
}}}


async def _cancel_reason(request: Request) -> str | None:
    """``reason`` from the optional JSON body. Raises ApiError 400/413/415/422."""
    raw = b"".join([chunk async for chunk in capped_stream(request, _CANCEL_BODY_LIMIT)])
    if not raw.strip():
        return None
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "the cancel body must be application/json")
    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except ValueError:
        raise ApiError(400, ErrorCode.INVALID_JSON, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "request body must be a JSON object")
    try:
        reason = CancelRequest.model_validate(body).reason
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None
    if reason is None or not reason.strip():
        return None
    return reason.strip()


def _finished(job: Job) -> ApiError:
    return ApiError(409, ErrorCode.JOB_FINISHED, f"the job already ended ({job.status.value})")


def _cancel(services: Services, job: Job, message: str) -> Job:
    """Move ``job`` to canceled with a compare-and-set on its current status (blocking).

    The notify task's ``job.canceled`` message is pushed by the transition itself, as a worker's
    terminal transitions push theirs: a job is never canceled without its webhook being asked
    for (the notify task sends it only if the job has a webhook), and never asked twice. A lost
    race re-reads the job and tries again from its new status; a job that became terminal
    meanwhile is 409 job_finished.
    """
    error = {"code": ErrorCode.CANCELED.value, "message": message}
    current: Job | None = job
    for _ in range(5):
        if current is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "no such job")
        if current.status.is_terminal:
            raise _finished(current)
        moved = services.store.transition(
            job.id, JobStatus.CANCELED, {"finished_at": time.time(), "lease_until": None, "error": error},
            from_=[current.status], push=services.notify_messages.build(job.id, "job.canceled"),
        )
        if moved is not None:
            return moved
        current = services.store.get_for_tenant(job.id, job.tenant)
    raise ApiError(503, ErrorCode.UNAVAILABLE, "the job kept changing state; retry the cancel")


@router.post(
    "/v1/jobs/{job_id}/cancel", summary="Cancel a job", response_model=None,
    responses={200: {"model": JobOut, "description": "Canceled; the job as it is now."},
               409: {"model": ErrorResponse, "description": "job_finished: it already ended"},
               **{k: v for k, v in ERRORS.items() if k in (400, 401, 404, 413, 415, 422, 503)}},
    openapi_extra=_CANCEL_BODY,
)
async def cancel_job(job_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """Cancel a queued or running job; an optional ``{"reason": "..."}`` goes into its error message.

    A queued job never starts; a running one stops at its next denoising step.
    The job ends ``canceled`` with error code ``canceled``, watchers get a
    ``status`` event and the job's webhook (if any) is sent once as
    ``job.canceled``. A job that already ended is 409 ``job_finished``.
    """
    job = await tenant_job_or_404(services, job_id, tenant)
    reason = await _cancel_reason(request)
    message = f"canceled by request: {reason}" if reason else "canceled by request"
    try:
        canceled = await run_in_threadpool(_cancel, services, job, message)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable canceling %s: %s", job_id, type(exc).__name__)
        raise unavailable("the job store") from None
    metrics_of(request).job_canceled(model_of(job))
    logger.info("canceled %s (was %s) for tenant %s", job_id, job.status.value, tenant)
    status_event = {"status": canceled.status.value,
                    "error": canceled.error.model_dump() if canceled.error else None}
    try:
        await run_in_threadpool(services.publisher.publish, job_id, events.STATUS, status_event)
    except Exception as exc:  # noqa: BLE001 - watchers also re-read the record; the cancel stands
        logger.warning("could not publish the cancel of %s: %s", job_id, type(exc).__name__)
    view = public_view(canceled, public_base_url(request, services), services, None)
    return JSONResponse(view, headers={"Cache-Control": "no-store"})


# -- events (SSE) --------------------------------------------------------------------------------

_SSE_DOC = """Server-Sent Events. Frames: `status` (the full job view; first on connect, then after every
status change), `progress` (`{"step","total"}`, throttled), `preview` (`{"step","key","url"}`), `done`
(the final view; then the stream closes); `: ping` comments keep the connection alive."""
# OpenAPI 3.1 reads the `schema` of text/event-stream as the schema of one event
_SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string", "description": "status | progress | preview | done"},
    "data": {"type": "string", "contentMediaType": "application/json", "description": "JSON text"},
    "id": {"type": "string"}, "retry": {"type": "integer"}}}


@router.get(
    "/v1/jobs/{job_id}/events", summary="Watch a job (Server-Sent Events)", response_model=None,
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {"schema": _SSE_EVENT_SCHEMA}}, "description": _SSE_DOC},
               **{k: v for k, v in ERRORS.items() if k in (401, 404, 503)}},
)
async def job_events(job_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> Response:
    """Stream the job's state as ``text/event-stream`` until it ends.

    The current state comes first (``event: status``), so a client that connects
    late misses nothing; a job that already ended gets ``status`` and ``done``
    and the stream closes. Unknown or another tenant's job: 404 before any stream.
    """
    await tenant_job_or_404(services, job_id, tenant)
    try:
        subscription = await services.events.subscribe(job_id)
    except Exception as exc:  # noqa: BLE001 - no pub/sub, no stream
        logger.warning("could not subscribe to the events of %s: %s", job_id, type(exc).__name__)
        raise unavailable("the event feed") from None
    try:
        # subscribed first, then read: whatever changes from here on is either in this read or on the feed
        job = await tenant_job_or_404(services, job_id, tenant)
        base_url = public_base_url(request, services)

        async def read() -> Job | None:
            return await run_in_threadpool(services.store.get_for_tenant, job_id, tenant)

        async def render(current: Job) -> dict[str, Any]:
            return await run_in_threadpool(read_view, current, base_url, services)

        stream = JobEventStream(first=job, subscription=subscription, read=read, render=render,
                                presign=lambda key: presign(services, key), settings=services.settings)
        return EventStreamResponse(stream, subscription)
    except BaseException:
        await subscription.close()
        raise
