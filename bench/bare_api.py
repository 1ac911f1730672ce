"""The bare endpoint that ``bench.submit`` compares ``POST /v1/jobs`` against.

``uvicorn --factory bench.bare_api:create_app``: one route, ``POST /v1/jobs``, that reads the
body and does only the Redis writes a submission makes (see ``bench/README.md``): the job
record through the job store's own create script (same Lua, same keys: job hash, tenant
list, queue index), and the Celery message (``LPUSH`` of a real message made by
``broker.queues.RenderQueue.enqueue`` at startup, plus the ``task-sent`` event that the API's
Celery app publishes), with ``redis.asyncio``. No auth, no validation, no image.

``EDITFARM_BENCH_BARE_OPERATION`` (``edit``/``generate``) sets the operation of the job record.
``EDITFARM_BENCH_BARE_S3=true`` adds what an edit submission needs at least, for a fair comparison
with edit submissions: the body parsed as JSON, its ``image`` data URL base64-decoded, the bytes
checked with Pillow's ``verify()`` (422 when that fails), and put into the same S3 server through
the same ``S3ObjectStore`` (boto3) in a thread. ``EDITFARM_BENCH_BARE_SYNC=true`` makes the Redis calls with the blocking client
in a thread, as the API does (shows what the thread hops cost).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.settings import ApiSettings
from broker import keys
from broker.celery_app import RENDER_QUEUES, RENDER_TASK, make_celery
from broker.jobstore import encode as _encode
from broker.jobstore.redis import CREATE_SCRIPT as _CREATE_SCRIPT
from broker.jobstore.redis import INDEX_KEYS as _INDEX_KEYS
from broker.schema import Job, JobParams, Operation, dump_fields, new_job_id

TENANT = "bench"
TEMPLATE_QUEUE = "editfarm:bench:template"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _message_template(redis_url: str) -> tuple[bytes, str | None, bytes | None]:
    """(the LPUSHed message, the event channel, the event payload) of one real ``send_task``."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.psubscribe("*")
    pubsub.get_message(timeout=1)
    app = make_celery(redis_url)
    app.send_task(RENDER_TASK, args=["job_" + "0" * 24], queue=TEMPLATE_QUEUE)
    message = client.lpop(TEMPLATE_QUEUE)
    channel, event = None, None
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        got = pubsub.get_message(timeout=0.2)
        if got and got["type"] == "pmessage":
            channel, event = got["channel"].decode(), got["data"]
            break
    pubsub.close()
    app.close()
    client.close()
    assert isinstance(message, bytes), "could not capture a Celery message"
    return message, channel, event


def _verified_image(body: bytes) -> bytes | None:
    """The ``image`` data URL of a JSON body, decoded and checked by Pillow's ``verify()``; None if it fails."""
    try:
        url = json.loads(body)["image"]
        data = base64.b64decode(url[url.index(",") + 1:], validate=True)
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (ValueError, KeyError, TypeError, binascii.Error, OSError, SyntaxError):
        return None
    return data


def create_app() -> FastAPI:
    settings = ApiSettings()
    message, event_channel, event = _message_template(settings.redis_url)
    with_s3, sync = _flag("EDITFARM_BENCH_BARE_S3"), _flag("EDITFARM_BENCH_BARE_SYNC")
    operation = os.environ.get("EDITFARM_BENCH_BARE_OPERATION", "edit")
    params = JobParams(operation=Operation(operation), prompt="make the sky purple", seed=7, steps=2)
    template = Job(id="job_" + "0" * 24, tenant=TENANT, params=params, input_keys=[])
    fields = dump_fields(template)
    queue = RENDER_QUEUES["normal"]
    objects = None
    if with_s3:
        from storage.store import S3ObjectStore

        objects = S3ObjectStore(settings.s3_config())
    aio = aioredis.Redis.from_url(settings.redis_url, max_connections=256)
    blocking = redis.Redis.from_url(settings.redis_url)
    create_async = aio.register_script(_CREATE_SCRIPT)
    create_sync = blocking.register_script(_CREATE_SCRIPT)

    def record(job_id: str) -> tuple[list[str], list[Any]]:
        now = time.time()
        row = {**fields, "id": job_id, "created_at": now,
               "input_keys": [keys.input_object(TENANT, job_id, 0, "png")] if with_s3 else []}
        flat: list[Any] = [job_id, repr(now)]
        for name, value in row.items():
            flat += [name, _encode(value)]
        return [keys.job(job_id), *_INDEX_KEYS, keys.tenant_jobs(TENANT)], flat

    def writes_sync(job_id: str) -> None:
        key_list, args = record(job_id)
        create_sync(keys=key_list, args=args)
        blocking.lpush(queue, message)
        if event_channel and event is not None:
            blocking.publish(event_channel, event)

    app = FastAPI()

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
        body = await request.body()
        job_id = new_job_id()
        if objects is not None:
            image = _verified_image(body)
            if image is None:
                return JSONResponse({"error": {"code": "invalid_image"}}, status_code=422)
            await run_in_threadpool(objects.put, keys.input_object(TENANT, job_id, 0, "png"), image, "image/png")
        if sync:
            await run_in_threadpool(writes_sync, job_id)
        else:
            key_list, args = record(job_id)
            await create_async(keys=key_list, args=args)
            await aio.lpush(queue, message)
            if event_channel and event is not None:
                await aio.publish(event_channel, event)
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    app.state.template = json.loads(message)
    return app
