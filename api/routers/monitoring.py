"""``GET /metrics``: Prometheus text exposition (no auth: meant for the cluster network only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.metrics import ApiMetrics

router = APIRouter(tags=["monitoring"])


@router.get(
    "/metrics", summary="Prometheus metrics (unauthenticated; expose on the cluster network only)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "Prometheus text format 0.0.4."}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Request counts and latency, jobs submitted/canceled, queue depth per priority, running jobs.

    Queue depth and running jobs are read from the job store at scrape time and
    are left out (``editfarm_job_store_up 0``) when it does not answer; the
    scrape itself still succeeds.
    """
    metrics: ApiMetrics = request.app.state.metrics
    body = await run_in_threadpool(generate_latest, metrics.registry)  # the store is read: off the loop
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
