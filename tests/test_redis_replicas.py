"""``EDITFARM_REDIS_MIN_REPLICAS``: a create and a terminal transition count only once enough
replicas hold them (Redis ``WAIT``), against a real primary and a real ``redis-server --replicaof``."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from api.app import create_app
from broker import keys
from broker.celery_app import RENDER_QUEUES
from broker.jobstore import RedisJobStore
from broker.jobstore.quota import NO_QUOTA
from broker.queues import RenderQueue
from broker.replication import NO_WAIT, ReplicaPolicy, ReplicaShortfall
from broker.schema import Job, JobParams, JobStatus, new_job_id
from cli.localservices import ManagedProcess, start_redis, wait_until
from cli.redisreplica import start_replica, wait_replica_gone
from editfarm_testing.api import TEST_KEYS, make_settings

QUEUE = RENDER_QUEUES["normal"]
GENERATE = {"operation": "generate", "prompt": "a red bicycle", "width": 64, "height": 64, "seed": 7}
AUTH = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
WAIT_MS = 400
SLACK_S = 2.0  # an API request's own work on 2 shared cores


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    server = start_redis(workdir=tmp_path_factory.mktemp("primary"), appendonly=False)
    yield server
    server.stop()


@pytest.fixture()
def client(primary: ManagedProcess) -> Iterator[redis.Redis]:
    found = redis.Redis(port=primary.port)
    wait_replica_gone(found)  # a replica from an earlier test is not counted
    found.flushdb()
    found.config_resetstat()
    yield found
    found.close()


@pytest.fixture()
def replica(primary: ManagedProcess, tmp_path: Path) -> Iterator[ManagedProcess]:
    server = start_replica(primary.port, tmp_path / "replica")
    yield server
    server.stop()


def make_job() -> Job:
    return Job(id=new_job_id(), tenant="acme", params=JobParams(prompt="make the sky purple", seed=7))


def waits(client: redis.Redis) -> int:
    """WAIT commands the primary has run since the test began."""
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def policy(min_replicas: int = 1, wait_ms: int = WAIT_MS, seen: list[str] | None = None) -> ReplicaPolicy:
    return ReplicaPolicy(min_replicas=min_replicas, wait_timeout_ms=wait_ms,
                         on_shortfall=lambda what, acked: (seen if seen is not None else []).append(what))


def create(store: RedisJobStore, job: Job) -> int | None:
    queue, message = RenderQueue().message(job.id, job.params.priority)
    return store.create_and_enqueue_within(job, queue, message, NO_QUOTA).position


def run_to_running(store: RedisJobStore, job: Job) -> None:
    assert store.transition(job.id, JobStatus.RUNNING, {"worker": "w1", "lease_until": time.time() + 60})


# -- the store ---------------------------------------------------------------------------------------


def test_min_replicas_0_sends_no_wait(client: redis.Redis, primary: ManagedProcess) -> None:
    on_loop = aioredis.Redis(port=primary.port)
    store = RedisJobStore(client, on_loop, replicas=NO_WAIT)
    job, other = make_job(), make_job()
    create(store, job)
    queue, message = RenderQueue().message(other.id)

    async def on_the_loop() -> None:
        await store.create_and_enqueue_within_async(other, queue, message, NO_QUOTA)
        await on_loop.aclose()
    asyncio.run(on_the_loop())
    run_to_running(store, job)
    assert store.transition(job.id, JobStatus.SUCCEEDED) is not None
    store.confirm_replicated(job.id)
    assert waits(client) == 0
    # the same calls with a replica required do send it (so the count above could have failed)
    waiting = RedisJobStore(client, replicas=policy(wait_ms=50))
    with pytest.raises(ReplicaShortfall):
        create(waiting, make_job())
    assert waits(client) == 1


def test_a_create_too_few_replicas_acknowledged_is_withdrawn(client: redis.Redis) -> None:
    seen: list[str] = []
    store = RedisJobStore(client, replicas=policy(seen=seen))
    job = make_job()
    started = time.monotonic()
    with pytest.raises(ReplicaShortfall) as caught:
        create(store, job)
    assert time.monotonic() - started >= WAIT_MS / 1000 * 0.9  # it did wait for a replica
    assert not caught.value.kept and caught.value.acked == 0 and seen == ["create"]
    # nothing left: no record, no message, no index entry, nothing counted in flight
    assert store.get(job.id) is None and client.llen(QUEUE) == 0
    assert client.zcard(keys.tenant_jobs("acme")) == 0 and store.tenant_active_count("acme") == 0
    assert store.queue_position(job.id) is None


def test_a_create_a_worker_took_during_the_wait_is_kept(client: redis.Redis, primary: ManagedProcess) -> None:
    store = RedisJobStore(client, replicas=policy())
    taken: list[object] = []
    worker = redis.Redis(port=primary.port)
    # a worker blocked on the queue takes the message as soon as the create script has pushed it
    consumer = threading.Thread(target=lambda: taken.append(worker.brpop([QUEUE], timeout=10)))
    consumer.start()
    time.sleep(0.2)
    job = make_job()
    with pytest.raises(ReplicaShortfall) as caught:
        create(store, job)
    consumer.join()
    worker.close()
    assert caught.value.kept and taken and taken[0] is not None
    assert store.get(job.id) == job  # it may run: the API points a retry's Idempotency-Key at it


def test_a_create_is_on_the_replica_when_the_call_returns(client: redis.Redis, replica: ManagedProcess) -> None:
    store = RedisJobStore(client, replicas=policy(wait_ms=5000))
    seen = redis.Redis(port=replica.port)
    os.kill(replica.proc.pid, signal.SIGSTOP)  # a replica that lags: the create must wait for it
    job, done = make_job(), threading.Event()
    creating = threading.Thread(target=lambda: (create(store, job), done.set()))
    try:
        creating.start()
        assert not done.wait(0.5)  # still waiting on the replica
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    creating.join(10)
    assert done.is_set()
    assert seen.hgetall(keys.job(job.id)) and seen.llen(QUEUE) == 1
    seen.close()


def test_a_terminal_transition_is_on_the_replica_when_the_call_returns(client: redis.Redis,
                                                                       replica: ManagedProcess) -> None:
    seen: list[str] = []
    store = RedisJobStore(client, replicas=policy(wait_ms=5000, seen=seen))
    job = make_job()
    create(store, job)
    run_to_running(store, job)
    on_replica = redis.Redis(port=replica.port)
    os.kill(replica.proc.pid, signal.SIGSTOP)
    ended: list[Job | None] = []
    finishing = threading.Thread(target=lambda: ended.append(store.transition(job.id, JobStatus.SUCCEEDED)))
    try:
        finishing.start()
        time.sleep(0.5)
        assert not ended  # held until the replica acknowledges
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    finishing.join(10)
    assert ended and ended[0] is not None and ended[0].status is JobStatus.SUCCEEDED
    assert on_replica.hget(keys.job(job.id), "status") == b'"succeeded"' and seen == []
    on_replica.close()


def test_a_terminal_transition_too_few_replicas_acknowledged_still_ends_the_job(client: redis.Redis) -> None:
    seen: list[str] = []
    store = RedisJobStore(client, replicas=policy(seen=seen))
    job = make_job()
    RedisJobStore(client).create_and_enqueue(job, *RenderQueue().message(job.id))
    run_to_running(store, job)  # not a terminal status: no WAIT, no shortfall
    assert seen == []
    ended = store.transition(job.id, JobStatus.FAILED, {"error": {"code": "render_failed", "message": "x"}})
    # it did end, on the primary: reported as ended (and counted), never as lost or still running
    assert ended is not None and ended.status is JobStatus.FAILED and seen == ["transition"]
    assert store.get(job.id).status is JobStatus.FAILED  # type: ignore[union-attr]


# -- through the API ----------------------------------------------------------------------------------


def api(primary: ManagedProcess) -> TestClient:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{primary.port}/0", redis_min_replicas=1,
                             redis_wait_timeout_ms=WAIT_MS, s3_endpoint_url="http://127.0.0.1:1")
    return TestClient(create_app(settings))


def test_a_submit_is_accepted_once_the_replica_holds_it(client: redis.Redis, primary: ManagedProcess,
                                                        replica: ManagedProcess) -> None:
    with api(primary) as http:
        answer = http.post("/v1/jobs", json=GENERATE, headers=AUTH)
    assert answer.status_code == 202, answer.text
    on_replica = redis.Redis(port=replica.port)
    assert on_replica.hget(keys.job(answer.json()["id"]), "status") == b'"queued"'
    assert on_replica.llen(QUEUE) == 1
    on_replica.close()


def test_without_the_replica_a_submit_is_503_and_a_retry_with_its_key_makes_one_job(
        client: redis.Redis, primary: ManagedProcess, tmp_path: Path) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-17"}
    with api(primary) as http:
        started = time.monotonic()
        refused = http.post("/v1/jobs", json=GENERATE, headers=headers)
        elapsed_s = time.monotonic() - started
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "store_unavailable" and "Idempotency-Key" in error["message"]
        assert refused.headers["Retry-After"] == "1"
        assert elapsed_s < WAIT_MS / 1000 + SLACK_S
        assert client.llen(QUEUE) == 0 and client.zcard(keys.tenant_jobs("acme")) == 0  # nothing queued

        replica = start_replica(primary.port, tmp_path / "replica")
        try:
            retried = http.post("/v1/jobs", json=GENERATE, headers=headers)
            again = http.post("/v1/jobs", json=GENERATE, headers=headers)
        finally:
            replica.stop()
    assert retried.status_code == 202, retried.text
    assert again.status_code == 200 and again.json()["id"] == retried.json()["id"]
    assert client.zcard(keys.tenant_jobs("acme")) == 1 and client.llen(QUEUE) == 1


def test_an_idempotency_key_is_confirmed_on_the_replica_with_its_job(
        client: redis.Redis, primary: ManagedProcess, replica: ManagedProcess) -> None:
    """The key names the job before the create's WAIT (set by the create script itself), so the 202
    means both are on the replica; a failover can never keep the job and lose its key."""
    headers = {**AUTH, "Idempotency-Key": "order-19"}
    key = keys.idempotency("acme", "order-19")
    os.kill(replica.proc.pid, signal.SIGSTOP)  # the create's WAIT blocks until the replica is back
    answers: list[object] = []
    try:
        with TestClient(create_app(make_settings(
                redis_url=f"redis://127.0.0.1:{primary.port}/0", redis_min_replicas=1, redis_wait_timeout_ms=8000,
                s3_endpoint_url="http://127.0.0.1:1"))) as http:
            submitting = threading.Thread(target=lambda: answers.append(http.post("/v1/jobs", json=GENERATE,
                                                                                   headers=headers)))
            submitting.start()
            wait_until(lambda: client.zcard(keys.tenant_jobs("acme")) == 1, 10, "the create")
            (job_id,) = [i.decode() for i in client.zrange(keys.tenant_jobs("acme"), 0, -1)]
            time.sleep(0.2)
            assert not answers  # still waiting for the replica...
            value = client.get(key)
            assert value is not None and value.decode().endswith(" " + job_id)  # ...and the key names the job
            os.kill(replica.proc.pid, signal.SIGCONT)
            submitting.join(15)
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    (answer,) = answers
    assert answer.status_code == 202 and answer.json()["id"] == job_id  # type: ignore[attr-defined]
    on_replica = redis.Redis(port=replica.port)
    assert on_replica.get(key) == client.get(key) and on_replica.hget(keys.job(job_id), "status") == b'"queued"'
    on_replica.close()


def test_a_withdrawn_create_frees_its_idempotency_key(client: redis.Redis, primary: ManagedProcess) -> None:
    with api(primary) as http:
        refused = http.post("/v1/jobs", json=GENERATE, headers={**AUTH, "Idempotency-Key": "order-20"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
    assert client.get(keys.idempotency("acme", "order-20")) is None and client.llen(QUEUE) == 0


def test_a_job_kept_on_the_primary_is_what_a_retry_with_its_key_returns(
        client: redis.Redis, primary: ManagedProcess, tmp_path: Path) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-18"}
    taken: list[object] = []
    worker = redis.Redis(port=primary.port)
    consumer = threading.Thread(target=lambda: taken.append(worker.brpop([QUEUE], timeout=10)))
    consumer.start()
    time.sleep(0.2)
    with api(primary) as http:
        refused = http.post("/v1/jobs", json=GENERATE, headers=headers)
        consumer.join()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert taken and taken[0] is not None  # a worker had it: kept, not withdrawn
        assert client.zcard(keys.tenant_jobs("acme")) == 1
        still_short = http.post("/v1/jobs", json=GENERATE, headers=headers)
        assert still_short.status_code == 503  # a replay is confirmed on the replicas too
        replica = start_replica(primary.port, tmp_path / "replica")
        try:
            retried = http.post("/v1/jobs", json=GENERATE, headers=headers)
        finally:
            replica.stop()
    worker.close()
    assert retried.status_code == 200 and retried.headers["Idempotent-Replayed"] == "true", retried.text
    (job_id,) = [i.decode() for i in client.zrange(keys.tenant_jobs("acme"), 0, -1)]
    assert retried.json()["id"] == job_id


# -- settings -----------------------------------------------------------------------------------------


def test_the_settings_reach_the_api_and_worker_stores() -> None:
    from pydantic import ValidationError

    from workers.settings import WorkerSettings

    app = create_app(make_settings(redis_min_replicas=2, redis_wait_timeout_ms=1500,
                                   redis_url="redis://127.0.0.1:1/0", s3_endpoint_url="http://127.0.0.1:1"))
    replicas = app.state.services.store.replicas
    assert (replicas.min_replicas, replicas.wait_timeout_ms) == (2, 1500)
    assert WorkerSettings(redis_min_replicas=1).replica_policy().waits
    assert not WorkerSettings().replica_policy().waits  # the default: no WAIT
    with pytest.raises(ValidationError):  # WAIT with 0 ms would block forever
        WorkerSettings(redis_wait_timeout_ms=0)
