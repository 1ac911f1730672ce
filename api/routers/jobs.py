"""/v1/jobs: submit an image-edit job and read it back.

POST takes ``application/json`` or ``multipart/form-data`` on the same route, so
the body is parsed here (not by FastAPI) and declared to OpenAPI via
``openapi_extra``. Order of checks: auth → size/content type → parse → params
(+ webhook policy) → image intake → object store → job store → queue.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any, NoReturn

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from api.auth import TenantDep
from api.deps import Services, ServicesDep
from api.errors import ApiError, ErrorResponse, from_validation_errors
from api.fetch import check_url_policy
from api.images import intake_image
from api.models import JobOut, SubmitParams
from broker import keys
from broker.schema import ErrorCode, Job, JobParams, JobStatus, new_job_id, random_seed
from broker.views import job_view
from storage.store import StorageUnavailable

logger = logging.getLogger("editfarm.api")
router = APIRouter(tags=["jobs"])

# A job store backed by Redis fails with RedisError (or a bare socket error).
STORE_ERRORS = (redis.exceptions.RedisError, OSError)
# Multipart fields that are numbers: an empty form field means "not given".
_OPTIONAL_FORM_FIELDS = {"seed", "steps", "true_cfg_scale"}
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


def _view(job: Job, request: Request, services: Services) -> dict[str, Any]:
    expiry = services.settings.presign_expiry_s
    return job_view(job, lambda key: services.objects.presign_get(key, expiry), _base_url(request, services))


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


async def _parse_json(request: Request, limit: int) -> tuple[dict[str, Any], str | bytes | None]:
    raw = b"".join([chunk async for chunk in _capped_stream(request, limit)])
    try:
        body = json.loads(raw, parse_constant=_reject_constant)  # NaN/Infinity are not JSON
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ApiError(400, ErrorCode.INVALID_JSON, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "request body must be a JSON object")
    image = body.pop("image", None)
    if image is not None and not isinstance(image, str):
        raise ApiError(422, ErrorCode.INVALID_PARAMETER, "image must be a string (data: or https:// URL)",
                       param="image")
    return body, image


async def _parse_multipart(request: Request, limit: int) -> tuple[dict[str, Any], str | bytes | None]:
    parser = MultiPartParser(request.headers, _capped_stream(request, limit),
                             max_files=1, max_fields=32, max_part_size=limit)
    try:
        form: FormData = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, ErrorCode.INVALID_REQUEST, f"malformed multipart body: {exc.message}") from None
    try:
        fields: dict[str, Any] = {}
        image: str | bytes | None = None
        for name, value in form.multi_items():
            if name in fields or (name == "image" and image is not None):
                raise ApiError(422, ErrorCode.INVALID_PARAMETER, f"{name} is given more than once", param=name)
            if isinstance(value, UploadFile):
                if name != "image":
                    raise ApiError(422, ErrorCode.INVALID_PARAMETER, f"{name} must not be a file", param=name)
                image = await value.read()
            elif name == "image":
                image = value
            elif not (value == "" and name in _OPTIONAL_FORM_FIELDS):
                fields[name] = value
        return fields, image
    finally:
        await form.close()


async def _parse_body(request: Request, services: Services) -> tuple[dict[str, Any], str | bytes | None]:
    """(fields other than image, image source) from a JSON or multipart body.

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
        raise from_validation_errors(exc.errors()) from None
    data = submitted.model_dump()
    if data["seed"] is None:
        data["seed"] = random_seed()
    return JobParams.model_validate(data)


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
    "/v1/jobs", status_code=202, summary="Submit an image-edit job",
    response_model=None, responses={202: {"model": JobOut, "description": "Accepted; queued."}, **_ERRORS},
    openapi_extra=_SUBMIT_BODY,
)
async def submit_job(request: Request, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """Accept a job: validate everything, store the input image, record the job, queue it.

    Returns 202 with the job (status ``queued``) and a ``Location`` header.
    Nothing is stored or queued unless every check passes.
    """
    settings = services.settings
    fields, source = await _parse_body(request, services)
    params = _validate_params(fields)
    if source is None:
        raise ApiError(422, ErrorCode.MISSING_IMAGE, "image is required", param="image")
    if params.webhook is not None:
        await run_in_threadpool(check_url_policy, params.webhook, settings, "webhook")
    image = await intake_image(source, settings)

    job_id = new_job_id()
    key = keys.input_object(tenant, job_id, 0, image.ext)
    try:
        await run_in_threadpool(services.objects.put, key, image.data, image.content_type)
    except StorageUnavailable:
        logger.warning("object store unavailable storing input of %s", job_id)
        raise _unavailable("the object store") from None
    job = Job(id=job_id, tenant=tenant, params=params, input_keys=[key])
    try:
        await run_in_threadpool(services.store.create, job)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable creating %s: %s", job_id, type(exc).__name__)
        raise _unavailable("the job store") from None
    try:
        await run_in_threadpool(services.enqueue, job_id)
    except Exception as exc:  # noqa: BLE001 - any broker failure means the job is not queued
        logger.warning("could not queue %s: %s", job_id, type(exc).__name__)
        await run_in_threadpool(_fail_unqueued, services, job_id)
        raise _unavailable("the job queue") from None
    view = _view(job, request, services)
    logger.info("accepted %s for tenant %s (%dx%d %s)", job_id, tenant, image.width, image.height, image.ext)
    return JSONResponse(view, status_code=202,
                        headers={"Location": view["urls"]["self"], "Cache-Control": "no-store"})


@router.get(
    "/v1/jobs/{job_id}", summary="Get a job", response_model=None,
    responses={200: {"model": JobOut, "description": "The job."}, **_ERRORS},
)
async def get_job(job_id: str, request: Request, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """The job with presigned output URLs. Another tenant's job answers exactly like an unknown id (404)."""
    try:
        job = await run_in_threadpool(services.store.get_for_tenant, job_id, tenant)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable reading a job: %s", type(exc).__name__)
        raise _unavailable("the job store") from None
    if job is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, "no such job")
    # presigned URLs are credentials for a while: keep them out of shared caches
    return JSONResponse(_view(job, request, services), headers={"Cache-Control": "no-store"})
