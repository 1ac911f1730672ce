"""/v1/jobs: submit image-edit jobs, list and read them, cancel them, watch them (SSE).

POST takes ``application/json`` or ``multipart/form-data`` on the same route, so
the body is parsed here (not by FastAPI) and declared to OpenAPI via
``openapi_extra``. Order of checks: auth → size/content type → parse → params
(+ webhook policy) → image intake → object store → job store → queue.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn

import redis
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from api.auth import TenantDep
from api.deps import Services, ServicesDep
from api.errors import ApiError, ErrorResponse, from_validation_errors
from api.fetch import check_url_policy
from api.idempotency import IDEMPOTENCY_RESPONSES, IdempotencyDep
from api.images import InputImage, intake_image
from api.limits import LIMIT_RESPONSES, SUBMISSION_LIMITS, check_input_limits
from api.metrics import ApiMetrics
from api.models import MULTIPART_JSON_FIELDS, CancelRequest, JobList, JobOut, SubmitParams
from api.settings import ApiSettings
from api.sse import EventStreamResponse, JobEventStream
from broker import events, keys
from broker.schema import (
    MAX_CANVAS_SIDE,
    MAX_REFERENCE_IMAGES,
    ErrorCode,
    Job,
    JobParams,
    JobStatus,
    Operation,
    lora_location,
    new_job_id,
    random_seed,
)
from broker.views import job_view
from storage.store import StorageUnavailable

logger = logging.getLogger("editfarm.api")
router = APIRouter(tags=["jobs"])

# A job store backed by Redis fails with RedisError (or a bare socket error).
STORE_ERRORS = (redis.exceptions.RedisError, OSError)
# Multipart fields that may be left empty: an empty form field means "not given".
_OPTIONAL_FORM_FIELDS = {"seed", "steps", "true_cfg_scale", "priority", "timeout_s", "queue_deadline_s",
                         "prompt", "width", "height", "strength", "num_images", "output_quality", "dpi",
                         *MULTIPART_JSON_FIELDS}
# Multipart fields that are lists: repeated fields and/or comma-separated values.
_LIST_FORM_FIELDS = {"webhook_events"}
# Image fields: file parts in multipart (or data:/https:// URLs as text), URLs in JSON.
_IMAGE_FIELDS = ("image", "images", "mask")
# image + references + mask
_MAX_FILES = 2 + MAX_REFERENCE_IMAGES
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "invalid_json / invalid_request", 401: "unauthorized", 404: "not_found",
        413: "payload_too_large", 415: "unsupported_media_type",
        422: "missing_field / invalid_parameter / unknown_operation / missing_image / invalid_image / "
             "unsupported_image_format / image_too_large / image_fetch_failed / url_not_allowed",
        503: "unavailable (object store, job store or queue)",
    }.items()
}
_SUBMIT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/JobMultipartRequest"}},
}}}


def _unavailable(what: str) -> ApiError:
    return ApiError(503, ErrorCode.UNAVAILABLE, f"{what} is unavailable; retry later")


def _base_url(request: Request, services: Services) -> str:
    return services.settings.public_base_url.rstrip("/") or str(request.base_url).rstrip("/")


def _presign(services: Services, key: str) -> str:
    return services.objects.presign_get(key, services.settings.presign_expiry_s)


def _view(job: Job, base_url: str, services: Services, queue_position: int | None) -> dict[str, Any]:
    """The public view of ``job``: :func:`broker.views.job_view` plus ``queue_position`` after ``status``."""
    view: dict[str, Any] = {}
    for name, value in job_view(job, lambda key: _presign(services, key), base_url).items():
        view[name] = value
        if name == "status":
            view["queue_position"] = queue_position if job.status is JobStatus.QUEUED else None
    return view


def _read_view(job: Job, base_url: str, services: Services) -> dict[str, Any]:
    """The view with the job's current queue position (blocking; raises the store's errors)."""
    position = services.store.queue_position(job.id) if job.status is JobStatus.QUEUED else None
    return _view(job, base_url, services, position)


def _metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


async def _capped_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, raising 413 payload_too_large once more than ``limit`` bytes arrived."""
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body is larger than {limit} bytes")
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, "client disconnected") from None


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class Sources:
    """Where a job's images come from: upload bytes, or a data:/https:// URL each."""

    image: str | bytes | None = None
    references: list[str | bytes] = field(default_factory=list)
    mask: str | bytes | None = None


async def _parse_json(request: Request, limit: int) -> tuple[dict[str, Any], Sources]:
    raw = b"".join([chunk async for chunk in _capped_stream(request, limit)])
    try:
        body = json.loads(raw, parse_constant=_reject_constant)  # NaN/Infinity are not JSON
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ApiError(400, ErrorCode.INVALID_JSON, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "request body must be a JSON object")
    sources = Sources()
    for name in ("image", "mask"):
        value = body.pop(name, None)
        if value is not None and not isinstance(value, str):
            raise ApiError(422, ErrorCode.INVALID_PARAMETER,
                           f"{name} must be a string (data: or https:// URL)", param=name)
        setattr(sources, name, value)
    references = body.pop("images", None)
    if references is not None:
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise ApiError(422, ErrorCode.INVALID_PARAMETER,
                           "images must be a list of strings (data: or https:// URLs)", param="images")
        sources.references = list(references)
    return body, sources


async def _parse_multipart(request: Request, limit: int) -> tuple[dict[str, Any], Sources]:
    parser = MultiPartParser(request.headers, _capped_stream(request, limit),
                             max_files=_MAX_FILES, max_fields=48, max_part_size=limit)
    try:
        form: FormData = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, f"malformed multipart body: {exc.message}") from None
    try:
        fields: dict[str, Any] = {}
        sources = Sources()
        seen: set[str] = set()
        lists: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if name in fields or (name in ("image", "mask") and name in seen):
                raise _invalid(name, f"{name} is given more than once")
            seen.add(name)
            if isinstance(value, UploadFile):
                if name not in _IMAGE_FIELDS:
                    raise ApiError(422, ErrorCode.INVALID_PARAMETER, f"{name} must not be a file", param=name)
                data: str | bytes = await value.read()
            else:
                data = value
            if name == "images":
                sources.references.append(data)
            elif name in ("image", "mask"):
                setattr(sources, name, data)
            elif not isinstance(value, str):  # pragma: no cover - every other UploadFile was refused above
                continue
            elif name in _LIST_FORM_FIELDS:
                # `webhook_events=started,completed` or one field per value (or both)
                lists.setdefault(name, []).extend(v.strip() for v in value.split(",") if v.strip())
            elif value == "" and name in _OPTIONAL_FORM_FIELDS:
                continue
            elif name in MULTIPART_JSON_FIELDS:
                fields[name] = _json_field(name, value)
            else:
                fields[name] = value
        fields.update({name: values for name, values in lists.items() if values})
        return fields, sources
    finally:
        await form.close()


def _json_field(name: str, text: str) -> Any:
    """A structured multipart field (``boxes``, ``outpaint``, ...) sent as JSON text."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        raise ApiError(422, ErrorCode.INVALID_PARAMETER, f"{name} must be JSON text in a multipart body",
                       param=name) from None


async def _parse_body(request: Request, services: Services) -> tuple[dict[str, Any], Sources]:
    """(fields other than the images, the image sources) from a JSON or multipart body.

    Raises ApiError 413 (Content-Length or bytes read > max_body_bytes), 415, 400, 422.
    """
    limit = services.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body is larger than {limit} bytes")
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return await _parse_json(request, limit)
    if media == "multipart/form-data":
        return await _parse_multipart(request, limit)
    raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   "Content-Type must be application/json or multipart/form-data")


def _validate_params(fields: dict[str, Any]) -> JobParams:
    """JobParams from the submitted fields, with a random seed if none was given. Raises ApiError 422."""
    try:
        submitted = SubmitParams.model_validate(fields)
    except ValidationError as exc:
        raise _params_error(exc) from None
    data = submitted.model_dump()
    if data["seed"] is None:
        data["seed"] = random_seed()
    return JobParams.model_validate(data)


def _params_error(exc: ValidationError) -> ApiError:
    """The ApiError of a params ValidationError: a field that does not fit the operation
    (``job_params``, see :func:`broker.schema.operation_problem`) carries its own code and param."""
    for error in exc.errors():
        if error.get("type") == "job_params":
            ctx = error.get("ctx") or {}
            return ApiError(422, str(ctx.get("code", ErrorCode.INVALID_PARAMETER.value)),
                            str(ctx.get("message", error.get("msg", "invalid"))), param=ctx.get("param"))
    return from_validation_errors(exc.errors())


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, ErrorCode.INVALID_PARAMETER, message, param=param)


def _check_sources(params: JobParams, sources: Sources) -> None:
    """Which images the operation takes (before any is fetched or decoded). Raises ApiError 422."""
    op = params.operation
    if not op.takes_image:
        if sources.image is not None:
            raise _invalid("image", f"{op.value} takes no input image")
    elif sources.image is None:
        raise ApiError(422, ErrorCode.MISSING_IMAGE, "image is required", param="image")
    if sources.references:
        if op is not Operation.EDIT:
            raise _invalid("images", f"reference images (images) apply to edit only, not {op.value}")
        if len(sources.references) > MAX_REFERENCE_IMAGES:
            raise _invalid("images", f"at most {MAX_REFERENCE_IMAGES} reference images, "
                                     f"got {len(sources.references)}")
    if sources.mask is not None and not op.takes_mask:
        raise _invalid("mask", f"a mask applies to inpaint and move, not {op.value}")
    if op is Operation.INPAINT and sources.mask is None and not params.boxes:
        raise ApiError(422, ErrorCode.MISSING_FIELD, "inpaint needs a mask or boxes", param="mask")


def _check_loras(params: JobParams, settings: ApiSettings) -> None:
    """Each LoRA uri against the bucket allow-list and the URL policy (blocking: resolves DNS)."""
    buckets = {settings.s3_bucket, *settings.lora_bucket_list()}
    for index, lora in enumerate(params.loras):
        scheme, where, _ = lora_location(lora.uri)
        if scheme == "s3":
            if where not in buckets:
                raise ApiError(422, ErrorCode.URL_NOT_ALLOWED,
                               f"LoRA {index + 1}: bucket {where!r} is not allowed; use the cluster's bucket "
                               f"{settings.s3_bucket!r}", param="loras")
        else:
            check_url_policy(lora.uri, settings, "loras")


def _check_images(params: JobParams, image: InputImage | None, mask: InputImage | None) -> None:
    """What needs the image's size (from its header): the mask's size, the outpainted canvas."""
    if image is None:
        return
    size = (image.width, image.height)
    if mask is not None and (mask.width, mask.height) != size:
        raise _invalid("mask", f"the mask is {mask.width}x{mask.height} px; it must match the image "
                               f"({image.width}x{image.height} px)")
    spec = params.outpaint
    if params.operation is Operation.OUTPAINT and spec is not None:
        canvas = spec.canvas(size)
        if canvas[0] < size[0] or canvas[1] < size[1]:
            raise _invalid("outpaint", f"the outpaint target {canvas[0]}x{canvas[1]} is smaller than the "
                                       f"image ({size[0]}x{size[1]})")
        if canvas == size:
            raise _invalid("outpaint", "the outpaint target is the image's own size: nothing to add")
        if max(canvas) > MAX_CANVAS_SIDE:
            raise _invalid("outpaint", f"the outpainted canvas {canvas[0]}x{canvas[1]} exceeds "
                                       f"{MAX_CANVAS_SIDE} px per side")


@dataclass
class _Intake:
    image: InputImage | None
    references: list[InputImage]
    mask: InputImage | None


async def _intake(sources: Sources, settings: ApiSettings) -> _Intake:
    """Fetch/decode and validate every image of the job (the same checks for each)."""
    image = await intake_image(sources.image, settings) if sources.image is not None else None
    references = []
    for index, source in enumerate(sources.references):
        references.append(await intake_image(source, settings, param="images",
                                             label=f"reference image {index + 1}"))
    mask = await intake_image(sources.mask, settings, param="mask") if sources.mask is not None else None
    return _Intake(image, references, mask)


def _store_inputs(services: Services, tenant: str, job_id: str,
                  intake: _Intake) -> tuple[list[str], str | None]:
    """Put the job's images into the object store (blocking); (input keys, mask key)."""
    input_keys = []
    for index, image in enumerate([*([intake.image] if intake.image else []), *intake.references]):
        key = keys.input_object(tenant, job_id, index, image.ext)
        services.objects.put(key, image.data, image.content_type)
        input_keys.append(key)
    mask_key = None
    if intake.mask is not None:
        mask_key = keys.mask_object(tenant, job_id, intake.mask.ext)
        services.objects.put(mask_key, intake.mask.data, intake.mask.content_type)
    return input_keys, mask_key


def _fail_unqueued(services: Services, job_id: str) -> None:
    """Best effort: a job that could not be queued must not sit in 'queued' forever."""
    try:
        services.store.transition(job_id, JobStatus.FAILED, {
            "error": {"code": ErrorCode.UNAVAILABLE.value, "message": "the job could not be queued"},
            "finished_at": time.time(),
        }, from_=[JobStatus.QUEUED])
    except Exception:  # noqa: BLE001 - the store may be what is down; the 503 is answered anyway
        logger.warning("could not mark unqueued job %s failed", job_id)


@router.post(
    "/v1/jobs", status_code=202, summary="Submit a job (edit, generate, inpaint, outpaint, move, upscale)",
    response_model=None, responses={202: {"model": JobOut, "description": "Accepted; queued."}, **_ERRORS,
                                    **IDEMPOTENCY_RESPONSES, **LIMIT_RESPONSES},
    openapi_extra=_SUBMIT_BODY, dependencies=[SUBMISSION_LIMITS],
)
async def submit_job(request: Request, tenant: TenantDep, services: ServicesDep,
                     idempotency: IdempotencyDep) -> JSONResponse:
    """Accept a job: validate everything, store its input images, record the job, queue it.

    Returns 202 with the job (status ``queued``) and a ``Location`` header.
    Nothing is stored or queued unless every check passes.
    """
    settings = services.settings
    fields, sources = await _parse_body(request, services)
    check_input_limits(fields, sources, settings)
    replay = await idempotency.claim(fields, sources,
                                     lambda job: _read_view(job, _base_url(request, services), services))
    if replay is not None:
        return replay
    params = _validate_params(fields)
    _check_sources(params, sources)
    if params.webhook is not None:
        await run_in_threadpool(check_url_policy, params.webhook, settings, "webhook")
    if params.loras:
        await run_in_threadpool(_check_loras, params, settings)
    intake = await _intake(sources, settings)
    _check_images(params, intake.image, intake.mask)

    job_id = new_job_id()
    try:
        input_keys, mask_key = await run_in_threadpool(_store_inputs, services, tenant, job_id, intake)
    except StorageUnavailable:
        logger.warning("object store unavailable storing the inputs of %s", job_id)
        raise _unavailable("the object store") from None
    job = Job(id=job_id, tenant=tenant, params=params, input_keys=input_keys, mask_key=mask_key)
    try:
        await run_in_threadpool(services.store.create, job)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable creating %s: %s", job_id, type(exc).__name__)
        raise _unavailable("the job store") from None
    try:
        await run_in_threadpool(services.enqueue, job_id, params.priority.value)
    except Exception as exc:  # noqa: BLE001 - any broker failure means the job is not queued
        logger.warning("could not queue %s: %s", job_id, type(exc).__name__)
        await run_in_threadpool(_fail_unqueued, services, job_id)
        raise _unavailable("the job queue") from None
    await idempotency.complete(job_id)
    _metrics(request).job_submitted()
    try:
        position = await run_in_threadpool(services.store.queue_position, job_id)
    except STORE_ERRORS:  # the job is accepted; its position is only a hint
        position = None
    view = _view(job, _base_url(request, services), services, position)
    logger.info("accepted %s %s for tenant %s (%d input image(s)%s)", params.operation.value, job_id, tenant,
                len(input_keys), ", a mask" if mask_key else "")
    return JSONResponse(view, status_code=202,
                        headers={"Location": view["urls"]["self"], "Cache-Control": "no-store"})


@router.get(
    "/v1/jobs/{job_id}", summary="Get a job", response_model=None,
    responses={200: {"model": JobOut, "description": "The job."}, **_ERRORS},
)
async def get_job(job_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """The job with presigned output URLs and, while queued, its ``queue_position``.

    Another tenant's job answers exactly like an unknown id (404)."""
    job = await _job_or_404(services, job_id, tenant)
    try:
        view = await run_in_threadpool(_read_view, job, _base_url(request, services), services)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable reading a job: %s", type(exc).__name__)
        raise _unavailable("the job store") from None
    # presigned URLs are credentials for a while: keep them out of shared caches
    return JSONResponse(view, headers={"Cache-Control": "no-store"})


async def _job_or_404(services: Services, job_id: str, tenant: str) -> Job:
    """The tenant's job; 404 not_found for an unknown id or another tenant's job; 503 if the store is down."""
    try:
        job = await run_in_threadpool(services.store.get_for_tenant, job_id, tenant)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable reading a job: %s", type(exc).__name__)
        raise _unavailable("the job store") from None
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
            page.append(_read_view(job, base_url, services))
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
               **{k: v for k, v in _ERRORS.items() if k in (401, 422, 503)}},
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
    ``next_cursor`` is still set.
    """
    statuses = _parse_statuses(status)
    after = _decode_cursor(cursor) if cursor else None
    try:
        page, next_cursor = await run_in_threadpool(
            _list_page, services, tenant, statuses, limit, after, _base_url(request, services))
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable listing jobs: %s", type(exc).__name__)
        raise _unavailable("the job store") from None
    return JSONResponse({"data": page, "next_cursor": next_cursor}, headers={"Cache-Control": "no-store"})


# -- cancel --------------------------------------------------------------------------------------

_CANCEL_BODY_LIMIT = 16 * 1024
_CANCEL_BODY = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/CancelRequest"}},
}}}


async def _cancel_reason(request: Request) -> str | None:
    """``reason`` from the optional JSON body. Raises ApiError 400/413/415/422."""
    raw = b"".join([chunk async for chunk in _capped_stream(request, _CANCEL_BODY_LIMIT)])
    if not raw.strip():
        return None
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "the cancel body must be application/json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
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

    A lost race re-reads the job and tries again from its new status; a job
    that became terminal meanwhile is 409 job_finished.
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
            from_=[current.status],
        )
        if moved is not None:
            return moved
        current = services.store.get_for_tenant(job.id, job.tenant)
    raise ApiError(503, ErrorCode.UNAVAILABLE, "the job kept changing state; retry the cancel")


@router.post(
    "/v1/jobs/{job_id}/cancel", summary="Cancel a job", response_model=None,
    responses={200: {"model": JobOut, "description": "Canceled; the job as it is now."},
               409: {"model": ErrorResponse, "description": "job_finished: it already ended"},
               **{k: v for k, v in _ERRORS.items() if k in (400, 401, 404, 413, 415, 422, 503)}},
    openapi_extra=_CANCEL_BODY,
)
async def cancel_job(job_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """Cancel a queued or running job; an optional ``{"reason": "..."}`` goes into its error message.

    A queued job never starts; a running one stops at its next denoising step.
    The job ends ``canceled`` with error code ``canceled``, watchers get a
    ``status`` event and the job's webhook (if any) is sent once as
    ``job.canceled``. A job that already ended is 409 ``job_finished``.
    """
    job = await _job_or_404(services, job_id, tenant)
    reason = await _cancel_reason(request)
    message = f"canceled by request: {reason}" if reason else "canceled by request"
    try:
        canceled = await run_in_threadpool(_cancel, services, job, message)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable canceling %s: %s", job_id, type(exc).__name__)
        raise _unavailable("the job store") from None
    _metrics(request).job_canceled()
    logger.info("canceled %s (was %s) for tenant %s", job_id, job.status.value, tenant)
    status_event = {"status": canceled.status.value,
                    "error": canceled.error.model_dump() if canceled.error else None}
    try:
        await run_in_threadpool(services.publisher.publish, job_id, events.STATUS, status_event)
    except Exception as exc:  # noqa: BLE001 - watchers also re-read the record; the cancel stands
        logger.warning("could not publish the cancel of %s: %s", job_id, type(exc).__name__)
    try:
        await run_in_threadpool(services.notify, job_id, "job.canceled")
    except Exception as exc:  # noqa: BLE001 - the job is canceled either way; the webhook is what is lost
        logger.error("could not queue the job.canceled webhook of %s: %s", job_id, type(exc).__name__)
    view = _view(canceled, _base_url(request, services), services, None)
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
               **{k: v for k, v in _ERRORS.items() if k in (401, 404, 503)}},
)
async def job_events(job_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> Response:
    """Stream the job's state as ``text/event-stream`` until it ends.

    The current state comes first (``event: status``), so a client that connects
    late misses nothing; a job that already ended gets ``status`` and ``done``
    and the stream closes. Unknown or another tenant's job: 404 before any stream.
    """
    await _job_or_404(services, job_id, tenant)
    try:
        subscription = await services.events.subscribe(job_id)
    except Exception as exc:  # noqa: BLE001 - no pub/sub, no stream
        logger.warning("could not subscribe to the events of %s: %s", job_id, type(exc).__name__)
        raise _unavailable("the event feed") from None
    try:
        # subscribed first, then read: whatever changes from here on is either in this read or on the feed
        job = await _job_or_404(services, job_id, tenant)
        base_url = _base_url(request, services)

        async def read() -> Job | None:
            return await run_in_threadpool(services.store.get_for_tenant, job_id, tenant)

        async def render(current: Job) -> dict[str, Any]:
            return await run_in_threadpool(_read_view, current, base_url, services)

        stream = JobEventStream(first=job, subscription=subscription, read=read, render=render,
                                presign=lambda key: _presign(services, key), settings=services.settings)
        return EventStreamResponse(stream, subscription)
    except BaseException:
        await subscription.close()
        raise
