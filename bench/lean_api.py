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

Everything else (body parsing, the two pydantic validations, URL policy, view, metrics,
headers) is the real code. It handles what ``bench.submit`` sends; jobs with inputs or a
webhook go through the real path's helpers unchanged.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import api.routers.jobs as jobs
from api.app import create_app as create_real_app
from api.auth import TenantDep
from api.deps import ServicesDep
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

TEMPLATE_QUEUE = "editfarm:bench:lean-template"


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
        assert raw is not None
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

    router = APIRouter()

    @router.post("/v1/jobs-lean", status_code=202, include_in_schema=False)
    async def submit_lean(request: Request, tenant: TenantDep, services: ServicesDep) -> JSONResponse:
        settings = services.settings
        fields, sources = await jobs._parse_body(request, services)
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
        if intake.image is not None or intake.mask is not None or getattr(intake, "references", None):
            input_keys, mask_key = await run_in_threadpool(jobs._store_inputs, services, tenant, job_id, intake)
        job = Job(id=job_id, tenant=tenant, params=params, input_keys=input_keys, mask_key=mask_key)
        try:
            position = await create_and_enqueue(job)
        except (redis.exceptions.RedisError, OSError):
            raise jobs._unavailable("the job store") from None
        jobs._metrics(request).job_submitted()
        view = jobs._view(job, jobs._base_url(request, services), services, position)
        return JSONResponse(view, status_code=202,
                            headers={"Location": view["urls"]["self"], "Cache-Control": "no-store"})

    app.include_router(router)
    return app
