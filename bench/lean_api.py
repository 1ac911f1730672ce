"""A bench-only PROTOTYPE of the submission fast path proposed for ``api/`` and ``broker/``.

``uvicorn --factory bench.lean_api:create_app``: the real API (``api.app.create_app``: same
middleware, auth, settings, services) plus ``POST /v1/jobs-lean``, which is ``submit_job``
with the proposed changes (``bench.submit`` loads it as the ``api-proposed`` variant):

1. the job record, the Celery message and the queue position in ONE Redis round trip, on
   the event loop (``redis.asyncio``): a Lua script that is the job store's create script
   plus ``LPUSH`` of the message onto the priority's Celery list plus the strict-priority
   queue position (``ZRANK``/``ZCARD`` of ``editfarm:queued:*``). Today: three thread-pool
   hops and five round trips (create, LPUSH, PUBLISH of Celery's ``task-sent`` event, the
   position pipeline). Creating and enqueuing atomically also closes the window in which a
   job exists but its message does not (``_fail_unqueued``).
2. the Celery message built from a template (made once with ``send_task`` at startup; per
   job only the job id, task id and delivery tag change) instead of ``send_task`` per
   request (~1 ms of CPU in kombu), and no ``task-sent`` event (Flower still sees
   ``task-received``/``task-started`` from the workers).
3. no thread-pool hop to store inputs when a job has none (generate).
4. the per-tenant submission limits (in-flight cap, then the sliding-window rate) checked in
   one Lua script on the event loop, still as a route dependency before the body is read
   (same order, same counting, same 429s): today two thread-pool hops and two round trips.

Thread-pool hops per generate submission: 8 today (get_api_keys, tenant_active_count,
RateLimiter.hit, get_services, _store_inputs, create, enqueue_render, queue_position), 2 here.
The last two are not prototyped: ``api.deps.get_services`` and ``api.auth.get_api_keys`` only
read ``app.state`` but are plain ``def``, which FastAPI runs in the thread pool on every
request; declaring them ``async def`` removes both hops.

Everything else is the real code, called in the same order as ``submit_job`` (submission
limits, body parsing, input limits, Idempotency-Key, the two pydantic validations, URL
policy, image intake, view, metrics, headers): only the store/queue part differs. It
follows ``api/routers/jobs.py`` as of this benchmark; a new step added there must be added
here too for the comparison to stay fair.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.app import create_app as create_real_app
from api.auth import TenantDep
from api.deps import ServicesDep
from api.routers import jobs
from broker import keys
from broker.celery_app import RENDER_QUEUE, RENDER_QUEUES, RENDER_TASK, make_celery
from broker.schema import Job, dump_fields, new_job_id
from broker.store import _INDEX_KEYS, _REINDEX, _encode

# KEYS: job hash, the 6 index keys, the tenant's job list, the Celery list.
# ARGV: job id, created_at, the message, then field/value pairs. Returns the queue position,
# or -1 if the id is taken.
CREATE_AND_ENQUEUE = _REINDEX + """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4, #ARGV))
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
reindex(ARGV[1])
redis.call('LPUSH', KEYS[9], ARGV[3])
local ahead = 0
for i = 2, 4 do
  local rank = redis.call('ZRANK', KEYS[i], ARGV[1])
  if rank then return ahead + rank end
  ahead = ahead + redis.call('ZCARD', KEYS[i])
end
return -2
"""

# The two per-tenant submission limits of api/limits.py in one script (same order, same sliding
# window): KEYS: the tenant's active set, this window's counter, the previous window's.
# ARGV: max jobs in flight (0: off), weight of the previous window, rate limit (0: off), counter ttl.
# Returns {1} (allowed), {-1, active} (too many jobs) or {0, previous, current} (rate limited).
LIMITS = """
if tonumber(ARGV[1]) > 0 then
  local active = redis.call('SCARD', KEYS[1])
  if active >= tonumber(ARGV[1]) then return {-1, active} end
end
if tonumber(ARGV[3]) == 0 then return {1} end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local previous = tonumber(redis.call('GET', KEYS[3]) or '0')
if previous * tonumber(ARGV[2]) + current > tonumber(ARGV[3]) - 1 then return {0, previous, current} end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1}
"""

TEMPLATE_QUEUE = "editfarm:bench:lean-template"


async def _no_idempotency() -> None:
    return None


# the route's Idempotency-Key dependency, where the API has one (module level: annotations are strings)
IdempotencyDepOrNone: Any = getattr(jobs, "IdempotencyDep", None) or Annotated[None, Depends(_no_idempotency)]


class MessageFactory:
    """Celery render messages, as ``send_task`` would LPUSH them, from one captured template."""

    def __init__(self, redis_url: str) -> None:
        client = redis.Redis.from_url(redis_url)
        app = make_celery(redis_url)
        app.conf.task_send_sent_event = False
        app.send_task(RENDER_TASK, args=["job_" + "0" * 24], queue=TEMPLATE_QUEUE)
        raw = client.lpop(TEMPLATE_QUEUE)
        app.close()
        client.close()
        assert isinstance(raw, (bytes, str))
        self.template: dict[str, Any] = json.loads(raw)
        self.embed = json.loads(base64.b64decode(self.template["body"]))[2]

    def message(self, job_id: str, queue: str) -> str:
        task_id = str(uuid.uuid4())
        body = json.dumps([[job_id], {}, self.embed]).encode()
        headers = {**self.template["headers"], "id": task_id, "root_id": task_id, "argsrepr": repr([job_id])}
        properties = {**self.template["properties"], "correlation_id": task_id,
                      "delivery_tag": str(uuid.uuid4()),
                      "delivery_info": {"exchange": "", "routing_key": queue}}
        return json.dumps({**self.template, "body": base64.b64encode(body).decode(), "headers": headers,
                           "properties": properties})


def create_app() -> FastAPI:
    app = create_real_app()
    services = app.state.services
    factory = MessageFactory(services.settings.redis_url)
    client = aioredis.Redis.from_url(services.settings.redis_url, max_connections=256, socket_timeout=10)
    script = client.register_script(CREATE_AND_ENQUEUE)

    async def create_and_enqueue(job: Job) -> int | None:
        queue = RENDER_QUEUES.get(job.params.priority.value, RENDER_QUEUE)
        flat: list[Any] = [job.id, repr(job.created_at), factory.message(job.id, queue)]
        for name, value in dump_fields(job).items():
            flat += [name, _encode(value)]
        position = int(await script(keys=[keys.job(job.id), *_INDEX_KEYS, keys.tenant_jobs(job.tenant), queue],
                                    args=flat))
        if position == -1:
            raise KeyError(job.id)
        return position if position >= 0 else None

    limits_script = client.register_script(LIMITS)

    async def enforce_limits(request: Request, tenant: TenantDep) -> None:
        """api.limits.enforce_submission_limits in one round trip on the event loop (same errors)."""
        import time

        from api import limits

        settings = request.app.state.services.settings
        if not (settings.max_jobs_in_flight or settings.rate_limit_per_min):
            return
        index, elapsed = limits._window(time.time())
        try:
            answer = await limits_script(
                keys=[keys.tenant_active(tenant), keys.rate_window(tenant, index), keys.rate_window(tenant, index - 1)],
                args=[settings.max_jobs_in_flight, repr(1.0 - elapsed / limits.WINDOW_S), settings.rate_limit_per_min,
                      limits._COUNTER_TTL_S])
        except (redis.exceptions.RedisError, OSError) as exc:
            raise jobs.ApiError(503, jobs.ErrorCode.UNAVAILABLE, "the job store is unavailable; retry later") from exc
        if int(answer[0]) == -1:
            raise limits._too_many(limits.ErrorCode.TOO_MANY_JOBS, f"{answer[1]} of your jobs are queued or running",
                                   limits.IN_FLIGHT_RETRY_AFTER_S)
        if int(answer[0]) == 0:
            limit = settings.rate_limit_per_min
            wait = limits.retry_after_s(int(answer[1]), int(answer[2]), elapsed, limit)
            raise limits._too_many(limits.ErrorCode.RATE_LIMITED, f"more than {limit} job submissions per minute; "
                                   f"retry in {wait} s", wait)

    router = APIRouter()
    # the per-tenant submission limits, as POST /v1/jobs has them (where the API has them): 4. async, one script
    dependencies = [Depends(enforce_limits)] if hasattr(jobs, "SUBMISSION_LIMITS") else []

    @router.post("/v1/jobs-lean", status_code=202, include_in_schema=False, dependencies=dependencies)
    async def submit_lean(request: Request, tenant: TenantDep, services: ServicesDep,
                          idempotency: IdempotencyDepOrNone) -> JSONResponse:
        # identical to submit_job up to the first thread hop ...
        settings = services.settings
        fields, sources = await jobs._parse_body(request, services)
        if hasattr(jobs, "check_input_limits"):
            jobs.check_input_limits(fields, sources, settings)
        if idempotency is not None:
            replay = await idempotency.claim(fields, sources, lambda job: jobs._read_view(
                job, jobs._base_url(request, services), services))
            if replay is not None:
                return replay
        params = jobs._validate_params(fields)
        jobs._check_sources(params, sources)
        if params.webhook is not None:
            await run_in_threadpool(jobs.check_url_policy, params.webhook, settings, "webhook")
        if params.loras:
            await run_in_threadpool(jobs._check_loras, params, settings)
        intake = await jobs._intake(sources, settings)
        jobs._check_images(params, intake.image, intake.mask)
        job_id = new_job_id()
        input_keys: list[str] = []
        mask_key = None
        # ... 3. no thread hop when the job has no inputs ...
        if intake.image is not None or intake.mask is not None or getattr(intake, "references", None):
            input_keys, mask_key = await run_in_threadpool(jobs._store_inputs, services, tenant, job_id, intake)
        job = Job(id=job_id, tenant=tenant, params=params, input_keys=input_keys, mask_key=mask_key)
        # ... 1. + 2. record, message and queue position in one round trip on the event loop ...
        try:
            position = await create_and_enqueue(job)
        except (redis.exceptions.RedisError, OSError):
            raise jobs._unavailable("the job store") from None
        # ... and the same ending
        if idempotency is not None:
            await idempotency.complete(job_id)
        jobs._metrics(request).job_submitted()
        view = jobs._view(job, jobs._base_url(request, services), services, position)
        return JSONResponse(view, status_code=202,
                            headers={"Location": view["urls"]["self"], "Cache-Control": "no-store"})

    app.include_router(router)

    return app
