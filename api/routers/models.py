"""``GET /v1/models``: the models this cluster serves, each with its live state."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.auth import TenantDep
from api.deps import Services, ServicesDep
from api.errors import STORE_ERRORS
from api.models import ModelList
from api.views import ERRORS, unavailable
from broker.catalog import ModelSpec
from broker.schema import PRIORITY_ORDER

logger = logging.getLogger("editfarm.api")
router = APIRouter(tags=["models"])


def _state(services: Services, spec: ModelSpec) -> dict[str, Any]:
    """What a model's pool is doing now (blocking reads: run off the loop). Raises STORE_ERRORS."""
    store, fleet = services.store, services.fleet
    return {
        "workers_ready": fleet.workers(spec.name),
        "queued": sum(store.queued_count(priority, spec.name) for priority in PRIORITY_ORDER),
        "running": store.running_count(spec.name),
        "median_render_s": fleet.median_render_s(spec.name),
    }


def model_view(services: Services, spec: ModelSpec) -> dict[str, Any]:
    """One model as ``GET /v1/models`` lists it: no ``source`` (a folder on the workers is not the
    tenants' business), no fused LoRA locations. Raises STORE_ERRORS."""
    return {
        "name": spec.name,
        "pipeline": spec.pipeline,
        "operations": [op.value for op in spec.operations],
        "default_for": [op.value for op in services.catalog.default_operations(spec.name)],
        "defaults": {"steps": spec.defaults.steps, "true_cfg_scale": spec.defaults.true_cfg_scale},
        "max_side_px": spec.max_side_px,
        "state": _state(services, spec),
    }


@router.get(
    "/v1/models", summary="List the models", response_model=None,
    responses={200: {"model": ModelList, "description": "Every model of the cluster, with its live state."},
               **ERRORS},
)
async def list_models(tenant: TenantDep, services: ServicesDep) -> JSONResponse:
    """Every model jobs may name (``model`` of ``POST /v1/jobs``), in catalog order: its pipeline, the
    operations it serves and those it is the default for, its defaults, and its pool's state now —
    render workers ready (0: its jobs wait queued until one starts), jobs queued and running, and the
    median render seconds of its last renders."""

    def listing() -> list[dict[str, Any]]:
        return [model_view(services, spec) for spec in services.catalog]

    try:
        data = await run_in_threadpool(listing)
    except STORE_ERRORS as exc:
        logger.warning("job store unavailable listing the models: %s", type(exc).__name__)
        raise unavailable("the job store") from None
    return JSONResponse({"object": "list", "data": data}, headers={"Cache-Control": "no-store"})
