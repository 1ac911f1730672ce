"""The body of ``POST /v1/jobs``: parse it (JSON or multipart), validate its fields, take in its images.

Order of checks, cheapest first: size/content type → parse → params (+ webhook and LoRA policy)
→ which images the operation takes → image intake (each image's header, then a full decode) →
what needs the image's size. :mod:`api.routers.submit` runs them, then stores the inputs and
records and queues the job.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, NoReturn

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.errors import ApiError, from_validation_errors
from api.fetch import check_url_policy
from api.images import InputImage, intake_image
from api.models import MULTIPART_JSON_FIELDS, SubmitParams
from api.settings import ApiSettings
from api.uploads import LARGE_BODY_BYTES, BodyPace, UploadTicket, request_timeout
from broker import keys
from broker.schema import (
    MAX_CANVAS_SIDE,
    MAX_REFERENCE_IMAGES,
    ErrorCode,
    JobParams,
    Operation,
    lora_location,
    random_seed,
)
from storage.store import ObjectStore

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


async def capped_stream(request: Request, limit: int, pace: BodyPace | None = None,
                        ticket: UploadTicket | None = None) -> AsyncGenerator[bytes, None]:
    """The request body, raising 413 payload_too_large once more than ``limit`` bytes arrived, and
    408 request_timeout when the next bytes are not there by ``pace``'s deadline (default: the
    app's settings). ``ticket`` takes its upload slot once the body proves large (declared, or
    arrived, :data:`LARGE_BODY_BYTES` or more): a sender that has sent nothing holds none.
    """
    if pace is None:
        pace = body_pace(request.app.state.services.settings)
    declared = request.headers.get("content-length", "")
    large = declared.isdigit() and int(declared) >= LARGE_BODY_BYTES
    received = 0
    more_body = True
    # the ASGI messages themselves rather than Request.stream(): one deadline per message, and none
    # for the empty message that ends a body; asyncio's timeout, a third of anyio's cost
    while more_body:
        try:
            async with asyncio.timeout(pace.remaining_s(received)):
                message = await request.receive()
        except TimeoutError:
            raise request_timeout() from None
        if message["type"] != "http.request":  # http.disconnect
            raise ApiError(400, ErrorCode.INVALID_REQUEST, "client disconnected")
        more_body = message.get("more_body", False)
        chunk = message.get("body", b"")
        if not chunk:
            continue
        received += len(chunk)
        if received > limit:
            raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body is larger than {limit} bytes")
        if ticket is not None and not ticket.holding and (large or received >= LARGE_BODY_BYTES):
            await _take_slot(ticket, pace)
        yield chunk


def body_pace(settings: ApiSettings) -> BodyPace:
    """The deadline of a body whose reading begins now."""
    return BodyPace(settings.body_timeout_s, settings.body_min_bytes_per_s, settings.body_max_s)


async def _take_slot(ticket: UploadTicket, pace: BodyPace) -> None:
    """Wait for an upload slot, at most until the body's total deadline (the wait does not count
    against the sender's rate). Raises ApiError 408."""
    waiting_since = time.monotonic()
    try:
        async with asyncio.timeout(pace.total_remaining_s()):
            await ticket.take()
    except TimeoutError:
        raise request_timeout() from None
    pace.waited_s += time.monotonic() - waiting_since


def reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")



@dataclass
class Sources:
    """Where a job's images come from: upload bytes, or a data:/https:// URL each."""

    image: str | bytes | None = None
    references: list[str | bytes] = field(default_factory=list)
    mask: str | bytes | None = None


async def _parse_json(request: Request, limit: int, pace: BodyPace,
                      ticket: UploadTicket | None) -> tuple[dict[str, Any], Sources]:
    # one growing buffer, not a list of chunks joined (two copies of the body at once)
    raw = bytearray()
    async for chunk in capped_stream(request, limit, pace, ticket):
        raw += chunk
    try:
        body = json.loads(raw, parse_constant=reject_constant)  # NaN/Infinity are not JSON
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ApiError(400, ErrorCode.INVALID_JSON, "request body is not valid JSON") from None
    finally:
        del raw  # the parsed strings hold the images now
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


async def _parse_multipart(request: Request, limit: int, pace: BodyPace,
                           ticket: UploadTicket | None) -> tuple[dict[str, Any], Sources]:
    parser = _Utf8FormParser(request.headers, capped_stream(request, limit, pace, ticket),
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


class _Utf8FormParser(MultiPartParser):
    """Starlette's parser, except that a text field that is not UTF-8 is refused (422 invalid_request
    naming it) instead of being read as Latin-1: the bytes would become a different prompt than the
    one the client meant, silently."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode("utf-8")
            except UnicodeDecodeError:
                name = part.field_name[:64]
                raise ApiError(422, ErrorCode.INVALID_REQUEST, f"form field {name!r} is not UTF-8 text",
                               param=name) from None
        super().on_part_end()


def _json_field(name: str, text: str) -> Any:
    """A structured multipart field (``boxes``, ``outpaint``, ...) sent as JSON text."""
    try:
        return json.loads(text, parse_constant=reject_constant)
    except ValueError:
        raise ApiError(422, ErrorCode.INVALID_PARAMETER, f"{name} must be JSON text in a multipart body",
                       param=name) from None


async def parse_body(request: Request, settings: ApiSettings,
                     ticket: UploadTicket | None = None) -> tuple[dict[str, Any], Sources]:
    """(fields other than the images, the image sources) from a JSON or multipart body, read under
    the body deadline (see :func:`capped_stream`); ``ticket`` takes an upload slot for a large body.

    Raises ApiError 413 (Content-Length or bytes read > max_body_bytes), 415, 400, 422, 408.
    """
    pace = body_pace(settings)
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body is larger than {limit} bytes")
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return await _parse_json(request, limit, pace, ticket)
    if media == "multipart/form-data":
        return await _parse_multipart(request, limit, pace, ticket)
    raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   "Content-Type must be application/json or multipart/form-data")



def validate_params(fields: dict[str, Any]) -> JobParams:
    """JobParams from the submitted fields, with a random seed if none was given. Raises ApiError 422."""
    try:
        submitted = SubmitParams.model_validate(fields)
    except ValidationError as exc:
        raise _params_error(exc) from None
    values = dict(iter(submitted))  # not dict(submitted): it probes a missing .keys first (~4 µs)
    if values["seed"] is None:
        values["seed"] = random_seed()
    # SubmitParams is JobParams with an optional seed, and every value was just validated (the seed
    # is in range): construct, not validate a second time (a third of the route's pydantic time)
    return JobParams.model_construct(_fields_set=submitted.model_fields_set | {"seed"}, **values)


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


def check_sources(params: JobParams, sources: Sources) -> None:
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


def check_loras(params: JobParams, settings: ApiSettings) -> None:
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


def check_images(params: JobParams, image: InputImage | None, mask: InputImage | None) -> None:
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
class Intake:
    image: InputImage | None
    references: list[InputImage]
    mask: InputImage | None


async def intake_images(sources: Sources, settings: ApiSettings) -> Intake:
    """Fetch/decode and validate every image of the job (the same checks for each).

    Consumes ``sources``: each source is dropped once its image is taken in, so a 4 MB data URL is
    not held next to its decoded bytes for the rest of the request.
    """
    image = None
    source: str | bytes | None = None
    if sources.image is not None:
        source, sources.image = sources.image, None
        image = await intake_image(source, settings)
    references = []
    pending, sources.references = sources.references, []
    for index in range(len(pending)):
        source, pending[index] = pending[index], b""
        references.append(await intake_image(source, settings, param="images",
                                             label=f"reference image {index + 1}"))
    mask = None
    if sources.mask is not None:
        source, sources.mask = sources.mask, None
        mask = await intake_image(source, settings, param="mask")
    return Intake(image, references, mask)


def store_inputs(objects: ObjectStore, tenant: str, job_id: str,
                 intake: Intake) -> tuple[list[str], str | None]:
    """Put the job's images into the object store (blocking); (input keys, mask key)."""
    input_keys = []
    for index, image in enumerate([*([intake.image] if intake.image else []), *intake.references]):
        key = keys.input_object(tenant, job_id, index, image.ext)
        objects.put(key, image.data, image.content_type)
        input_keys.append(key)
    mask_key = None
    if intake.mask is not None:
        mask_key = keys.mask_object(tenant, job_id, intake.mask.ext)
        objects.put(mask_key, intake.mask.data, intake.mask.content_type)
    return input_keys, mask_key

