"""API errors: one JSON shape for every error response.

Every error body is ``{"error": {"code": ..., "message": ..., "param"?: ...}}``
with ``code`` from :class:`broker.schema.ErrorCode`. Handlers here translate
FastAPI/Starlette/pydantic errors into that shape; the app's outermost pure ASGI middleware
(:class:`api.metrics.MetricsMiddleware`) turns any unexpected exception into a 500
``internal_error`` (logged, never echoed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from broker.schema import ErrorCode
from broker.tenanttext import tenant_message

# what the job store, the limits, the idempotency keys and the delivery log raise when Redis is
# unreachable: a request answers 503 (retry later), never 500
STORE_ERRORS = (redis.exceptions.RedisError, OSError)

logger = logging.getLogger("editfarm.api")


class ApiError(Exception):
    """An error to return to the client as-is (status, code, message, optional param)."""

    def __init__(
        self,
        status_code: int,
        code: ErrorCode | str,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code.value if isinstance(code, ErrorCode) else code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        message = tenant_message(self.message)
        if message != self.message:  # a last guard: internals never reach a client
            logger.warning("error message withheld from the client (%s): %s", self.code, self.message)
        error: dict[str, Any] = {"code": self.code, "message": message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers or None)


class ErrorDetail(BaseModel):
    """Documentation model of an error (OpenAPI only)."""

    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """Documentation model of every error body (OpenAPI only)."""

    error: ErrorDetail


# Where FastAPI puts a field's location prefix; the client only cares about the field name.
_LOC_PREFIXES = {"body", "query", "path", "header", "cookie"}


def from_validation_errors(errors: Iterable[Mapping[str, Any]]) -> ApiError:
    """Map pydantic errors to one ApiError; the first error decides.

    ``missing`` → 422 missing_field (``image`` → missing_image); ``operation`` →
    422 unknown_operation; ``json_invalid`` → 400 invalid_json; anything else
    (wrong type, out of range, unknown field) → 422 invalid_parameter. Messages
    never echo the input value.
    """
    for err in errors:
        # list indexes are dropped: `webhook_events.1` is reported as `webhook_events`
        loc = [str(p) for p in err.get("loc", ()) if p not in _LOC_PREFIXES and not isinstance(p, int)]
        param = ".".join(loc) or None
        kind = str(err.get("type", ""))
        if kind == "json_invalid":
            return ApiError(400, ErrorCode.INVALID_JSON, "request body is not valid JSON")
        if kind == "missing":
            code = ErrorCode.MISSING_IMAGE if param == "image" else ErrorCode.MISSING_FIELD
            return ApiError(422, code, f"{param or 'a field'} is required", param=param)
        if kind == "extra_forbidden":
            return ApiError(422, ErrorCode.INVALID_PARAMETER, f"unknown field {param!r}", param=param)
        if param == "operation":
            return ApiError(422, ErrorCode.UNKNOWN_OPERATION, f"operation: {err.get('msg', 'unknown')}",
                            param=param)
        return ApiError(422, ErrorCode.INVALID_PARAMETER, f"{param}: {err.get('msg', 'invalid')}", param=param)
    return ApiError(422, ErrorCode.INVALID_REQUEST, "invalid request")


_HTTP_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    503: ErrorCode.UNAVAILABLE,
}
_HTTP_MESSAGES = {404: "not found", 405: "method not allowed"}


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation_errors(exc.errors()).response()


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.INTERNAL_ERROR)
    message = _HTTP_MESSAGES.get(status) or (exc.detail if isinstance(exc.detail, str) else code.value)
    # keep headers such as Allow (405) and WWW-Authenticate (401)
    headers = dict(exc.headers or {})
    if status == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return ApiError(status, code, message, headers=headers).response()


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            methods.append(method)
    return ", ".join(methods)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``. The catch-all for unexpected exceptions is part of the app's
    outermost middleware (:class:`api.metrics.MetricsMiddleware`, see :func:`internal_error`)."""
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)


def store_unavailable() -> ApiError:
    """503 ``store_unavailable``: the job store's replicas did not confirm a write in time
    (``EDITFARM_REDIS_MIN_REPLICAS``, broker/replication.py). Retrying with the same Idempotency-Key
    is safe: it returns the job if one was kept, and creates one otherwise."""
    return ApiError(503, ErrorCode.STORE_UNAVAILABLE,
                    "the job store could not confirm the job on its replicas in time; retry with the same "
                    "Idempotency-Key", headers={"Retry-After": "1"})


def internal_error() -> ApiError:
    """What an unexpected exception is answered with: 500 internal_error instead of a bare text page.

    The catch-all sits inside Starlette's ServerErrorMiddleware, so the exception is answered (and
    logged once, with its traceback but no request headers) rather than re-raised to the server. If
    the response had already started it cannot be replaced, so the exception is re-raised.
    """
    return ApiError(500, ErrorCode.INTERNAL_ERROR, "internal error; the request was not completed")
