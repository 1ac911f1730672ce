"""/v1/jobs/{id}/deliveries: a job's webhook delivery log, and redelivery of a message.

Read from the webhook workers' outbox through :class:`api.delivery_log.DeliveryLog`; a
redelivery re-arms the stored message (pending, a fresh attempt budget, its log kept) and queues
the ``editfarm.webhook`` task, so the receiver gets the same ``webhook-id`` and body again.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.auth import TenantDep
from api.delivery_log import TERMINAL_EVENTS, Delivery
from api.deps import Services, ServicesDep
from api.errors import STORE_ERRORS, ApiError, ErrorResponse
from api.views import tenant_job_or_404, unavailable
from broker.schema import ErrorCode, Job

logger = logging.getLogger("editfarm.api")
router = APIRouter(tags=["webhooks"])



class DeliveryAttemptOut(BaseModel):
    attempt: int | None = Field(description="1-based number of the attempt (restarts at 1 after a redelivery)")
    at: str | None = Field(description="When the attempt started, ISO-8601 UTC")
    status_code: int | None = Field(description="The receiver's HTTP status; null if none came back")
    error: str | None = Field(description="Why it did not count as delivered (`http 500`, `timeout: …`)")
    duration_ms: int | None


class DeliveryOut(BaseModel):
    message_id: str = Field(description="The `webhook-id` header; the same on every attempt")
    event: str = Field(description="`job.succeeded`, `job.failed`, `job.canceled` or `job.started`")
    url: str = Field(description="The job's webhook URL")
    state: str = Field(description="pending (being delivered or retried) | delivered | failed (gave up)")
    attempts: list[DeliveryAttemptOut] = Field(description="Every attempt, oldest first")
    created_at: str | None = Field(description="When the message was stored, ISO-8601 UTC")
    finished_at: str | None = Field(description="When it was delivered or given up, ISO-8601 UTC")


class DeliveryList(BaseModel):
    data: list[DeliveryOut] = Field(description="The job's webhook messages, oldest first")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "unauthorized", 404: "not_found: unknown job (or another tenant's), or message_id",
            409: "job_not_finished / no_webhook", 422: "invalid_parameter",
            503: "unavailable (the job store or the webhook queue)"}
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


async def _deliveries(services: Services, job: Job) -> list[Delivery]:
    try:
        return await run_in_threadpool(services.deliveries.for_job, job.id, job.tenant)
    except STORE_ERRORS as exc:
        logger.warning("webhook outbox unavailable: %s", type(exc).__name__)
        raise unavailable("the webhook outbox") from None


@router.get(
    "/v1/jobs/{job_id}/deliveries", summary="A job's webhook deliveries", response_model=None,
    responses={200: {"model": DeliveryList, "description": "The job's webhook messages and their attempts."},
               **_errors(401, 404, 503)},
)
async def list_deliveries(job_id: str, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """Every webhook message the job produced (`job.started`, its terminal event), with each delivery
    attempt: when, the receiver's status code, the error, how long it took. Empty for a job without a
    webhook or one whose messages expired (7 days after their last change). Another tenant's job is 404."""
    job = await tenant_job_or_404(services, job_id, tenant)
    deliveries = await _deliveries(services, job)
    return JSONResponse({"data": [d.view() for d in deliveries]}, headers={"Cache-Control": "no-store"})


def _pick(job: Job, deliveries: list[Delivery], message_id: str | None) -> Delivery:
    if message_id is not None:
        for delivery in deliveries:
            if delivery.message_id == message_id:
                return delivery
        raise ApiError(404, ErrorCode.NOT_FOUND, "this job has no webhook message with that id",
                       param="message_id")
    terminal = [d for d in deliveries if d.event in TERMINAL_EVENTS]
    if not terminal:
        raise ApiError(409, ErrorCode.NO_WEBHOOK,
                       f"no webhook message of the job's end ({job.status.value}) is stored: it is not "
                       "created yet (retry in a moment) or it expired")
    return terminal[-1]


@router.post(
    "/v1/jobs/{job_id}/deliveries/redeliver", status_code=202, summary="Send a job's webhook again",
    response_model=None,
    responses={202: {"model": DeliveryOut, "description": "Queued; the message as it is now (pending)."},
               **_errors(401, 404, 409, 422, 503)},
)
async def redeliver(
    job_id: str, tenant: TenantDep, services: ServicesDep,
    message_id: Annotated[str | None, Query(
        max_length=256, description="Which message (from the delivery log); default: the job's terminal "
                                    "event (`job.succeeded`/`job.failed`/`job.canceled`).")] = None,
) -> JSONResponse:
    """Deliver a finished job's webhook message again, with the same `webhook-id` and body (receivers
    that dedupe on `webhook-id` will see a duplicate: that is what makes this safe).

    The message becomes `pending` with a fresh retry schedule; earlier attempts stay in the log.
    409 `job_not_finished` while the job runs, 409 `no_webhook` when it has no webhook or its message
    is not stored (yet, or any more)."""
    job = await tenant_job_or_404(services, job_id, tenant)
    if not job.params.webhook:
        raise ApiError(409, ErrorCode.NO_WEBHOOK, "the job has no webhook")
    if not job.status.is_terminal:
        raise ApiError(409, ErrorCode.JOB_NOT_FINISHED,
                       f"the job is {job.status.value}; its webhook can be redelivered once it ends")
    delivery = _pick(job, await _deliveries(services, job), message_id)
    try:
        if not await run_in_threadpool(services.deliveries.reset, delivery.message_id):
            raise ApiError(409, ErrorCode.NO_WEBHOOK, "the webhook message expired meanwhile")
        current = await run_in_threadpool(services.deliveries.get, delivery.message_id)
    except STORE_ERRORS as exc:
        logger.warning("webhook outbox unavailable: %s", type(exc).__name__)
        raise unavailable("the webhook outbox") from None
    try:
        await run_in_threadpool(services.redeliver, delivery.message_id)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the message stays pending, retry the call
        logger.warning("could not queue the redelivery of %s: %s", delivery.message_id, type(exc).__name__)
        raise unavailable("the webhook queue") from None
    logger.info("redelivering %s of %s for tenant %s", delivery.message_id, job_id, tenant)
    return JSONResponse((current or delivery).view(), status_code=202, headers={"Cache-Control": "no-store"})
