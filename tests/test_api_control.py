"""Queues and control: new job parameters, queue positions, listing, cancel, and /metrics."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.deps import Services
from api.models import JobList, JobOut
from broker import keys
from broker.celery_app import NOTIFY_TASK, WEBHOOK_QUEUE
from broker.events import InMemoryEventPublisher
from broker.jobstore import InMemoryJobStore, JobStore, RedisJobStore
from broker.schema import Job, JobParams, JobStatus, Priority, new_job_id
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings, notified, notify_args, queued

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
GLOBEX = {"Authorization": f"Bearer {TEST_KEYS['globex']}"}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


DATA_URL = "data:image/png;base64," + base64.b64encode(png()).decode()


def make_client(services: Services | None = None) -> tuple[TestClient, Services]:
    services = services or fake_services()
    return TestClient(create_app(services=services)), services


def submit(client: TestClient, headers: dict[str, str] = ACME, **fields: Any) -> Any:
    return client.post("/v1/jobs", json={"prompt": "p", "image": DATA_URL, **fields}, headers=headers)


def submitted_id(client: TestClient, headers: dict[str, str] = ACME, **fields: Any) -> str:
    response = submit(client, headers, **fields)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])




def events_of(services: Services) -> list[dict[str, Any]]:
    assert isinstance(services.publisher, InMemoryEventPublisher)
    return services.publisher.events


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error.get("param") == param


@pytest.fixture
def client_services() -> tuple[TestClient, Services]:
    return make_client()


# -- new parameters ------------------------------------------------------------------------------


def test_priority_timeouts_and_webhook_events_are_accepted_in_json_and_queued_by_priority(
    client_services: Any,
) -> None:
    client, services = client_services
    response = submit(client, priority="high", timeout_s=120, queue_deadline_s=600.5,
                      webhook_events=["started", "progress", "completed"])
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert params["priority"] == "high" and params["timeout_s"] == 120 and params["queue_deadline_s"] == 600.5
    assert params["webhook_events"] == ["started", "progress", "completed"]
    assert queued(services) == [(response.json()["id"], "high")]
    defaults = submit(client).json()["params"]
    assert defaults["priority"] == "normal" and defaults["webhook_events"] == ["completed"]
    assert defaults["timeout_s"] is None and defaults["queue_deadline_s"] is None
    JobOut.model_validate(response.json())


def test_multipart_takes_webhook_events_comma_separated_or_repeated(client_services: Any) -> None:
    client, services = client_services
    files = {"image": ("in.png", png(), "image/png")}
    comma = client.post("/v1/jobs", headers=ACME, files=files,
                        data={"prompt": "p", "webhook_events": "started, completed", "priority": "low",
                              "timeout_s": "30", "queue_deadline_s": ""})
    assert comma.status_code == 202, comma.text
    assert comma.json()["params"]["webhook_events"] == ["started", "completed"]
    assert comma.json()["params"]["priority"] == "low" and comma.json()["params"]["timeout_s"] == 30
    assert comma.json()["params"]["queue_deadline_s"] is None  # empty form field = not given
    repeated = client.post("/v1/jobs", headers=ACME, files=files,
                           data={"prompt": "p", "webhook_events": ["progress", "completed"]})
    assert repeated.status_code == 202, repeated.text
    assert repeated.json()["params"]["webhook_events"] == ["progress", "completed"]
    assert [p for _, p in queued(services)] == ["low", "normal"]
    bad = client.post("/v1/jobs", headers=ACME, files=files, data={"prompt": "p", "webhook_events": "started,nope"})
    assert_error(bad, 422, "invalid_parameter", "webhook_events")
    twice = client.post("/v1/jobs", headers=ACME, files=files, data={"prompt": "p", "priority": ["low", "high"]})
    assert_error(twice, 422, "invalid_parameter", "priority")


@pytest.mark.parametrize(("fields", "param"), [
    ({"priority": "urgent"}, "priority"),
    ({"priority": 1}, "priority"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": -5}, "timeout_s"),
    ({"timeout_s": 86401}, "timeout_s"),
    ({"timeout_s": "soon"}, "timeout_s"),
    ({"queue_deadline_s": 0}, "queue_deadline_s"),
    ({"queue_deadline_s": 8 * 86400}, "queue_deadline_s"),
    ({"webhook_events": ["finished"]}, "webhook_events"),
    ({"webhook_events": "completed"}, "webhook_events"),
])
def test_bad_new_parameters_are_422_invalid_parameter_naming_the_field(
    client_services: Any, fields: dict[str, Any], param: str,
) -> None:
    client, services = client_services
    assert_error(submit(client, **fields), 422, "invalid_parameter", param)
    assert queued(services) == [] and services.store.tenant_job_ids("acme") == []


# -- queue position ------------------------------------------------------------------------------


def make_job(tenant: str = "acme", priority: str = "normal", created_at: float | None = None,
             status: JobStatus = JobStatus.QUEUED) -> Job:
    job = Job(id=new_job_id(), tenant=tenant, status=status,
              params=JobParams(prompt="p", seed=1, priority=Priority(priority)),
              created_at=time.time() if created_at is None else created_at)
    return job


@pytest.fixture(params=["memory", "redis"])
def any_store(request: pytest.FixtureRequest) -> JobStore:
    if request.param == "memory":
        return InMemoryJobStore()
    client: redis.Redis = request.getfixturevalue("redis_client")
    return RedisJobStore(client)


def test_queue_position_follows_strict_priority_then_age_and_disappears_once_running(any_store: JobStore) -> None:
    services = fake_services()
    services.store = any_store
    client, _ = make_client(services)
    t0 = time.time()
    low = make_job("acme", "low", t0)
    normal_old, normal_new = make_job("globex", "normal", t0 + 1), make_job("acme", "normal", t0 + 2)
    high = make_job("acme", "high", t0 + 3)
    for job in (low, normal_old, normal_new, high):
        any_store.create(job)

    def position(job_id: str) -> Any:
        response = client.get(f"/v1/jobs/{job_id}", headers=ACME)
        assert response.status_code == 200
        return response.json()["queue_position"]

    assert [position(j.id) for j in (high, normal_new, low)] == [0, 2, 3]  # globex's job counts too
    assert any_store.transition(high.id, JobStatus.RUNNING, {"lease_until": t0 + 60})
    assert position(high.id) is None
    assert [position(j.id) for j in (normal_new, low)] == [1, 2]
    submitted = submit(client, priority="high").json()
    assert submitted["queue_position"] == 0  # a new high job goes ahead of every normal and low one
    assert position(low.id) == 3


# -- listing -------------------------------------------------------------------------------------


def seed_jobs(store: JobStore, tenant: str, statuses: list[JobStatus], t0: float = 1_700_000_000.0) -> list[str]:
    """Jobs created one second apart, oldest first; returns their ids oldest first."""
    ids = []
    for n, status in enumerate(statuses):
        job = make_job(tenant, created_at=t0 + n, status=status)
        store.create(job)
        ids.append(job.id)
    return ids


def test_listing_pages_newest_first_with_an_opaque_cursor(client_services: Any) -> None:
    client, services = client_services
    ids = seed_jobs(services.store, "acme", [JobStatus.QUEUED] * 5)
    first = client.get("/v1/jobs", params={"limit": 2}, headers=ACME)
    assert first.status_code == 200, first.text
    page = JobList.model_validate(first.json())
    assert [j.id for j in page.data] == [ids[4], ids[3]] and page.next_cursor
    assert first.headers["cache-control"] == "no-store"
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": page.next_cursor}, headers=ACME).json()
    assert [j["id"] for j in second["data"]] == [ids[2], ids[1]]
    last = client.get("/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]}, headers=ACME).json()
    assert [j["id"] for j in last["data"]] == [ids[0]] and last["next_cursor"] is None
    everything = client.get("/v1/jobs", headers=ACME).json()  # default limit 20
    assert [j["id"] for j in everything["data"]] == ids[::-1] and everything["next_cursor"] is None


def test_a_cursor_stays_valid_while_new_jobs_arrive(client_services: Any) -> None:
    client, services = client_services
    ids = seed_jobs(services.store, "acme", [JobStatus.QUEUED] * 4)
    first = client.get("/v1/jobs", params={"limit": 2}, headers=ACME).json()
    seed_jobs(services.store, "acme", [JobStatus.QUEUED] * 3, t0=1_800_000_000.0)  # newer ones
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}, headers=ACME).json()
    assert [j["id"] for j in second["data"]] == [ids[1], ids[0]]  # no repeats, nothing skipped


def test_listing_filters_by_status_repeated_or_comma_separated(client_services: Any) -> None:
    client, services = client_services
    s = JobStatus
    ids = seed_jobs(services.store, "acme", [s.QUEUED, s.RUNNING, s.SUCCEEDED, s.FAILED, s.QUEUED, s.CANCELED])
    queued = client.get("/v1/jobs", params={"status": "queued"}, headers=ACME).json()
    assert [j["id"] for j in queued["data"]] == [ids[4], ids[0]]
    assert all(j["queue_position"] is not None for j in queued["data"])
    both = client.get("/v1/jobs", params=[("status", "running"), ("status", "succeeded")], headers=ACME).json()
    comma = client.get("/v1/jobs", params={"status": "running,succeeded"}, headers=ACME).json()
    assert [j["id"] for j in both["data"]] == [j["id"] for j in comma["data"]] == [ids[2], ids[1]]
    paged = client.get("/v1/jobs", params={"status": "queued,failed", "limit": 1}, headers=ACME).json()
    seen = [j["id"] for j in paged["data"]]
    while paged["next_cursor"]:
        paged = client.get("/v1/jobs", params={"status": "queued,failed", "limit": 1,
                                               "cursor": paged["next_cursor"]}, headers=ACME).json()
        seen += [j["id"] for j in paged["data"]]
    assert seen == [ids[4], ids[3], ids[0]]


def test_a_tenant_lists_only_its_own_jobs(client_services: Any) -> None:
    client, services = client_services
    seed_jobs(services.store, "acme", [JobStatus.QUEUED] * 3)
    response = client.get("/v1/jobs", headers=GLOBEX)
    assert response.status_code == 200 and response.json() == {"data": [], "next_cursor": None,
                                                                     "includes_archived": False}
    mine = submitted_id(client, GLOBEX)
    assert [j["id"] for j in client.get("/v1/jobs", headers=GLOBEX).json()["data"]] == [mine]
    acme_cursor = client.get("/v1/jobs", params={"limit": 1}, headers=ACME).json()["next_cursor"]
    leaked = client.get("/v1/jobs", params={"cursor": acme_cursor}, headers=GLOBEX).json()["data"]
    assert all(j["id"] == mine for j in leaked)  # another tenant's cursor reveals nothing of theirs


@pytest.mark.parametrize(("params", "param"), [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "ten"}, "limit"),
    ({"status": "done"}, "status"), ({"status": "queued,bogus"}, "status"),
    ({"cursor": "not-a-cursor"}, "cursor"), ({"cursor": base64.urlsafe_b64encode(b'{"c":"x"}').decode()}, "cursor"),
])
def test_bad_list_parameters_are_422_invalid_parameter(client_services: Any, params: dict[str, Any], param: str) -> None:
    client, _ = client_services
    assert_error(client.get("/v1/jobs", params=params, headers=ACME), 422, "invalid_parameter", param)


def test_listing_needs_a_key(client_services: Any) -> None:
    client, _ = client_services
    assert_error(client.get("/v1/jobs"), 401, "unauthorized")


def test_tenant_job_ids_before_pages_by_created_at_then_id_on_both_stores(any_store: JobStore) -> None:
    t0 = 1_700_000_000.25
    same = sorted([make_job(created_at=t0 + 5) for _ in range(3)], key=lambda j: j.id)  # a tie on created_at
    older, newer = make_job(created_at=t0), make_job(created_at=t0 + 9)
    for job in (*same, older, newer):
        any_store.create(job)
    make_job_other = make_job("globex", created_at=t0 + 3)
    any_store.create(make_job_other)
    expected = [(newer.id, newer.created_at), *[(j.id, j.created_at) for j in reversed(same)],
                (older.id, older.created_at)]
    assert any_store.tenant_job_ids_before("acme", None, 10) == expected
    walked: list[tuple[str, float]] = []
    position: tuple[float, str] | None = None
    while batch := any_store.tenant_job_ids_before("acme", position, 2):
        walked += batch
        position = (batch[-1][1], batch[-1][0])
    assert walked == expected
    assert any_store.tenant_job_ids_before("acme", (same[1].created_at, same[1].id), 10) == [
        (same[0].id, same[0].created_at), (older.id, older.created_at)]


# -- cancel --------------------------------------------------------------------------------------


def test_canceling_a_queued_job_answers_200_publishes_status_and_notifies_once(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME)
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["status"] == "canceled" and view["queue_position"] is None and view["finished_at"]
    assert view["error"] == {"code": "canceled", "message": "canceled by request"}
    JobOut.model_validate(view)
    job = services.store.get(job_id)
    assert job is not None and job.status is JobStatus.CANCELED and job.lease_until is None
    assert notified(services) == [(job_id, "job.canceled")]
    status_events = [e for e in events_of(services) if e["type"] == "status"]
    assert [(e["job_id"], e["data"]["status"]) for e in status_events] == [(job_id, "canceled")]
    assert services.store.queue_position(job_id) is None


def test_canceling_twice_is_409_job_finished_and_notifies_only_once(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME).status_code == 200
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME), 409, "job_finished")
    assert notified(services) == [(job_id, "job.canceled")]


def test_a_succeeded_job_cannot_be_canceled(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    assert services.store.transition(job_id, JobStatus.RUNNING)
    assert services.store.transition(job_id, JobStatus.SUCCEEDED, {"finished_at": time.time()})
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME), 409, "job_finished")
    assert notified(services) == []
    assert services.store.get(job_id).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


def test_canceling_another_tenants_or_an_unknown_job_is_404(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    theirs = client.post(f"/v1/jobs/{job_id}/cancel", headers=GLOBEX)
    unknown = client.post("/v1/jobs/job_000000000000000000000000/cancel", headers=GLOBEX)
    assert_error(theirs, 404, "not_found")
    assert theirs.content == unknown.content
    assert services.store.get(job_id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert notified(services) == []


def test_canceling_a_running_job_takes_it_from_its_worker_and_records_the_reason(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    assert services.store.transition(job_id, JobStatus.RUNNING,
                                     {"worker": "w1", "lease_until": time.time() + 60, "attempts": 1})
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME, json={"reason": "wrong prompt"})
    assert response.status_code == 200, response.text
    assert response.json()["error"] == {"code": "canceled", "message": "canceled by request: wrong prompt"}
    job = services.store.get(job_id)
    assert job is not None and job.status is JobStatus.CANCELED and job.lease_until is None
    # the worker's next lease-checked write fails: it lost the job
    assert services.store.transition(job_id, JobStatus.SUCCEEDED, from_=[JobStatus.RUNNING],
                                     expect={"worker": ["w1"]}) is None
    assert notified(services) == [(job_id, "job.canceled")]


def test_a_cancel_that_loses_a_race_to_the_worker_answers_from_the_new_state(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    store = services.store
    real_transition = store.transition

    def worker_starts_it_first(*args: Any, **kwargs: Any) -> Any:
        store.transition = real_transition  # type: ignore[method-assign]
        assert real_transition(job_id, JobStatus.RUNNING, {"worker": "w1"})
        return real_transition(*args, **kwargs)  # from_=[queued] now loses

    store.transition = worker_starts_it_first  # type: ignore[method-assign]
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME)
    assert response.status_code == 200 and response.json()["status"] == "canceled"

    other = submitted_id(client)

    def worker_finishes_it_first(*args: Any, **kwargs: Any) -> Any:
        store.transition = real_transition  # type: ignore[method-assign]
        assert real_transition(other, JobStatus.RUNNING)
        assert real_transition(other, JobStatus.SUCCEEDED)
        return real_transition(*args, **kwargs)

    store.transition = worker_finishes_it_first  # type: ignore[method-assign]
    assert_error(client.post(f"/v1/jobs/{other}/cancel", headers=ACME), 409, "job_finished")
    assert notified(services) == [(job_id, "job.canceled")]


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ({"json": {"reason": "x", "force": True}}, 422, "invalid_parameter"),
    ({"json": {"reason": "x" * 501}}, 422, "invalid_parameter"),
    ({"json": ["x"]}, 422, "invalid_request"),
    ({"content": b"reason=x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
])
def test_a_bad_cancel_body_is_refused_and_the_job_keeps_running(
    client_services: Any, kwargs: dict[str, Any], status: int, code: str,
) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    headers = {**ACME, **kwargs.pop("headers", {})}
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=headers, **kwargs), status, code)
    assert services.store.get(job_id).status is JobStatus.QUEUED  # type: ignore[union-attr]


def test_the_cancel_transition_itself_carries_the_job_canceled_notify(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)
    store = services.store
    calls: list[dict[str, Any]] = []
    real_transition = store.transition

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_transition(*args, **kwargs)

    store.transition = spy  # type: ignore[method-assign]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME).status_code == 200
    [call] = calls
    queue, message = call["push"]
    assert queue == WEBHOOK_QUEUE and notify_args(message) == (job_id, "job.canceled")


def test_a_cancel_whose_transition_fails_asks_for_no_webhook(client_services: Any) -> None:
    client, services = client_services
    job_id = submitted_id(client)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Connection refused")

    services.store.transition = down  # type: ignore[method-assign]
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME), 503, "unavailable")
    assert notified(services) == []


def test_canceling_on_real_redis_clears_the_queue_index(redis_client: redis.Redis) -> None:
    services = fake_services()
    services.store = RedisJobStore(redis_client)
    client, _ = make_client(services)
    first, second = submitted_id(client), submitted_id(client)
    assert client.get(f"/v1/jobs/{second}", headers=ACME).json()["queue_position"] == 1
    assert client.post(f"/v1/jobs/{first}/cancel", headers=ACME).status_code == 200
    assert client.get(f"/v1/jobs/{second}", headers=ACME).json()["queue_position"] == 0
    assert redis_client.zcard(keys.queued("normal")) == 1


def test_a_cancel_on_real_redis_queues_exactly_one_job_canceled_notify_with_its_transition(
        redis_client: redis.Redis) -> None:
    import json

    services = fake_services()
    services.store = RedisJobStore(redis_client)
    client, _ = make_client(services)
    job_id = submitted_id(client)
    before = redis_client.llen(WEBHOOK_QUEUE)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME).status_code == 200
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME), 409, "job_finished")
    pushed = redis_client.lrange(WEBHOOK_QUEUE, 0, -1)
    assert len(pushed) == before + 1
    mine = [m for m in pushed if notify_args(m)[0] == job_id]
    assert [notify_args(m) for m in mine] == [(job_id, "job.canceled")]
    assert json.loads(mine[0])["headers"]["task"] == NOTIFY_TASK
    assert RedisJobStore(redis_client).get(job_id).status is JobStatus.CANCELED  # type: ignore[union-attr]


# -- metrics -------------------------------------------------------------------------------------


def scrape(client: TestClient) -> dict[str, Any]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def sample_value(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for sample in families[family].samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise AssertionError(f"no {name}{labels}")


def test_metrics_expose_requests_by_route_template_jobs_and_queue_gauges(client_services: Any) -> None:
    client, _ = client_services
    job_id = submitted_id(client, priority="high")
    submitted_id(client)
    submitted_id(client, priority="low")
    client.get(f"/v1/jobs/{job_id}", headers=ACME)
    client.get("/v1/jobs/job_unknown", headers=ACME)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=ACME)
    client.get("/no/such/path")
    families = scrape(client)  # no auth needed
    requests = "editfarm_http_requests"
    assert sample_value(families, requests, "editfarm_http_requests_total",
                        route="/v1/jobs", method="POST", status="202") == 3
    assert sample_value(families, requests, "editfarm_http_requests_total",
                        route="/v1/jobs/{job_id}", method="GET", status="200") == 1
    assert sample_value(families, requests, "editfarm_http_requests_total",
                        route="/v1/jobs/{job_id}", method="GET", status="404") == 1
    assert sample_value(families, requests, "editfarm_http_requests_total",
                        route="unmatched", method="GET", status="404") == 1
    raw_paths = {s.labels["route"] for s in families[requests].samples}
    assert not any(job_id in r for r in raw_paths)
    assert sample_value(families, "editfarm_jobs", "editfarm_jobs_total", status="submitted") == 3
    assert sample_value(families, "editfarm_jobs", "editfarm_jobs_total", status="canceled") == 1
    depth = {p: sample_value(families, "editfarm_queue_depth", "editfarm_queue_depth", priority=p)
             for p in ("high", "normal", "low")}
    assert depth == {"high": 0, "normal": 1, "low": 1}  # the high one was canceled
    assert sample_value(families, "editfarm_jobs_running", "editfarm_jobs_running") == 0
    assert sample_value(families, "editfarm_job_store_up", "editfarm_job_store_up") == 1
    latency = families["editfarm_http_request_duration_seconds"]
    assert latency.type == "histogram"
    assert sample_value(families, "editfarm_http_request_duration_seconds",
                        "editfarm_http_request_duration_seconds_count", route="/v1/jobs", method="POST") == 3


def test_a_scrape_still_succeeds_without_the_queue_gauges_when_redis_is_down() -> None:
    services = fake_services(make_settings(metrics_store_timeout_s=0.5))
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # retries with backoff
    services.store = RedisJobStore(dead)
    client, _ = make_client(services)
    started = time.monotonic()
    families = scrape(client)
    assert time.monotonic() - started < 3
    assert "editfarm_queue_depth" not in families and "editfarm_jobs_running" not in families
    assert sample_value(families, "editfarm_job_store_up", "editfarm_job_store_up") == 0
    assert sample_value(families, "editfarm_jobs", "editfarm_jobs_total", status="submitted") == 0


def test_each_app_has_its_own_metrics_registry() -> None:
    first, _ = make_client()
    second, _ = make_client()
    submitted_id(first)
    assert sample_value(scrape(first), "editfarm_jobs", "editfarm_jobs_total", status="submitted") == 1
    assert sample_value(scrape(second), "editfarm_jobs", "editfarm_jobs_total", status="submitted") == 0


def test_queue_gauges_read_the_real_store(redis_client: redis.Redis) -> None:
    services = fake_services()
    services.store = store = RedisJobStore(redis_client)
    client, _ = make_client(services)
    for priority in ("high", "high", "low"):
        store.create(make_job(priority=priority))
    running = make_job()
    store.create(running)
    assert store.transition(running.id, JobStatus.RUNNING, {"lease_until": time.time() + 60})
    families = scrape(client)
    depth = {p: sample_value(families, "editfarm_queue_depth", "editfarm_queue_depth", priority=p)
             for p in ("high", "normal", "low")}
    assert depth == {"high": 2, "normal": 0, "low": 1}
    assert sample_value(families, "editfarm_jobs_running", "editfarm_jobs_running") == 1


# -- OpenAPI -------------------------------------------------------------------------------------


def test_openapi_documents_the_new_routes(client_services: Any) -> None:
    client, _ = client_services
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    listing = paths["/v1/jobs"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"limit", "cursor", "status"}
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobList")
    cancel = paths["/v1/jobs/{job_id}/cancel"]["post"]
    assert {"200", "404", "409"} <= set(cancel["responses"])
    assert cancel["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CancelRequest")
    assert "text/event-stream" in paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert "/metrics" in paths
    schemas = spec["components"]["schemas"]
    assert "queue_position" in schemas["JobOut"]["properties"]
    assert {"priority", "timeout_s", "queue_deadline_s", "webhook_events"} <= set(
        schemas["JobRequest"]["properties"])
    assert "CancelRequest" in schemas


def test_an_unexpected_exception_is_answered_500_and_counted_as_500(client_services: Any) -> None:
    client, services = client_services

    def explode(job_id: str, tenant: str) -> None:
        raise RuntimeError("boom")

    services.store.get_for_tenant = explode  # type: ignore[method-assign]
    response = client.get("/v1/jobs/job_x", headers=ACME)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    families = scrape(client)
    assert sample_value(families, "editfarm_http_requests", "editfarm_http_requests_total",
                        route="/v1/jobs/{job_id}", method="GET", status="500") == 1
