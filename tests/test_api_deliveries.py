"""A job's webhook delivery log (GET /v1/jobs/{id}/deliveries) and redelivery."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.delivery_log import InMemoryDeliveryLog, RedisDeliveryLog
from api.deps import Services
from broker import keys
from broker.jobstore import RedisJobStore
from broker.schema import Job, JobParams, JobStatus, Operation
from editfarm_testing.api import TEST_KEYS, RecordingRedeliver, fake_services
from workers.webhooks import WebhookConfig, WebhookOutbox, deliver_once, message_id_for

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
GLOBEX = {"Authorization": f"Bearer {TEST_KEYS['globex']}"}
HOOK = "https://hooks.example/editfarm"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def add_job(services: Services, job_id: str, status: JobStatus = JobStatus.SUCCEEDED, tenant: str = "acme",
            webhook: str | None = HOOK) -> Job:
    params = JobParams(operation=Operation.GENERATE, prompt="p", seed=1, webhook=webhook)
    services.store.create(Job(id=job_id, tenant=tenant, params=params, created_at=T0))
    if status is not JobStatus.QUEUED:
        services.store.compare_and_set(job_id, {}, {
            "status": status.value, "started_at": T0 + 1,
            "finished_at": T0 + 9 if status.is_terminal else None})
    job = services.store.get(job_id)
    assert job is not None
    return job


def body(event: str, job_id: str) -> str:
    return json.dumps({"type": event, "timestamp": "2026-01-01T00:00:10Z", "data": {"id": job_id}})


def log_of(services: Services) -> InMemoryDeliveryLog:
    assert isinstance(services.deliveries, InMemoryDeliveryLog)
    return services.deliveries


def sent(services: Services) -> list[str]:
    assert isinstance(services.redeliver, RecordingRedeliver)
    return services.redeliver.sent


@pytest.fixture
def client_services() -> tuple[TestClient, Services]:
    services = fake_services()
    add_job(services, "job_a")
    log = log_of(services)
    log.add("job_a", "msg_job_a_job_started", HOOK, body("job.started", "job_a"), "acme", state="delivered",
            created_at=T0 + 1, finished_at=T0 + 1.5)
    log.add_attempt("msg_job_a_job_started", {"attempt": 1, "at": T0 + 1, "status_code": 204, "error": None,
                                              "duration_ms": 40})
    log.add("job_a", "msg_job_a_job_succeeded", HOOK, body("job.succeeded", "job_a"), "acme", state="failed",
            created_at=T0 + 10, finished_at=T0 + 400)
    for n, code in ((1, 500), (2, None)):
        log.add_attempt("msg_job_a_job_succeeded", {
            "attempt": n, "at": T0 + 10 + 300 * (n - 1), "status_code": code,
            "error": "http 500" if code else "timeout: ReadTimeout", "duration_ms": 15000 if code is None else 80})
    return TestClient(create_app(services=services)), services


def test_the_log_lists_every_message_with_its_attempts(client_services: Any) -> None:
    client, _ = client_services
    response = client.get("/v1/jobs/job_a/deliveries", headers=ACME)
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    data = response.json()["data"]
    assert [d["event"] for d in data] == ["job.started", "job.succeeded"]
    started, done = data
    assert started == {
        "message_id": "msg_job_a_job_started", "event": "job.started", "url": HOOK, "state": "delivered",
        "attempts": [{"attempt": 1, "at": "2026-01-01T00:00:01Z", "status_code": 204, "error": None,
                      "duration_ms": 40}],
        "created_at": "2026-01-01T00:00:01Z", "finished_at": "2026-01-01T00:00:01.500000Z"}
    assert done["state"] == "failed" and done["finished_at"] == "2026-01-01T00:06:40Z"
    assert [(a["attempt"], a["status_code"], a["error"]) for a in done["attempts"]] == [
        (1, 500, "http 500"), (2, None, "timeout: no answer came in time")]  # an old raw record: its code only


def test_the_log_is_tenant_scoped_and_empty_without_a_webhook(client_services: Any) -> None:
    client, services = client_services
    assert client.get("/v1/jobs/job_a/deliveries", headers=GLOBEX).status_code == 404
    assert client.get("/v1/jobs/job_nope/deliveries", headers=ACME).status_code == 404
    assert client.get("/v1/jobs/job_a/deliveries").status_code == 401
    add_job(services, "job_quiet", webhook=None)
    assert client.get("/v1/jobs/job_quiet/deliveries", headers=ACME).json() == {"data": []}
    # a message of another tenant linked to this job is never shown
    log_of(services).add("job_quiet", "msg_x", HOOK, body("job.succeeded", "job_quiet"), "globex")
    assert client.get("/v1/jobs/job_quiet/deliveries", headers=ACME).json() == {"data": []}


def test_redeliver_rearms_the_terminal_message_keeps_its_log_and_queues_it(client_services: Any) -> None:
    client, services = client_services
    response = client.post("/v1/jobs/job_a/deliveries/redeliver", headers=ACME)
    assert response.status_code == 202, response.text
    view = response.json()
    assert view["message_id"] == "msg_job_a_job_succeeded"
    assert view["state"] == "pending" and view["finished_at"] is None
    assert len(view["attempts"]) == 2  # the log is kept
    assert sent(services) == ["msg_job_a_job_succeeded"]
    fields = log_of(services).messages["msg_job_a_job_succeeded"]
    assert fields["attempts"] == "0" and fields["error"] == "" and fields["next_attempt_at"] == ""


def test_redeliver_takes_a_message_id_from_the_log(client_services: Any) -> None:
    client, services = client_services
    response = client.post("/v1/jobs/job_a/deliveries/redeliver?message_id=msg_job_a_job_started", headers=ACME)
    assert response.status_code == 202 and response.json()["event"] == "job.started"
    missing = client.post("/v1/jobs/job_a/deliveries/redeliver?message_id=msg_job_b_job_started", headers=ACME)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "message_id"
    assert sent(services) == ["msg_job_a_job_started"]


def test_redeliver_refusals(client_services: Any) -> None:
    client, services = client_services
    add_job(services, "job_running", JobStatus.RUNNING)
    add_job(services, "job_quiet", webhook=None)
    add_job(services, "job_unsent")

    def code(job_id: str, headers: dict[str, str] = ACME) -> tuple[int, str]:
        response = client.post(f"/v1/jobs/{job_id}/deliveries/redeliver", headers=headers)
        return response.status_code, response.json()["error"]["code"]

    assert code("job_running") == (409, "job_not_finished")
    assert code("job_quiet") == (409, "no_webhook")
    assert code("job_unsent") == (409, "no_webhook")  # finished, but its message is not stored (yet)
    assert code("job_a", GLOBEX) == (404, "not_found")
    assert sent(services) == []


def test_redeliver_answers_503_when_the_queue_is_down(client_services: Any) -> None:
    client, services = client_services
    redeliver = services.redeliver
    assert isinstance(redeliver, RecordingRedeliver)
    redeliver.down = True
    response = client.post("/v1/jobs/job_a/deliveries/redeliver", headers=ACME)
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
    # left pending: calling again queues it
    redeliver.down = False
    assert client.post("/v1/jobs/job_a/deliveries/redeliver", headers=ACME).status_code == 202


# -- on Redis, written by the real outbox -----------------------------------------------------------


def test_the_redis_reader_reads_what_the_outbox_writes_and_a_reset_lets_the_worker_send_again(
        redis_client: redis.Redis) -> None:
    services = fake_services()
    services.store = RedisJobStore(redis_client)
    services.deliveries = RedisDeliveryLog(redis_client)
    job = add_job(services, "job_r", JobStatus.FAILED)
    outbox = WebhookOutbox(redis_client)
    message_id = message_id_for(job.id, "job.failed")
    assert outbox.put(message_id, HOOK, body("job.failed", job.id).encode(), "acme")
    redis_client.sadd(keys.job_webhooks(job.id), message_id)  # what the notifier's link() does

    statuses = iter([503, 503, 200])
    calls: list[str] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["webhook-id"])
        return httpx.Response(next(statuses))

    config = WebhookConfig(secrets=["whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0"], max_attempts=2,
                           retry_schedule_s=(0, 0), jitter=0)
    http = httpx.Client(transport=httpx.MockTransport(receiver))

    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]  # a public address, never dialled: the transport is a mock

    def deliver() -> str:
        return deliver_once(outbox, message_id, config, http, resolver=resolver).outcome

    assert [deliver(), deliver()] == ["retry", "failed"]  # two 503s: attempts exhausted

    client = TestClient(create_app(services=services))
    log = client.get("/v1/jobs/job_r/deliveries", headers=ACME).json()["data"]
    assert [(d["event"], d["state"], [a["status_code"] for a in d["attempts"]]) for d in log] == [
        ("job.failed", "failed", [503, 503])]
    assert log[0]["attempts"][0]["at"].endswith("Z") and log[0]["finished_at"] is not None

    assert deliver() == "done"  # nothing more is sent on its own
    response = client.post("/v1/jobs/job_r/deliveries/redeliver", headers=ACME)
    assert response.status_code == 202 and response.json()["state"] == "pending"
    assert sent(services) == [message_id]
    assert redis_client.ttl(keys.webhook_message(message_id)) > 6 * 24 * 3600
    # the worker's task now finds a pending message with a fresh budget and sends it
    assert deliver() == "delivered"
    assert calls == [message_id] * 3
    log = client.get("/v1/jobs/job_r/deliveries", headers=ACME).json()["data"]
    assert log[0]["state"] == "delivered"
    assert [a["status_code"] for a in log[0]["attempts"]] == [503, 503, 200]
    stored = outbox.get(message_id)
    assert stored is not None and stored.state == "delivered" and stored.status_code == 200


def test_the_redis_reader_skips_expired_messages(redis_client: redis.Redis) -> None:
    log = RedisDeliveryLog(redis_client)
    redis_client.sadd(keys.job_webhooks("job_e"), "msg_gone")
    assert log.for_job("job_e", "acme") == []
    assert log.reset("msg_gone") is False
