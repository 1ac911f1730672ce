"""The notify path with real parts: a Redis server, a Celery webhook worker (threads pool, as
deployed) and an HTTP receiver on 127.0.0.1. The notify task stores a job's message and makes its
first delivery attempt itself; only a retry is queued (the ``editfarm.webhook`` task) with its
countdown; a message is accepted once however often notify runs; a tenant's rotated secrets sign
deliveries once the per-process cache of ``WorkerServices.webhook_configs`` has expired."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from broker import keys
from broker.celery_app import enqueue_notify, make_celery
from broker.jobstore import RedisJobStore
from broker.schema import Job, JobParams, JobStatus, Operation, Output
from broker.tenants import RedisTenantStore
from cli.cluster import ROOT
from cli.localservices import ManagedProcess, start_redis, wait_until
from editfarm_testing.outbox import job_messages
from editfarm_testing.webhooks import Reply, ScriptedReceiver
from workers import tasks
from workers import webhooks as wh
from workers.services import WorkerServices
from workers.settings import WorkerSettings
from workers.webhook_configs import WEBHOOK_CONFIG_CACHE_S, WebhookConfigs

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"notify-test-secret-0123456789abc").decode()
RETRY_S = 1.0  # the worker's delay before a second attempt (EDITFARM_WEBHOOK_RETRY_SCHEDULE_S)


@pytest.fixture(scope="module")
def receiver() -> Iterator[ScriptedReceiver]:
    """Answers its ``script`` in turn, then 204, on kept-alive connections (as most receivers)."""
    with ScriptedReceiver(then=Reply(204), keep_alive=True) as rec:
        yield rec


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    server = start_redis(workdir=tmp_path_factory.mktemp("notify-redis"), appendonly=False)
    yield server
    server.stop()


def worker_env(redis_srv: ManagedProcess, s3_url: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
    env.update({
        "EDITFARM_REDIS_URL": f"redis://127.0.0.1:{redis_srv.port}/0", "EDITFARM_S3_ENDPOINT_URL": s3_url,
        "EDITFARM_S3_BUCKET": "editfarm", "EDITFARM_S3_ACCESS_KEY_ID": "test",
        "EDITFARM_S3_SECRET_ACCESS_KEY": "test", "EDITFARM_WEBHOOK_SECRET": SECRET,
        "EDITFARM_WEBHOOK_ALLOW_PRIVATE": "true", "EDITFARM_WEBHOOK_ALLOW_HTTP": "true",
        "EDITFARM_WEBHOOK_TIMEOUT_S": "5", "EDITFARM_WEBHOOK_RETRY_SCHEDULE_S": f"0,{RETRY_S},{RETRY_S}",
        "EDITFARM_WORKER_ROLE": "webhooks", "EDITFARM_HEARTBEAT_FILE": str(tmp / "heartbeat"),
        "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclass
class Worker:
    log_path: Path
    app: Celery
    store: RedisJobStore
    outbox: wh.WebhookOutbox
    r: redis.Redis

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def settled(self, since: int) -> bool:
        """Every task received after log offset ``since`` has ended (succeeded, or was retried)."""
        text = self.log()[since:]
        return text.count("] received") == text.count("] succeeded in") + text.count("] retry:")


@pytest.fixture(scope="module")
def worker(redis_srv: ManagedProcess, s3_server: ManagedProcess,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("notify-worker")
    log_path = tmp / "webhooks.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_worker:app", "worker", "-Q", "webhooks", "-P",
             "threads", "-c", "4", "-n", "hooks-test@local", "-E", "--without-gossip", "--without-mingle",
             "-l", "INFO"], cwd=ROOT, env=worker_env(redis_srv, s3_server.url, tmp),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "ready." in log_path.read_text(errors="replace") or proc.poll() is not None, 60,
                   "webhook worker")
        assert proc.poll() is None, log_path.read_text()
        r = redis.Redis(port=redis_srv.port)
        yield Worker(log_path, make_celery(f"redis://127.0.0.1:{redis_srv.port}/0"), RedisJobStore(r),
                     wh.WebhookOutbox(r), r)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def finished_job(worker: Worker, url: str, tenant: str = "acme") -> Job:
    now = time.time()
    job_id = f"job_{os.urandom(12).hex()}"
    job = Job(id=job_id, tenant=tenant, status=JobStatus.SUCCEEDED, created_at=now, started_at=now,
              finished_at=now, params=JobParams(operation=Operation.GENERATE, prompt="p", seed=1, webhook=url),
              outputs=[Output(key=f"tenants/{tenant}/jobs/{job_id}/outputs/0.png", content_type="image/png",
                              width=16, height=16, sha256="0" * 64, size_bytes=10)])
    worker.store.create(job)
    return job


def test_the_notify_task_makes_the_first_attempt_itself_and_queues_no_delivery_task(
        worker: Worker, receiver: ScriptedReceiver) -> None:
    job = finished_job(worker, receiver.url)
    mark, before = len(worker.log()), len(receiver.requests)
    enqueue_notify(worker.app, job.id, "job.succeeded")
    receiver.wait_for(before + 1)
    wait_until(lambda: worker.settled(mark), 20, "the worker's tasks")
    (delivery,) = receiver.requests[before:]
    headers = delivery.headers
    payload = Webhook(SECRET).verify(delivery.body, headers)
    message_id = wh.message_id_for(job.id, "job.succeeded")
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job.id
    assert payload["data"]["outputs"][0]["url"].startswith("http")  # presigned
    assert headers["webhook-id"] == message_id
    log = worker.log()[mark:]
    assert "editfarm.notify[" in log and "editfarm.webhook[" not in log
    msg = worker.outbox.get(message_id)
    assert msg is not None and msg.state == "delivered" and msg.attempts == 1 and msg.status_code == 204
    assert [(a["attempt"], a["status_code"]) for a in worker.outbox.attempts(message_id)] == [(1, 204)]
    assert job_messages(worker.outbox, job.id) == {message_id}  # the job's delivery log
    assert worker.r.exists(keys.webhook_lock(message_id)) == 0


def test_a_failed_first_attempt_is_retried_by_a_queued_task_after_its_countdown(
        worker: Worker, receiver: ScriptedReceiver) -> None:
    job = finished_job(worker, receiver.url)
    mark, before = len(worker.log()), len(receiver.requests)
    receiver.script = [Reply(500)]
    enqueue_notify(worker.app, job.id, "job.succeeded")
    receiver.wait_for(before + 2)
    wait_until(lambda: worker.settled(mark), 20, "the worker's tasks")
    first, second = receiver.requests[before:]
    assert second.at_s - first.at_s >= RETRY_S * 0.9  # the countdown of the schedule's second delay
    assert first.headers["webhook-id"] == second.headers["webhook-id"] and first.body == second.body
    Webhook(SECRET).verify(first.body, first.headers)
    Webhook(SECRET).verify(second.body, second.headers)
    message_id = wh.message_id_for(job.id, "job.succeeded")
    assert [(a["attempt"], a["status_code"]) for a in worker.outbox.attempts(message_id)] == [(1, 500), (2, 204)]
    msg = worker.outbox.get(message_id)
    assert msg is not None and msg.state == "delivered" and msg.attempts == 2
    assert worker.log()[mark:].count("editfarm.webhook[") == 2  # received, then succeeded: queued once


def test_notify_run_twice_for_one_event_sends_its_message_once(worker: Worker, receiver: ScriptedReceiver) -> None:
    job = finished_job(worker, receiver.url)
    mark, before = len(worker.log()), len(receiver.requests)
    enqueue_notify(worker.app, job.id, "job.succeeded")
    enqueue_notify(worker.app, job.id, "job.succeeded")  # e.g. a redelivered Celery message
    receiver.wait_for(before + 1)
    # a run that found the message locked queues a delivery task, which must then find it delivered
    wait_until(lambda: worker.settled(mark) and worker.log()[mark:].count("editfarm.notify[") >= 4, 30,
               "the worker's tasks")
    time.sleep(0.3)
    assert len(receiver.requests) == before + 1
    message_id = wh.message_id_for(job.id, "job.succeeded")
    assert [a["status_code"] for a in worker.outbox.attempts(message_id)] == [204]


@pytest.fixture
def worker_services(monkeypatch: pytest.MonkeyPatch, redis_srv: ManagedProcess, s3_server: ManagedProcess,
                    tmp_path: Path) -> Iterator[WorkerServices]:
    """A webhook worker's services built in this test process, configured like the worker's."""
    for name, value in worker_env(redis_srv, s3_server.url, tmp_path).items():
        if name.startswith("EDITFARM_"):
            monkeypatch.setenv(name, value)
    services = WorkerServices.connect(WorkerSettings(), celery=None)
    yield services
    services.http.close()
    services.redis.close()


def test_a_rotated_tenant_secret_signs_deliveries_once_the_config_cache_expires(
        worker_services: WorkerServices, receiver: ScriptedReceiver) -> None:
    services = worker_services
    tenants = RedisTenantStore(services.redis)
    tenant = f"rot{os.urandom(4).hex()}"
    old = tenants.rotate_webhook_secret(tenant)
    clock = [1000.0]
    services.webhook_configs = configs = WebhookConfigs(settings=services.settings, tenants=tenants,
                                                        clock=lambda: clock[0])
    assert configs(tenant).secrets == [old]
    assert configs().secrets == [SECRET]  # no tenant: the deployment's secret
    new = tenants.rotate_webhook_secret(tenant, overlap_s=3600)
    clock[0] += WEBHOOK_CONFIG_CACHE_S - 0.1
    assert configs(tenant).secrets == [old]  # the documented delay
    clock[0] += 0.2
    assert configs(tenant).secrets == [new, old]  # both sign during the overlap

    outbox = services.outbox
    message_id = f"msg_rotation_{os.urandom(4).hex()}"
    body = wh.build_body("job.succeeded", {"id": "job_rot"}, time.time())
    outbox.put(message_id, receiver.url, body, tenant)
    before = len(receiver.requests)
    result = tasks.attempt_delivery(services, message_id)
    assert result is not None and result.outcome == "delivered"
    (delivery,) = receiver.requests[before:]
    headers = delivery.headers
    assert delivery.body == body and len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers)


def test_deliveries_reuse_the_receivers_keep_alive_connection(
        worker_services: WorkerServices, receiver: ScriptedReceiver) -> None:
    services = worker_services
    outbox = services.outbox
    body = json.dumps({"type": "job.succeeded", "data": {}}).encode()
    before = receiver.connections
    for n in range(3):
        message_id = f"msg_keepalive_{n}_{os.urandom(4).hex()}"
        outbox.put(message_id, receiver.url, body, "acme")
        result = tasks.attempt_delivery(services, message_id)
        assert result is not None and result.outcome == "delivered"
    assert receiver.connections - before <= 1


def test_the_notify_task_is_retried_while_redis_is_unreachable() -> None:
    """Unit level: a job store that raises a Redis error makes the task ask Celery for a retry
    instead of failing (and its message being acked with no webhook stored)."""

    class DownStore:
        def get(self, job_id: str) -> None:
            raise redis.exceptions.ConnectionError("Connection refused")

    class Retry(Exception):
        pass

    class TaskStub:
        def retry(self, **options: object) -> Retry:
            self.options = options
            return Retry()

    services = WorkerServices.connect(WorkerSettings(redis_url="redis://127.0.0.1:9/0"), celery=None)
    services.store = DownStore()  # type: ignore[assignment]
    task = TaskStub()
    with pytest.raises(Retry):
        tasks.notify(services, task, "job_0123", "job.succeeded")  # type: ignore[arg-type]
    assert isinstance(task.options["exc"], redis.exceptions.ConnectionError) and task.options["countdown"] == 2
