"""Per-tenant submission limits (rate, jobs in flight) and the input limits checked before image work."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from api.deps import Services
from api.limits import (
    WINDOW_S,
    Admission,
    InMemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    retry_after_s,
)
from api.settings import ApiSettings
from broker import keys
from broker.jobstore import InMemoryJobStore, JobStore, RedisJobStore
from broker.schema import Job, JobParams, JobStatus, new_job_id
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings, queued

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
GLOBEX = {"Authorization": f"Bearer {TEST_KEYS['globex']}"}
GENERATE = {"operation": "generate", "prompt": "a red bicycle", "width": 64, "height": 64}
T0 = 1_700_000_040.0  # 40 s into a window


def make_client(**overrides: Any) -> tuple[TestClient, Services]:
    services = fake_services(make_settings(**overrides))
    return TestClient(create_app(services=services)), services


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


# -- the sliding window ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest) -> RateLimiter:
    if request.param == "memory":
        return InMemoryRateLimiter()
    client: redis.Redis = request.getfixturevalue("redis_client")
    return RedisRateLimiter(client)


def test_a_fresh_window_allows_exactly_the_limit_and_refused_hits_are_not_counted(limiter: RateLimiter) -> None:
    start = 1_700_000_000.0 - 1_700_000_000.0 % WINDOW_S
    assert all(limiter.hit("acme", 3, start + 1).allowed for _ in range(3))
    for _ in range(5):
        refused = limiter.hit("acme", 3, start + 2)
        assert not refused.allowed and refused.retry_after_s >= 1
    # the window's count is 3 (not 8): in the next window's first half it still weighs > 1.5
    assert not limiter.hit("acme", 3, start + WINDOW_S + 1).allowed
    # about two thirds into the next window the old 3 weigh ~1: two more fit, not three
    assert limiter.hit("acme", 3, start + WINDOW_S + 40.5).allowed
    assert limiter.hit("acme", 3, start + WINDOW_S + 40.6).allowed
    assert not limiter.hit("acme", 3, start + WINDOW_S + 40.7).allowed
    # tenants are counted apart
    assert limiter.hit("globex", 3, start + 2).allowed


def test_retry_after_is_when_one_more_request_fits(limiter: RateLimiter) -> None:
    start = 1_700_000_000.0 - 1_700_000_000.0 % WINDOW_S
    for _ in range(10):
        assert limiter.hit("acme", 10, start + 50).allowed
    refused = limiter.hit("acme", 10, start + 55)
    assert not refused.allowed
    later = start + 55 + refused.retry_after_s
    # refused hits are not counted, so probing changes nothing: not a second earlier, but then
    assert not limiter.hit("acme", 10, later - 1.0).allowed
    assert limiter.hit("acme", 10, later).allowed


def test_retry_after_math() -> None:
    # this window full, nothing before: wait for the next window and for 1 of the 10 to decay
    assert retry_after_s(previous=0, current=10, elapsed=30, limit=10) == 30 + 6
    # the previous window must decay: 10 × (1 - e/60) + 5 <= 9 → e >= 36
    assert retry_after_s(previous=10, current=5, elapsed=20, limit=10) == 16
    assert retry_after_s(previous=0, current=1, elapsed=59.9, limit=1) >= 1


def test_the_redis_limiter_uses_the_rate_window_keys_with_a_ttl(redis_client: redis.Redis) -> None:
    limiter = RedisRateLimiter(redis_client)
    assert limiter.hit("acme", 5, T0).allowed
    key = keys.rate_window("acme", int(T0 // WINDOW_S))
    assert redis_client.get(key) == b"1"
    assert 0 < int(redis_client.ttl(key)) <= 2 * WINDOW_S + 5  # type: ignore[arg-type]


# -- both limits at once (admit): one script on Redis, the same answers as the in-memory pair ---------


@pytest.fixture(params=["memory", "redis", "redis-on-loop"])
def admit_pair(request: pytest.FixtureRequest) -> tuple[RateLimiter, JobStore, str]:
    if request.param == "memory":
        store = InMemoryJobStore()  # the in-memory rate counters live in the store, as on Redis
        return InMemoryRateLimiter(store), store, request.param
    client: redis.Redis = request.getfixturevalue("redis_client")
    return RedisRateLimiter(client), RedisJobStore(client), request.param


def _admit(pair: tuple[RateLimiter, JobStore, str], tenant: str, cap: int, limit: int, now: float) -> Admission:
    limiter, store, kind = pair
    if kind != "redis-on-loop":
        return limiter.admit(tenant, store, cap, limit, now)
    assert isinstance(store, RedisJobStore)

    async def on_loop() -> Admission:
        client = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            **store.redis.connection_pool.connection_kwargs))
        try:
            return await RedisRateLimiter(store.redis, client).admit_async(tenant, store, cap, limit, now)
        finally:
            await client.aclose()

    return asyncio.run(on_loop())


def test_admit_checks_the_in_flight_cap_then_counts_the_rate(admit_pair: tuple[RateLimiter, JobStore, str]) -> None:
    store = admit_pair[1]
    for _ in range(2):
        store.create(Job(id=new_job_id(), tenant="acme", params=JobParams(prompt="p", seed=1)))
    refused = _admit(admit_pair, "acme", 2, 3, T0)
    assert not refused.allowed and refused.active == 2
    # refused by the cap: not counted toward the rate
    assert all(_admit(admit_pair, "acme", 3, 3, T0 + 1).allowed for _ in range(3))
    limited = _admit(admit_pair, "acme", 3, 3, T0 + 2)
    assert not limited.allowed and limited.active is None
    assert limited.retry_after_s == retry_after_s(0, 3, T0 + 2 - int(T0 // WINDOW_S) * WINDOW_S, 3)
    assert _admit(admit_pair, "acme", 0, 0, T0 + 3).allowed  # both off
    assert _admit(admit_pair, "globex", 3, 3, T0 + 3).allowed  # per tenant


# -- the route -------------------------------------------------------------------------------------


def test_over_the_rate_limit_is_429_rate_limited_with_retry_after_per_tenant() -> None:
    client, services = make_client(rate_limit_per_min=2)
    assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    # a refused (422) submission counts too: the limit is on attempts
    assert client.post("/v1/jobs", json={**GENERATE, "steps": 0}, headers=ACME).status_code == 422
    response = client.post("/v1/jobs", json=GENERATE, headers=ACME)
    error = assert_error(response, 429, "rate_limited")
    assert "2 job submissions per minute" in error["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 2 * WINDOW_S
    # checked before the body is read: even a body that is not JSON is refused with 429
    garbage = client.post("/v1/jobs", content=b"{", headers={**ACME, "Content-Type": "application/json"})
    assert_error(garbage, 429, "rate_limited")
    # after authentication: no key is 401, not 429
    assert client.post("/v1/jobs", json=GENERATE).status_code == 401
    # another tenant has its own budget
    assert client.post("/v1/jobs", json=GENERATE, headers=GLOBEX).status_code == 202
    assert len(queued(services)) == 2


def test_the_rate_limit_is_off_at_zero() -> None:
    client, _ = make_client(rate_limit_per_min=0)
    assert all(client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202 for _ in range(5))


def test_other_routes_are_not_rate_limited() -> None:
    client, _ = make_client(rate_limit_per_min=1)
    assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    assert all(client.get("/v1/jobs", headers=ACME).status_code == 200 for _ in range(3))


def test_jobs_in_flight_are_capped_per_tenant_until_one_ends() -> None:
    client, services = make_client(max_jobs_in_flight=2)
    ids = [client.post("/v1/jobs", json=GENERATE, headers=ACME).json()["id"] for _ in range(2)]
    response = client.post("/v1/jobs", json=GENERATE, headers=ACME)
    error = assert_error(response, 429, "too_many_jobs")
    assert "2 of your jobs are queued or running" in error["message"]
    assert int(response.headers["Retry-After"]) > 0
    assert client.post("/v1/jobs", json=GENERATE, headers=GLOBEX).status_code == 202
    services.store.transition(ids[0], JobStatus.CANCELED, {"finished_at": time.time()})
    assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202


def test_the_in_flight_cap_reads_the_redis_active_set(redis_client: redis.Redis) -> None:
    services = fake_services(make_settings(max_jobs_in_flight=1))
    services.store = RedisJobStore(redis_client)
    client = TestClient(create_app(services=services))
    assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    assert_error(client.post("/v1/jobs", json=GENERATE, headers=ACME), 429, "too_many_jobs")


class _DownStore(InMemoryJobStore):
    def tenant_active_count(self, tenant: str) -> int:
        raise redis.exceptions.ConnectionError("down")


def test_limits_answer_503_when_the_store_is_down() -> None:
    services = fake_services()
    services.store = _DownStore()
    client = TestClient(create_app(services=services))
    assert_error(client.post("/v1/jobs", json=GENERATE, headers=ACME), 503, "unavailable")


def test_the_document_declares_429_with_retry_after() -> None:
    client, _ = make_client()
    responses = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["responses"]
    assert "Retry-After" in responses["429"]["headers"]


# -- input limits ----------------------------------------------------------------------------------


def test_prompt_length_is_limited_by_setting_before_the_schema() -> None:
    client, _ = make_client(max_prompt_chars=10)
    error = assert_error(client.post("/v1/jobs", json={**GENERATE, "prompt": "x" * 11}, headers=ACME),
                         422, "invalid_parameter", "prompt")
    assert "at most 10" in error["message"]
    assert_error(client.post("/v1/jobs", json={**GENERATE, "prompt": "p", "negative_prompt": "x" * 11}, headers=ACME),
                 422, "invalid_parameter", "negative_prompt")
    assert client.post("/v1/jobs", json={**GENERATE, "prompt": "x" * 10}, headers=ACME).status_code == 202
    # multipart too
    fields = {**{k: (None, str(v)) for k, v in GENERATE.items()}, "prompt": (None, "y" * 11)}
    assert_error(client.post("/v1/jobs", files=fields, headers=ACME), 422, "invalid_parameter", "prompt")


def test_the_default_prompt_limit_is_4000_characters() -> None:
    client, _ = make_client()
    assert_error(client.post("/v1/jobs", json={**GENERATE, "prompt": "x" * 4001}, headers=ACME),
                 422, "invalid_parameter", "prompt")
    assert client.post("/v1/jobs", json={**GENERATE, "prompt": "x" * 4000}, headers=ACME).status_code == 202


def test_reference_images_and_boxes_are_counted_before_any_image_is_read() -> None:
    client, _ = make_client(max_reference_images=1, max_boxes=2)
    # not images at all: the count is refused first, nothing is decoded
    body = {"operation": "edit", "prompt": "p", "image": "data:image/png;base64,AAAA",
            "images": ["data:image/png;base64,AAAA"] * 2}
    assert_error(client.post("/v1/jobs", json=body, headers=ACME), 422, "invalid_parameter", "images")
    inpaint = {"operation": "inpaint", "image": "data:image/png;base64,AAAA", "boxes": [[0, 0, 0.5, 0.5]] * 3}
    error = assert_error(client.post("/v1/jobs", json=inpaint, headers=ACME), 422, "invalid_parameter", "boxes")
    assert "at most 2 boxes" in error["message"]


@pytest.mark.parametrize("name,value", [("max_prompt_chars", 4001), ("max_reference_images", 4),
                                        ("max_boxes", 17), ("rate_limit_per_min", -1)])
def test_limits_cannot_exceed_the_job_schema(name: str, value: int) -> None:
    with pytest.raises(ValidationError):
        ApiSettings(**{name: value})  # type: ignore[arg-type]


# -- the limits inside the create (one round trip), and the early check for tenants near them -------


def _job(tenant: str = "acme") -> Job:
    return Job(id=new_job_id(), tenant=tenant, params=JobParams(prompt="p", seed=1))


def _create(pair: tuple[RateLimiter, JobStore, str], job: Job, cap: int, limit: int, now: float,
            counted: bool = False) -> Any:
    limiter, store, kind = pair
    if kind != "redis-on-loop":
        return limiter.admit_and_create(job.tenant, store, cap, limit, now, job, "q", "m-" + job.id, counted)
    assert isinstance(store, RedisJobStore)

    async def on_loop() -> Any:
        client = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            **store.redis.connection_pool.connection_kwargs))
        try:
            return await RedisRateLimiter(store.redis, client).admit_and_create_async(
                job.tenant, RedisJobStore(store.redis, client), cap, limit, now, job, "q", "m-" + job.id, counted)
        finally:
            await client.aclose()

    return asyncio.run(on_loop())


def _messages(store: JobStore) -> list[str]:
    if isinstance(store, InMemoryJobStore):
        return [message for _, message in store.pushed]
    assert isinstance(store, RedisJobStore)
    return [m.decode() for m in store.redis.lrange("q", 0, -1)]  # type: ignore[union-attr]


def test_a_tenant_over_its_rate_limit_is_refused_inside_the_create_and_no_job_or_message_is_left(
        admit_pair: tuple[RateLimiter, JobStore, str]) -> None:
    limiter, store, _ = admit_pair
    first, second, third = _job(), _job(), _job()
    created = _create(admit_pair, first, 0, 2, T0)
    assert created.admission.allowed and created.position == 0
    assert created.admission.rate_room == pytest.approx(1.0)
    assert _create(admit_pair, second, 0, 2, T0 + 1).admission.allowed
    refused = _create(admit_pair, third, 0, 2, T0 + 2)
    assert not refused.admission.allowed and refused.position is None
    assert refused.admission.retry_after_s == retry_after_s(0, 2, T0 + 2 - int(T0 // WINDOW_S) * WINDOW_S, 2)
    assert store.get(third.id) is None
    assert sorted(_messages(store)) == sorted([f"m-{first.id}", f"m-{second.id}"])
    assert store.tenant_active_count("acme") == 2
    # refused: not counted (one more fits in the next window's second half, as for admit)
    assert limiter.hit("acme", 2, T0 + 2, count=False).allowed is False


def test_a_tenant_at_its_in_flight_cap_is_refused_inside_the_create_and_not_counted(
        admit_pair: tuple[RateLimiter, JobStore, str]) -> None:
    limiter, store, _ = admit_pair
    assert _create(admit_pair, _job(), 1, 5, T0).admission.in_flight_room == 0
    late = _job()
    refused = _create(admit_pair, late, 1, 5, T0 + 1)
    assert not refused.admission.allowed and refused.admission.active == 1
    assert store.get(late.id) is None and len(_messages(store)) == 1
    assert limiter.hit("acme", 5, T0 + 1, count=False).room == pytest.approx(4.0)  # only the created one counted
    # counted already (the early check): the create re-checks the cap only, and counts nothing more
    assert _create(admit_pair, _job("globex"), 1, 5, T0 + 2, counted=True).admission.allowed
    assert limiter.hit("globex", 5, T0 + 2, count=False).room == pytest.approx(5.0)


class _CountingLimiter(InMemoryRateLimiter):
    def __init__(self, store: JobStore) -> None:
        assert isinstance(store, InMemoryJobStore)
        super().__init__(store)
        self.early_checks = 0  # the route's checks before the body (admit_and_create calls admit itself)

    async def admit_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                          now: float) -> Admission:
        self.early_checks += 1
        return await super().admit_async(tenant, store, max_in_flight, limit, now)


def test_a_tenant_far_from_its_limits_skips_the_early_check_and_each_request_still_counts_once() -> None:
    client, services = make_client(rate_limit_per_min=1000, max_jobs_in_flight=1000)
    services.limiter = limiter = _CountingLimiter(services.store)
    assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    assert limiter.early_checks == 1  # a tenant this process has no answer for: checked early
    assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    assert client.post("/v1/jobs", json={**GENERATE, "steps": 0}, headers=ACME).status_code == 422
    assert limiter.early_checks == 1  # far from both limits: the create checked them
    # counted once each: early, by the create, and the 422 after it ended
    assert limiter.hit("acme", 1000, time.time(), count=False).room == pytest.approx(997, abs=0.1)
    assert len(queued(services)) == 2


def test_a_tenant_near_its_limit_is_checked_before_its_body_is_read() -> None:
    client, services = make_client(rate_limit_per_min=20)  # margin: 8
    services.limiter = limiter = _CountingLimiter(services.store)
    for _ in range(13):
        assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    assert limiter.early_checks == 1  # the first; then 19..8 left: at least the margin
    for _ in range(7):  # 7..1 left: under the margin, so every request is checked early
        assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    assert limiter.early_checks == 1 + 7
    # over the limit: refused before the body is read (not even JSON)
    garbage = client.post("/v1/jobs", content=b"{", headers={**ACME, "Content-Type": "application/json"})
    assert_error(garbage, 429, "rate_limited")
    assert len(queued(services)) == 20


def test_an_edit_refused_by_the_limits_at_its_create_leaves_no_job_message_or_input_object() -> None:
    from tests.test_api_images import PNG, data_url

    client, services = make_client(max_jobs_in_flight=20)
    for _ in range(20):
        services.store.create(_job())
    # this process last saw plenty of room (another replica filled the cap since)
    client.app.state.limits_memory.remember("acme", Admission(True, in_flight_room=15), time.monotonic())
    response = client.post("/v1/jobs", json={"prompt": "p", "image": data_url(PNG)}, headers=ACME)
    assert_error(response, 429, "too_many_jobs")
    assert int(response.headers["Retry-After"]) > 0
    assert queued(services) == [] and len(services.store.tenant_job_ids("acme")) == 20
    assert services.objects.objects == {}  # type: ignore[attr-defined]
    # and the next request of that tenant is checked before its body
    garbage = client.post("/v1/jobs", content=b"{", headers={**ACME, "Content-Type": "application/json"})
    assert_error(garbage, 429, "too_many_jobs")


def test_the_redis_create_script_checks_and_counts_the_limits_with_the_create(redis_client: redis.Redis) -> None:
    services = fake_services(make_settings(rate_limit_per_min=1000, max_jobs_in_flight=2))
    services.store = RedisJobStore(redis_client)
    services.limiter = RedisRateLimiter(redis_client)
    client = TestClient(create_app(services=services))
    for _ in range(2):
        assert client.post("/v1/jobs", json=GENERATE, headers=ACME).status_code == 202
    client.app.state.limits_memory.remember("acme", Admission(True, rate_room=500, in_flight_room=500),  # type: ignore[attr-defined]
                                            time.monotonic())
    assert_error(client.post("/v1/jobs", json=GENERATE, headers=ACME), 429, "too_many_jobs")
    assert redis_client.scard(keys.tenant_active("acme")) == 2
    window = keys.rate_window("acme", int(time.time() // WINDOW_S))
    assert int(redis_client.get(window) or 0) == 2  # type: ignore[arg-type]
