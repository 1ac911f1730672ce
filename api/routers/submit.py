"""``POST /v1/jobs``: submit a job (edit, generate, inpaint, outpaint, move, upscale).

POST takes ``application/json`` or ``multipart/form-data`` on the same route, so the body is
parsed by :mod:`api.intake` (not by FastAPI) and declared to OpenAPI via ``openapi_extra``.
Order: auth → submission limits (unless this process knows the tenant is far from them; see
:mod:`api.limits`) → size/content type → parse (under the body deadline; a large body takes an upload
slot, see :mod:`api.uploads`) → Idempotency-Key → params (+ webhook and LoRA
policy) → image intake → object store → submission limits + job record + render message.

The limits, the job record and its Celery message are checked and written by one Redis script
(:meth:`broker.jobstore.JobStore.create_and_enqueue_within_async`) on the event loop: a job never
exists without its message, a refusal writes nothing (and deletes the inputs already stored), and
a submission without input images makes one Redis round trip and no thread-pool hop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.auth import TenantDep
from api.deps import Services
from api.errors import STORE_ERRORS, ApiError, store_unavailable
from api.fetch import check_url_policy
from api.idempotency import (
    IDEMPOTENCY_RESPONSES,
    IdempotencyKeyHeader,
    IdempotencyScope,
    check_key,
)
from api.intake import (
    Intake,
    check_images,
    check_loras,
    check_sources,
    intake_images,
    parse_body,
    store_inputs,
    validate_params,
)
from api.limits import (
    LIMIT_RESPONSES,
    check_input_limits,
    count_submission,
    create_within_limits,
    enforce_submission_limits,
)
from api.model_choice import choose_model
from api.models import JobOut
from api.retention import settle_retention_async
from api.uploads import UploadTicket
from api.views import ERRORS, metrics_of, public_base_url, public_view, read_view, unavailable
from broker.replication import ReplicaShortfall
from broker.schema import Job, JobParams, model_of, new_job_id
from storage.store import ObjectStore, StorageUnavailable

logger = logging.getLogger("editfarm.api")


router = APIRouter(tags=["jobs"])

_SUBMIT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/JobMultipartRequest"}},
}}}


@dataclass
class Submission:
    """Who submits (authenticated, within the limits), the services, and the Idempotency-Key's scope."""

    tenant: str
    services: Services
    idempotency: IdempotencyScope
    # counted toward the rate limit (by the early check, or by the create once tried), or nothing to count
    counted: bool = True


async def admit_submission(request: Request, tenant: TenantDep, key: IdempotencyKeyHeader = None) -> Submission:
    """After authentication: the per-tenant submission limits before the body is read (for a tenant
    near them; see :mod:`api.limits`), then the Idempotency-Key's syntax."""
    counted = await enforce_submission_limits(request, tenant)
    services: Services = request.app.state.services
    return Submission(tenant, services, IdempotencyScope(services, tenant, check_key(key)), counted)


@router.post(
    "/v1/jobs", status_code=202, summary="Submit a job (edit, generate, inpaint, outpaint, move, upscale)",
    response_model=None, responses={202: {"model": JobOut, "description": "Accepted; queued."}, **ERRORS,
                                    **IDEMPOTENCY_RESPONSES, **LIMIT_RESPONSES},
    openapi_extra=_SUBMIT_BODY,
)
async def submit_job(request: Request, submission: Annotated[Submission, Depends(admit_submission)]) -> JSONResponse:
    """Accept a job: validate everything, store its input images, record the job, queue it.

    Returns 202 with the job (status ``queued``) and a ``Location`` header.
    Nothing is stored or queued unless every check passes.
    """
    try:
        return await _submit(request, submission)
    finally:
        # a key still held means the request ended without a job: free it, even if the client went away
        # (the shield costs ~6 µs: only when there is something to do)
        if submission.idempotency.to_release or not submission.counted:
            with anyio.CancelScope(shield=True):
                await submission.idempotency.release()
                if not submission.counted:  # ended before the create (4xx, replay): counted now
                    await count_submission(request, submission.tenant)


async def _take_in(request: Request, submission: Submission, base_url: str,
                   ticket: UploadTicket) -> JSONResponse | tuple[JobParams, Intake]:
    """The body parsed and checked, its images taken in: (params, images), or the replay of an
    earlier identical request (Idempotency-Key). Raises ApiError."""
    services, settings = submission.services, submission.services.settings
    fields, sources = await parse_body(request, settings, ticket)
    check_input_limits(fields, sources, settings)
    replay = await submission.idempotency.claim(fields, sources, lambda job: read_view(job, base_url, services))
    if replay is not None:
        return replay
    params = choose_model(services.catalog, validate_params(fields))
    params = await settle_retention_async(services, submission.tenant, params)
    check_sources(params, sources)
    if params.webhook is not None:
        await run_in_threadpool(check_url_policy, params.webhook, settings, "webhook")
    if params.loras:
        await run_in_threadpool(check_loras, params, settings)
    intake = await intake_images(sources, settings)
    check_images(params, intake.image, intake.mask)
    return params, intake


async def _submit(request: Request, submission: Submission) -> JSONResponse:
    tenant, services, idempotency = submission.tenant, submission.services, submission.idempotency
    base_url = public_base_url(request, services)
    # the memory-heavy part (body, image strings, decodes) of a large body holds an upload slot, from
    # its first bytes on; the object-store put after it waits on the network, not the CPU: outside
    ticket = UploadTicket(request.app.state.upload_slots, tenant)
    try:
        taken = await _take_in(request, submission, base_url, ticket)
    finally:
        ticket.give_back()
    if isinstance(taken, JSONResponse):
        return taken
    params, intake = taken

    job_id = new_job_id()
    input_keys: list[str] = []
    mask_key = None
    if intake.image is not None or intake.references or intake.mask is not None:  # generate has none
        try:
            input_keys, mask_key = await run_in_threadpool(store_inputs, services.objects, tenant, job_id, intake)
        except StorageUnavailable:
            logger.warning("object store unavailable storing the inputs of %s", job_id)
            raise unavailable("the object store") from None
    job = Job(id=job_id, tenant=tenant, params=params, input_keys=input_keys, mask_key=mask_key)
    queue, message = services.render_queues.of(params.model).message(job_id, params.priority)
    counted, submission.counted = submission.counted, True
    stored = [*input_keys, *([mask_key] if mask_key else [])]
    claim = idempotency.key_claim(job_id)
    try:
        # the limits, the record, its message, its queue position and its Idempotency-Key in one
        # atomic step: all or nothing
        position = await create_within_limits(request, tenant, job, queue, message, counted, claim=claim)
    except ReplicaShortfall as exc:  # inputs kept, as below; a kept job answers a retry with this key
        if claim is not None:  # the create pointed the key at the job, or the withdraw freed it
            idempotency.pointed()
        elif exc.kept:
            await idempotency.complete(job_id)
        raise store_unavailable() from None
    except ApiError:  # refused by the limits: no job, so no inputs either
        await _discard(services.objects, stored)
        raise
    except STORE_ERRORS as exc:
        # inputs kept: a reply lost to a timeout may hide a job that was created (and needs them)
        logger.warning("job store unavailable creating %s: %s", job_id, type(exc).__name__)
        raise unavailable("the job store") from None
    if claim is not None:
        idempotency.pointed()
    else:
        await idempotency.complete(job_id)
    metrics_of(request).job_submitted(model_of(job))
    view = public_view(job, base_url, services, position)
    logger.info("accepted %s %s for tenant %s (%d input image(s)%s)", params.operation.value, job_id, tenant,
                len(input_keys), ", a mask" if mask_key else "")
    return JSONResponse(view, status_code=202,
                        headers={"Location": view["urls"]["self"], "Cache-Control": "no-store"})


async def _discard(objects: ObjectStore, stored: list[str]) -> None:
    """Delete the input objects of a job that was not created (best effort: logged, not raised)."""
    if not stored:
        return

    def delete_all() -> None:
        for key in stored:
            objects.delete(key)

    try:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(delete_all)
    except StorageUnavailable:
        logger.warning("object store unavailable deleting %d input(s) of a job not created", len(stored))
