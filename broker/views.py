"""The public view of a job: what the API returns and webhooks carry.

Internal fields (lease, worker, tenant) stay inside; times become ISO-8601;
outputs get presigned URLs from the caller's ``presign`` function.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from broker.schema import Job, model_of


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def job_view(job: Job, presign: Callable[[str], str], base_url: str = "", *,
             data_removed: bool = False) -> dict[str, Any]:
    """The job as the public JSON object. ``presign(key)`` returns a GET URL for an output key;
    ``data_removed``: the job's objects were deleted by their retention, so outputs have no URL."""
    params = job.params.model_dump(mode="json")
    return {
        "id": job.id,
        "status": job.status.value,
        "operation": params["operation"],
        "model": model_of(job),
        "params": params,
        "progress": job.progress.model_dump(),
        "outputs": [
            {**out.model_dump(), "url": None if data_removed else presign(out.key)} for out in job.outputs
        ],
        "data_removed": data_removed,
        "error": job.error.model_dump() if job.error else None,
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "urls": {
            "self": f"{base_url}/v1/jobs/{job.id}",
            "cancel": f"{base_url}/v1/jobs/{job.id}/cancel",
        },
    }
