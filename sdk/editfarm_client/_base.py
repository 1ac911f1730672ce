"""What the sync and async clients share: request building, error mapping, the retry policy."""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx

from editfarm_client._uploads import ImageInput, Upload, to_upload
from editfarm_client.errors import APIError, RateLimited, Unavailable, error_class
from editfarm_client.models import (
    Job,
    JobEvent,
    JobPage,
    Model,
    Output,
    OutputFormat,
    Priority,
    WebhookEventName,
)

#: ``[x0, y0, x1, y1]``, each relative to the image size (0..1).
Box = Sequence[float]
UploadMode = Literal["auto", "multipart", "json"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
# retried only for requests that are safe to repeat (GET): a proxy may have passed the request on
RETRY_STATUSES_IDEMPOTENT = frozenset({502, 504})
# fields that are lists of plain strings: repeated form fields in multipart
_LIST_OF_STRINGS = frozenset({"webhook_events"})
_IMAGE_FIELDS = ("image", "mask")


class SubmitOptions(TypedDict, total=False):
    """Keyword options every operation accepts (see :meth:`Client.submit` for their meaning)."""

    model: str
    negative_prompt: str
    seed: int
    steps: int
    true_cfg_scale: float
    width: int
    height: int
    strength: float
    num_images: int
    loras: Sequence[Any]
    output_format: OutputFormat
    output_quality: int
    dpi: int
    webhook: str
    webhook_events: Sequence[WebhookEventName]
    priority: Priority
    timeout_s: float
    queue_deadline_s: float
    idempotency_key: str
    extra_fields: Mapping[str, Any]


@dataclass
class RequestSpec:
    """One API request, ready to be sent (again, on retry: bodies are bytes, never streams)."""

    method: str
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = None
    data: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "HEAD")

    def build(self, http: httpx.Client | httpx.AsyncClient, headers: Mapping[str, str],
              timeout: httpx.Timeout | None = None) -> httpx.Request:
        kwargs: dict[str, Any] = {"params": self.params or None, "headers": {**headers, **self.headers}}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.data is not None or self.files is not None:
            kwargs["data"] = self.data or {}
            kwargs["files"] = self.files or None
        if timeout is not None:
            kwargs["timeout"] = timeout
        return http.build_request(self.method, self.path, **kwargs)


def job_id_of(job: Job | str) -> str:
    job_id = job.id if isinstance(job, Job) else job
    if not isinstance(job_id, str) or not job_id:
        raise ValueError("a job id (or a Job) is required")
    return job_id


def resolve_config(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    base = base_url or os.environ.get("EDITFARM_API_URL") or DEFAULT_BASE_URL
    key = api_key if api_key is not None else os.environ.get("EDITFARM_API_KEY")
    if not key:
        raise ValueError("an API key is required: pass api_key= or set EDITFARM_API_KEY")
    return base.rstrip("/"), key


def default_headers(api_key: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    from editfarm_client import __version__

    return {
        "Authorization": f"Bearer {api_key}",
        "Accept": "application/json",
        "User-Agent": f"editfarm-client/{__version__} httpx/{httpx.__version__}",
        **(extra or {}),
    }


# -- submit --------------------------------------------------------------------------------------


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def build_submit(fields: Mapping[str, Any], mode: UploadMode, idempotency_key: str | None) -> RequestSpec:
    """The ``POST /v1/jobs`` request for ``fields`` (None values are left out).

    Images (``image``, ``mask``, each of ``images``) that are local data become
    uploads. ``mode="auto"`` sends multipart/form-data when there is an upload
    and every other field is a plain value (or ``webhook_events``), and JSON
    (uploads inlined as ``data:`` URLs) otherwise: JSON is the one encoding of
    structured fields (``boxes``, ``outpaint``, ``move``, ``loras``) that every
    server version reads the same way. ``multipart`` sends structured fields as
    JSON text in form fields; ``json`` always inlines uploads.
    """
    plain: dict[str, Any] = {}
    images: dict[str, str | Upload] = {}
    refs: list[str | Upload] = []
    for name, value in fields.items():
        if value is None:
            continue
        if name in _IMAGE_FIELDS:
            images[name] = to_upload(value, stem=name)
        elif name == "images":
            if isinstance(value, (str, bytes, bytearray, memoryview, os.PathLike)) or not isinstance(
                    value, Sequence):
                raise TypeError("images must be a list of images")
            refs = [to_upload(v, stem=f"images_{i}") for i, v in enumerate(value)]
        else:
            plain[name] = _jsonable(value)

    has_upload = any(isinstance(v, Upload) for v in [*images.values(), *refs])
    structured = any(isinstance(v, (list, dict)) for k, v in plain.items() if k not in _LIST_OF_STRINGS)
    mixed_refs = any(isinstance(r, Upload) for r in refs) and any(isinstance(r, str) for r in refs)
    if mode == "multipart":
        multipart = not mixed_refs
    elif mode == "json":
        multipart = False
    else:
        multipart = has_upload and not structured and not mixed_refs

    headers = {"Idempotency-Key": idempotency_key or f"efc_{uuid.uuid4().hex}"}
    if not multipart:
        body = dict(plain)
        for name, img in images.items():
            body[name] = img.data_url() if isinstance(img, Upload) else img
        if refs:
            body["images"] = [r.data_url() if isinstance(r, Upload) else r for r in refs]
        return RequestSpec("POST", "/v1/jobs", json=body, headers=headers)

    data: dict[str, Any] = {}
    for name, value in plain.items():
        if name in _LIST_OF_STRINGS and isinstance(value, list):
            data[name] = [str(v) for v in value]
        else:
            data[name] = _form_value(value)
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    for name, img in [*images.items(), *(("images", r) for r in refs)]:
        if isinstance(img, Upload):
            files.append((name, (img.filename, img.data, img.content_type)))
        elif name == "images":
            data.setdefault("images", []).append(img)
        else:
            data[name] = img
    return RequestSpec("POST", "/v1/jobs", data=data, files=files, headers=headers)


def submit_fields(operation: str, **fields: Any) -> dict[str, Any]:
    """The request fields of a submit call: ``extra_fields`` merged in, client-only options removed."""
    extra = fields.pop("extra_fields", None) or {}
    fields.pop("idempotency_key", None)
    return {"operation": operation, **fields, **dict(extra)}


def list_spec(status: str | Sequence[str] | None, limit: int, cursor: str | None) -> RequestSpec:
    params: list[tuple[str, str]] = [("limit", str(limit))]
    if status:
        params.append(("status", status if isinstance(status, str) else ",".join(status)))
    if cursor:
        params.append(("cursor", cursor))
    return RequestSpec("GET", "/v1/jobs", params=params)


def cancel_spec(job_id: str, reason: str | None) -> RequestSpec:
    return RequestSpec("POST", f"/v1/jobs/{job_id}/cancel", json={"reason": reason} if reason else None)


def page_from(body: Any) -> JobPage:
    data = body.get("data") if isinstance(body, Mapping) else None
    cursor = body.get("next_cursor") if isinstance(body, Mapping) else None
    jobs = [Job.from_dict(j) for j in data if isinstance(j, Mapping)] if isinstance(data, list) else []
    return JobPage(jobs=jobs, next_cursor=cursor if isinstance(cursor, str) and cursor else None)


def models_from(response: httpx.Response) -> list[Model]:
    """The models of a ``GET /v1/models`` answer, in catalog order. Raises APIError for a body that is
    not a list of models."""
    body = response.json()
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise APIError("the API answered with something that is not a list of models",
                       status_code=response.status_code, code="invalid_response")
    return [Model.from_dict(m) for m in data if isinstance(m, Mapping)]


def job_from(response: httpx.Response) -> Job:
    body = response.json()
    if not isinstance(body, Mapping):
        raise APIError("the API answered with something that is not a job", status_code=response.status_code,
                       code="invalid_response")
    return Job.from_dict(body)


# -- errors and retries --------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return max(0.0, seconds) if math.isfinite(seconds) or seconds > 0 else None  # NaN, -inf → None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, float(when.timestamp()) - (time.time() if now is None else now))


def error_from_response(response: httpx.Response, body: bytes | None = None) -> APIError:
    """The typed error for an HTTP error response (the body must have been read)."""
    raw = response.content if body is None else body
    code, message, param, decoded = f"http_{response.status_code}", "", None, None
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        decoded = None
    if isinstance(decoded, Mapping) and isinstance(decoded.get("error"), Mapping):
        err = decoded["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or "")
        param = err.get("param") if isinstance(err.get("param"), str) else None
    if not message:
        text = raw.decode("utf-8", "replace").strip() if raw else ""
        message = text[:200] or response.reason_phrase or f"HTTP {response.status_code}"
    cls = error_class(response.status_code)
    kwargs: dict[str, Any] = {"status_code": response.status_code, "code": code, "param": param,
                              "headers": dict(response.headers), "body": decoded}
    if cls in (RateLimited, Unavailable):
        kwargs["retry_after"] = parse_retry_after(response.headers.get("retry-after"))
    return cls(message, **kwargs)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry 429 and 503 (nothing was created; after a submit's 503 ``store_unavailable`` a job may have
    been kept, but a submit always carries an Idempotency-Key, so its retry returns that job) and, for
    GET, 502/504 and lost connections;
    a connection that was never made is retried for any request.

    The wait is the response's ``Retry-After`` when it gives one, otherwise an exponential backoff
    with jitter (``backoff_s * 2**attempt``); a ``Retry-After`` longer than ``max_wait_s`` is not
    waited for (the error is raised at once), and every wait is at most ``max_wait_s``.
    """

    max_retries: int = 3
    max_wait_s: float = 60.0
    backoff_s: float = 0.5

    def _backoff(self, attempt: int) -> float:
        return min(self.max_wait_s, self.backoff_s * (2.0 ** attempt)) * (0.5 + random.random() / 2)

    def delay_for_response(self, attempt: int, spec: RequestSpec, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying after ``response``, or None to give up."""
        if attempt >= self.max_retries:
            return None
        status = response.status_code
        if status not in RETRY_STATUSES and not (spec.idempotent and status in RETRY_STATUSES_IDEMPOTENT):
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None:
            return self._backoff(attempt)
        if retry_after > self.max_wait_s:
            return None
        return retry_after

    def delay_for_error(self, attempt: int, spec: RequestSpec, exc: httpx.TransportError) -> float | None:
        if attempt >= self.max_retries:
            return None
        never_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
        if never_sent or (spec.idempotent and isinstance(exc, (httpx.ReadError, httpx.ReadTimeout,
                                                                httpx.RemoteProtocolError))):
            return self._backoff(attempt)
        return None


# -- downloads -----------------------------------------------------------------------------------


def outputs_of(target: Job | Output | Sequence[Output]) -> tuple[list[Output], str | None]:
    """(outputs, the job id when a Job was given)."""
    if isinstance(target, Job):
        return list(target.outputs), target.id
    if isinstance(target, Output):
        return [target], None
    outputs = list(target)
    if not all(isinstance(o, Output) for o in outputs):
        raise TypeError("download() takes a Job, an Output or a list of Outputs")
    return outputs, None


def output_filename(output: Output, index: int) -> str:
    """``<job id>_<name>`` from a key like ``tenants/t/jobs/<job id>/outputs/0.png``."""
    parts = [p for p in output.key.split("/") if p and p not in (".", "..")]
    if "jobs" in parts[:-1]:
        job_id = parts[parts.index("jobs") + 1] if parts.index("jobs") + 1 < len(parts) - 1 else ""
        name = parts[-1]
        return f"{job_id}_{name}" if job_id else name
    if parts:
        return parts[-1]
    return f"output_{index}.{output.extension}"


def check_integrity(output: Output, data: bytes) -> None:
    import hashlib

    from editfarm_client.errors import IntegrityError

    if output.size_bytes >= 0 and len(data) != output.size_bytes:
        raise IntegrityError(f"{output.key}: got {len(data)} bytes, expected {output.size_bytes}")
    if output.sha256 and hashlib.sha256(data).hexdigest() != output.sha256.lower():
        raise IntegrityError(f"{output.key}: sha256 does not match")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def stream_timeout(timeout_s: float, stream_read_timeout_s: float) -> httpx.Timeout:
    return httpx.Timeout(timeout_s, read=stream_read_timeout_s)


def sse_retry_delay(retry_ms: int | None, failures: int) -> float:
    base = retry_ms / 1000 if retry_ms is not None else 1.0
    return min(30.0, base * (2.0 ** max(0, failures - 1)))


def decode_sse(event: str, data: str) -> JobEvent | None:
    from editfarm_client.models import event_from_sse

    try:
        decoded = json.loads(data)
    except ValueError:
        return None
    return event_from_sse(event, decoded)


def inpaint_check(mask: ImageInput | None, boxes: Sequence[Box] | None) -> None:
    if mask is None and not boxes:
        raise ValueError("inpaint needs a mask or boxes")
