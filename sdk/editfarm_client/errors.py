"""Typed errors.

Every error the client raises is an :class:`EditfarmError`. Errors answered by
the API carry its ``{"error": {"code", "message", "param"}}`` body as
``.code``, ``.message`` and ``.param``, plus the HTTP ``.status_code``::

    EditfarmError
    ├── APIError                  the API answered with an error status
    │   ├── BadRequest            400, 413, 415, 422 and any other 4xx not below
    │   │   └── PayloadTooLarge   413
    │   ├── Unauthorized          401
    │   ├── PermissionDenied      403
    │   ├── NotFound              404
    │   ├── Conflict              409 (e.g. ``job_finished`` when canceling an ended job)
    │   ├── RateLimited           429 (``.retry_after`` seconds, if the API said)
    │   └── ServerError           5xx
    │       └── Unavailable       503 (``.retry_after`` too)
    ├── APIConnectionError        the API could not be reached (connection refused, timeout, ...)
    ├── JobFailed                 ``Job.raise_for_status()`` on a failed or canceled job
    ├── WaitTimeout               ``wait()`` ran out of time (also a ``TimeoutError``)
    ├── IntegrityError            a downloaded output does not match its ``sha256``/``size_bytes``
    └── WebhookVerificationError  ``verify_webhook()`` refused a message
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from editfarm_client.models import Job


class EditfarmError(Exception):
    """Base class of every error raised by ``editfarm_client``.

    ``code`` is a machine-readable string (the API's ``error.code`` where there
    is one), ``message`` a human-readable sentence.
    """

    def __init__(self, message: str, *, code: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class APIError(EditfarmError):
    """The API answered with an HTTP error status.

    Attributes: ``status_code``, ``code`` (e.g. ``"invalid_image"``), ``message``,
    ``param`` (the offending field, when the API named one), ``headers`` (the
    response headers) and ``body`` (the decoded JSON body, or None).
    """

    def __init__(self, message: str, *, status_code: int, code: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None, body: Any = None) -> None:
        super().__init__(message, code=code)
        self.status_code = status_code
        self.param = param
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status_code} {self.code}: {self.message}{where}"


class BadRequest(APIError):
    """The request was refused as invalid (400, 413, 415, 422, or another 4xx without its own class).

    ``code`` tells why: e.g. ``invalid_image``, ``missing_field``, ``unknown_operation``, and for a
    job's ``model`` (``param == "model"``) ``unknown_model`` (no model of that name: see
    ``client.models()``) or ``unsupported_operation`` (the model does not serve the operation).
    """


class PayloadTooLarge(BadRequest):
    """413: the body or the image is over the API's limits."""


class Unauthorized(APIError):
    """401: the API key is missing or wrong."""


class PermissionDenied(APIError):
    """403: the key may not do this."""


class NotFound(APIError):
    """404: no such job (another tenant's job answers the same), or no such route."""


class Conflict(APIError):
    """409: the request conflicts with the job's state (``job_finished``: it already ended)."""


class RateLimited(APIError):
    """429: too many requests. ``retry_after`` is the wait the API asked for, in seconds (or None)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx: the API failed; retrying later may help."""


class Unavailable(ServerError):
    """503: a part of the cluster (Redis, the object store, the queue) is down; nothing was created."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class APIConnectionError(EditfarmError):
    """The API could not be reached or did not answer in time (``__cause__`` is the httpx error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="connection_error")


class JobFailed(EditfarmError):
    """A job ended ``failed`` or ``canceled``; ``job`` is the job, ``code`` its ``error.code``."""

    def __init__(self, job: Job) -> None:
        code = job.error.code if job.error else job.status
        message = job.error.message if job.error else f"job {job.id} ended {job.status}"
        super().__init__(message, code=code)
        self.job = job


class WaitTimeout(EditfarmError, TimeoutError):
    """``wait()`` gave up before the job ended; ``job`` is its last known state."""

    def __init__(self, message: str, job: Job | None = None) -> None:
        super().__init__(message, code="wait_timeout")
        self.job = job


class IntegrityError(EditfarmError):
    """A downloaded output's bytes do not match the job's ``sha256`` or ``size_bytes``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="integrity_error")


class WebhookVerificationError(EditfarmError):
    """A webhook message was refused: missing headers, stale or future timestamp, or no valid signature."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="webhook_verification_failed")


_BY_STATUS: dict[int, type[APIError]] = {
    401: Unauthorized,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
}


def error_class(status_code: int) -> type[APIError]:
    """The :class:`APIError` subclass raised for an HTTP error status."""
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if status_code >= 500:
        return ServerError
    return BadRequest
