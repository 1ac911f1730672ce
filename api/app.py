"""The FastAPI application factory.

Run it with ``uvicorn --factory api.app:create_app`` (settings from
``EDITFARM_`` environment variables) or ``python -m api``.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.auth import parse_api_keys
from api.deps import Services
from api.errors import install_error_handlers
from api.limits import LimitsMemory
from api.malloc import fix_mmap_threshold
from api.metrics import ApiMetrics, MetricsMiddleware
from api.models import component_schemas
from api.routers import deliveries, health, jobs, models, monitoring, submit, ui
from api.settings import ApiSettings
from api.uploads import UploadSlots

logger = logging.getLogger("editfarm.api")

DESCRIPTION = """\
Submit Qwen-Image-Edit jobs and follow them.

Authenticate with `Authorization: Bearer <key>`. `POST /v1/jobs` takes JSON
(image as a `data:` or `https://` URL) or multipart/form-data (image as a file);
the job is rendered asynchronously, outputs land in the object store and are
returned as presigned URLs; an optional signed webhook reports completion.
Every error is `{"error": {"code", "message", "param"?}}`.

Submissions are limited per tenant (429 `rate_limited` / `too_many_jobs`, with
`Retry-After`); an `Idempotency-Key` header makes a submission safe to retry.
`GET /v1/jobs/{id}/deliveries` shows a job's webhook attempts and
`POST /v1/jobs/{id}/deliveries/redeliver` sends its webhook again.

`GET /v1/jobs/{id}/events` streams a job's status and progress as Server-Sent
Events. `GET /metrics` (Prometheus, no auth) is for the cluster network only.
"""


def _version() -> str:
    try:
        return importlib.metadata.version("editfarm")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


_startup_heap_frozen = False


def freeze_startup_heap() -> None:
    """Once per process, when the server starts: collect, then move every object alive now (modules,
    classes, schemas, clients: most of the process's objects) to the collector's permanent generation.

    Submissions in flight keep their objects alive across young collections, so they reach the
    oldest generation and trigger a full collection every thousand or so requests; each used to walk
    the whole startup heap, a pause that grows with the heap (docs/performance.md). Frozen objects are
    never walked again (nor freed: they live as long as the process anyway).
    """
    global _startup_heap_frozen
    if not _startup_heap_frozen:
        _startup_heap_frozen = True
        gc.collect()
        gc.freeze()


def create_app(settings: ApiSettings | None = None, services: Services | None = None) -> FastAPI:
    """Build the API.

    ``settings`` default to the environment (or to ``services.settings``);
    ``services`` default to the real cluster (:meth:`Services.from_settings`).
    When both are given, ``settings`` wins. Raises ValueError if
    ``EDITFARM_API_KEYS`` is malformed (the message never contains a key).
    """
    if settings is None:
        settings = services.settings if services is not None else ApiSettings()
    api_keys = parse_api_keys(settings.api_keys.get_secret_value())
    if not len(api_keys):
        logger.warning("EDITFARM_API_KEYS is empty: every authenticated request will get 401")
    if services is None:
        services = Services.from_settings(settings)
    elif services.settings is not settings:
        services = dataclasses.replace(services, settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        freeze_startup_heap()
        yield
        for close in services.closers:
            try:
                closing = close()
                if inspect.isawaitable(closing):
                    await closing
            except Exception:  # shutting down anyway
                logger.warning("error closing a client at shutdown", exc_info=True)

    app = FastAPI(
        title="editfarm job API", version=_version(), description=DESCRIPTION,
        openapi_url="/openapi.json", docs_url="/docs", redoc_url=None, lifespan=lifespan,
    )
    app.state.services = services
    app.state.api_keys = api_keys
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads, settings.uploads_per_tenant())
    app.state.limits_memory = LimitsMemory()
    # process-wide and idempotent: each app built in a process sets the same value
    fix_mmap_threshold(settings.malloc_mmap_threshold_bytes)
    # its own registry per app; gauges read the store of app.state.services at scrape time
    app.state.metrics = metrics = ApiMetrics(lambda: app.state.services.store, settings.metrics_store_timeout_s,
                                             models=lambda: app.state.services.catalog.names)
    install_error_handlers(app)
    # the outermost of the app's own middleware: counts every request, and answers (and counts) any
    # unexpected exception as 500 internal_error
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(health.router)
    app.include_router(submit.router)
    app.include_router(jobs.router)
    app.include_router(deliveries.router)
    app.include_router(models.router)
    app.include_router(monitoring.router)
    app.include_router(ui.router)
    _add_component_schemas(app)
    return app


def _add_component_schemas(app: FastAPI) -> None:
    """Publish the request-body schemas that POST /v1/jobs references via ``openapi_extra``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


# `uvicorn --factory api.app:app` works too: it is the factory, not an instance,
# so importing this module reads no environment and connects to nothing.
app = create_app
