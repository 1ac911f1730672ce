"""Retention on the API side: the retention a new job gets, and the archive a job deleted from Redis
is read from."""

from __future__ import annotations

import logging
import re

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


def settle_retention(services: Services, tenant: str, params: JobParams) -> JobParams:
    """``params`` with the retention the job gets written into ``retention_s`` (blocking: reads the
    tenant's setting).

    Raises:
        ApiError: 422 invalid_parameter when the job asks for a longer retention than its tenant's;
            503 unavailable when the tenant store is unreachable.
    """
    try:
        tenant_s = services.tenants.retention_s(tenant)
    except STORE_ERRORS as exc:
        logger.warning("tenant store unavailable reading a retention: %s", type(exc).__name__)
        raise unavailable("the job store") from None
    try:
        settled = job_retention_s(params.retention_s, tenant_s, services.settings.job_retention_s)
    except RetentionTooLong as exc:
        raise ApiError(422, ErrorCode.INVALID_PARAMETER, str(exc), param="retention_s") from None
    if settled == params.retention_s:
        return params
    return params.model_copy(update={"retention_s": settled})


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
