"""Liveness and readiness probes (no auth; they reveal no secrets or addresses)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import Services, ServicesDep
from broker.schema import ErrorCode

logger = logging.getLogger("editfarm.api")
router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    """Always 200 ``{"status": "ok"}`` while the process serves requests; touches no dependency."""
    return {"status": "ok"}


def _check_dependencies(services: Services) -> dict[str, str]:
    """``{"redis": ..., "objects": ...}`` each ``ok``, ``unavailable`` or ``not_configured`` (blocking)."""
    checks: dict[str, str] = {}
    if services.redis is None:
        checks["redis"] = "not_configured"
    else:
        try:
            services.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            logger.warning("readyz: redis unavailable: %s", type(exc).__name__)
            checks["redis"] = "unavailable"
    try:
        services.objects.check()
        checks["objects"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        logger.warning("readyz: object store unavailable: %s", type(exc).__name__)
        checks["objects"] = "unavailable"
    return checks


@router.get(
    "/readyz", summary="Readiness: Redis and the object store answer",
    responses={503: {"description": "A dependency is unavailable; `checks` says which."}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """200 ``{"status": "ok", "checks": {...}}``, or 503 with ``status: unavailable``, the
    failing checks, and the standard ``error`` object (code ``unavailable``)."""
    checks = await run_in_threadpool(_check_dependencies, services)
    failed = [name for name, state in checks.items() if state == "unavailable"]
    if not failed:
        return JSONResponse({"status": "ok", "checks": checks})
    body: dict[str, Any] = {
        "status": "unavailable",
        "checks": checks,
        "error": {"code": ErrorCode.UNAVAILABLE.value, "message": f"unavailable: {', '.join(failed)}"},
    }
    return JSONResponse(body, status_code=503)
