"""Retention on the API side: the retention a new job gets, and the archive a job deleted from Redis
is read from."""

from __future__ import annotations

import logging
import re
import time

from starlette.concurrency import run_in_threadpool

from api.deps import Services
from api.errors import STORE_ERRORS, ApiError
from api.views import unavailable
from broker import keys
from broker.retention import RetentionTooLong, job_retention_s
from broker.schema import ErrorCode, Job, JobParams
from storage import ObjectNotFound

logger = logging.getLogger("editfarm.api")

# what a job id may look like before it becomes part of an object key (ids are "job_" + hex)
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# A tenant's own retention, per process, for a few seconds: read on every submission, changed rarely
# (`editfarm retention set` reaches new submissions within this delay). Keyed by the tenant store's
# identity as well, so test apps with their own stores never share entries. Bounded: cleared when full.
TENANT_RETENTION_CACHE_S = 5.0
_CACHE_MAX = 10_000
_cache: dict[tuple[int, str], tuple[float, int | None]] = {}


def clear_tenant_retention_cache() -> None:
    """Forget every cached tenant retention (tests that change one between submissions)."""
    _cache.clear()


def _tenant_retention_s(services: Services, tenant: str) -> int | None:
    """The tenant's own retention (blocking on a cache miss).

    Raises:
        ApiError: 503 unavailable when the tenant store is unreachable.
    """
    key = (id(services.tenants), tenant)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and now - hit[0] < TENANT_RETENTION_CACHE_S:
        return hit[1]
    try:
        value = services.tenants.retention_s(tenant)
    except STORE_ERRORS as exc:
        logger.warning("tenant store unavailable reading a retention: %s", type(exc).__name__)
        raise unavailable("the job store") from None
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = (now, value)
    return value


def settle_retention(services: Services, tenant: str, params: JobParams) -> JobParams:
    """``params`` with the retention the job gets written into ``retention_s`` (blocking on a cache
    miss: reads the tenant's setting).

    Raises:
        ApiError: 422 invalid_parameter when the job asks for a longer retention than its tenant's;
            503 unavailable when the tenant store is unreachable.
    """
    try:
        settled = job_retention_s(params.retention_s, _tenant_retention_s(services, tenant),
                                  services.settings.job_retention_s)
    except RetentionTooLong as exc:
        raise ApiError(422, ErrorCode.INVALID_PARAMETER, str(exc), param="retention_s") from None
    if settled == params.retention_s:
        return params
    return params.model_copy(update={"retention_s": settled})


async def settle_retention_async(services: Services, tenant: str, params: JobParams) -> JobParams:
    """:func:`settle_retention` on the event loop when the tenant's setting is cached, else in a thread."""
    hit = _cache.get((id(services.tenants), tenant))
    if hit is not None and time.monotonic() - hit[0] < TENANT_RETENTION_CACHE_S:
        return settle_retention(services, tenant, params)
    return await run_in_threadpool(settle_retention, services, tenant, params)


def archived_job(services: Services, job_id: str, tenant: str) -> Job | None:
    """The tenant's job from the archive (None: archiving is off, or no such archived job).

    Raises:
        storage.StorageUnavailable: the object store is unreachable.
    """
    if not services.settings.archive_jobs or not _JOB_ID.fullmatch(job_id):
        return None
    try:
        raw = services.objects.get(keys.job_archive_object(tenant, job_id))
    except ObjectNotFound:
        return None
    try:
        job = Job.model_validate_json(raw)
    except ValueError:
        logger.warning("archived record of %s does not parse; answering 404", job_id)
        return None
    return job if job.tenant == tenant and job.id == job_id else None
