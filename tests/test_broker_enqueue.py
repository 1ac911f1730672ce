"""Recording a job and queueing its render message in one step (``JobStore.create_and_enqueue``), on real
Redis and on the in-memory stand-in, and the hand-built render message against Celery's own."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery

from broker import keys
from broker.celery_app import (
    RENDER_QUEUES,
    WEBHOOK_QUEUE,
    NotifyMessages,
    enqueue_notify,
    make_celery,
    render_job_id,
)
from broker.jobstore import InMemoryJobStore, JobStore, RedisJobStore
from broker.queues import RenderQueue
from broker.schema import Job, JobParams, JobStatus, Priority, new_job_id


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, redis_client: redis.Redis) -> JobStore:
    return RedisJobStore(redis_client) if request.param == "redis" else InMemoryJobStore()


def make_job(priority: str = "normal", tenant: str = "acme") -> Job:
    return Job(id=new_job_id(), tenant=tenant,
               params=JobParams(prompt="make the sky purple", seed=7, priority=Priority(priority)))


def pushed(store: JobStore, queue: str) -> list[str]:
    """The job ids of the messages on ``queue``, oldest first."""
    if isinstance(store, RedisJobStore):
        return [render_job_id(m) for m in reversed(store.redis.lrange(queue, 0, -1))]
    assert isinstance(store, InMemoryJobStore)
    return [render_job_id(m) for q, m in store.pushed if q == queue]


def enqueue(store: JobStore, job: Job) -> int | None:
    queue, message = RenderQueue().message(job.id, job.params.priority)
    return store.create_and_enqueue(job, queue, message)


def test_the_job_is_recorded_its_message_pushed_and_its_queue_position_returned(store: JobStore) -> None:
    low, normal, high = make_job("low"), make_job("normal"), make_job("high")
    assert enqueue(store, low) == 0
    assert enqueue(store, normal) == 0  # ahead of the low one
    assert enqueue(store, high) == 0
    assert enqueue(store, make_job("normal")) == 2  # behind high and the first normal
    assert store.get(normal.id) == normal and store.get(low.id) == low
    assert pushed(store, RENDER_QUEUES["low"]) == [low.id]
    assert pushed(store, RENDER_QUEUES["high"]) == [high.id]
    assert pushed(store, RENDER_QUEUES["normal"])[0] == normal.id
    assert store.queue_position(low.id) == 3 and store.tenant_active_count("acme") == 4


def test_a_taken_id_is_refused_and_nothing_is_pushed(store: JobStore) -> None:
    job = make_job()
    enqueue(store, job)
    store.transition(job.id, JobStatus.RUNNING, {"worker": "w1"})
    with pytest.raises(KeyError):
        enqueue(store, job.model_copy(update={"tenant": "globex"}))
    assert pushed(store, RENDER_QUEUES["normal"]) == [job.id]
    again = store.get(job.id)
    assert again is not None and again.tenant == "acme" and again.status is JobStatus.RUNNING


def test_on_redis_a_push_that_cannot_happen_records_nothing(redis_client: redis.Redis) -> None:
    """Lua does not roll back: what could fail is checked before the first write (both or neither)."""
    store = RedisJobStore(redis_client)
    redis_client.set(RENDER_QUEUES["normal"], "not a list")
    job = make_job()
    with pytest.raises(redis.exceptions.ResponseError):
        enqueue(store, job)
    assert store.get(job.id) is None and store.tenant_job_ids("acme") == [] and store.queue_position(job.id) is None


def test_the_async_variant_writes_the_same(redis_client: redis.Redis) -> None:
    async def run() -> list[int | None]:
        on_loop = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            **redis_client.connection_pool.connection_kwargs))
        try:
            positions = []
            for store in (RedisJobStore(redis_client, on_loop), RedisJobStore(redis_client), InMemoryJobStore()):
                job = make_job()
                queue, message = RenderQueue().message(job.id)
                positions.append(await store.create_and_enqueue_async(job, queue, message))
                assert store.get(job.id) == job
                assert job.id in pushed(store, queue)
            return positions
        finally:
            await on_loop.aclose()

    assert asyncio.run(run()) == [0, 1, 0]


def test_the_async_variant_loads_its_script_again_after_the_server_forgot_it(redis_client: redis.Redis) -> None:
    async def run() -> list[int | None]:
        on_loop = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            **redis_client.connection_pool.connection_kwargs))
        try:
            store, positions = RedisJobStore(redis_client, on_loop), []
            for _ in range(2):
                redis_client.script_flush()
                job = make_job()
                positions.append(await store.create_and_enqueue_async(job, *RenderQueue().message(job.id)))
                assert store.get(job.id) == job
            return positions
        finally:
            await on_loop.aclose()

    assert asyncio.run(run()) == [0, 1]


def _decoded(message: str | bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(message)
    data["body"] = json.loads(base64.b64decode(data["body"]))
    return data


def _sent_by_celery(redis_client: redis.Redis, send: Callable[[Celery], None], queue: str) -> dict[str, Any]:
    """The message ``send`` pushes with Celery's own ``send_task`` (no task-sent event), decoded."""
    url = "redis://{host}:{port}/{db}".format(**redis_client.connection_pool.connection_kwargs)
    app = make_celery(url)
    app.conf.task_send_sent_event = False
    try:
        send(app)
    finally:
        app.close()
    return _decoded(redis_client.rpop(queue) or b"")


def _without_ids(data: dict[str, Any]) -> dict[str, Any]:
    data["headers"].update(id=None, root_id=None)
    data["properties"].update(correlation_id=None, delivery_tag=None, reply_to=None)
    return data


def test_the_hand_built_message_is_what_send_task_pushes_but_for_its_ids(redis_client: redis.Redis) -> None:
    real = _sent_by_celery(redis_client, lambda app: RenderQueue(celery=app).enqueue("job_0123", "low"), RENDER_QUEUES["low"])
    queue, text = RenderQueue().message("job_0123", "low")
    built = _decoded(text)
    assert queue == RENDER_QUEUES["low"] and render_job_id(text) == "job_0123"
    task_id = built["headers"]["id"]
    assert task_id != real["headers"]["id"]
    assert built["headers"]["root_id"] == built["properties"]["correlation_id"] == task_id
    assert built["properties"]["delivery_tag"] != real["properties"]["delivery_tag"]
    assert _without_ids(built) == _without_ids(real)
    assert len({RenderQueue().message("job_0123")[1] for _ in range(3)}) == 3  # fresh ids each time


def test_the_hand_built_notify_message_is_what_send_task_pushes_but_for_its_ids(redis_client: redis.Redis) -> None:
    real = _sent_by_celery(redis_client, lambda app: enqueue_notify(app, "job_0123", "job.succeeded"),
                           WEBHOOK_QUEUE)
    queue, text = NotifyMessages().build("job_0123", "job.succeeded")
    assert queue == WEBHOOK_QUEUE
    assert _without_ids(_decoded(text)) == _without_ids(real)


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_a_transition_pushes_its_message_only_when_it_happens(kind: str, redis_client: redis.Redis) -> None:
    store: JobStore = RedisJobStore(redis_client) if kind == "redis" else InMemoryJobStore()
    job = Job(id=new_job_id(), tenant="acme", params=JobParams(prompt="p", seed=1))
    store.create(job)
    pushed = (lambda: [m.decode() for m in redis_client.lrange("to-list", 0, -1)]) if kind == "redis" else (
        lambda: [m for q, m in store.pushed if q == "to-list"])  # type: ignore[attr-defined]
    refused = store.transition(job.id, JobStatus.SUCCEEDED, {}, from_=[JobStatus.RUNNING], push=("to-list", "m1"))
    assert refused is None and pushed() == []
    moved = store.transition(job.id, JobStatus.CANCELED, {"error": {"code": "canceled", "message": "x"}},
                             push=("to-list", "m2"))
    assert moved is not None and moved.status is JobStatus.CANCELED and moved.error is not None
    assert moved == store.get(job.id) and pushed() == ["m2"]


def test_each_field_is_stored_exactly_as_the_store_encodes_it_whatever_the_prompt_holds(
        redis_client: redis.Redis) -> None:
    """The create-and-enqueue script takes the fields as one JSON array (cjson): the hash must hold the
    same strings as a field-by-field HSET would."""
    from broker.jobstore import encode as _encode
    from broker.schema import dump_fields

    store = RedisJobStore(redis_client)
    prompt = 'quotes " and \\ backslashes, é, 漢字, emoji 🚲, a newline\n, a tab\t and \u0000'
    job = Job(id=new_job_id(), tenant="acme", params=JobParams(prompt=prompt, negative_prompt="", seed=7))
    enqueue(store, job)
    stored = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.job(job.id)).items()}
    assert stored == {name: _encode(value) for name, value in dump_fields(job).items()}
    assert store.get(job.id) == job
