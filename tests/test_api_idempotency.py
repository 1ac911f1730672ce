"""Idempotency-Key on POST /v1/jobs: replays, conflicts, per-tenant keys, races and failure paths."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

import api.idempotency as idem
from api.app import create_app
from api.deps import Services
from api.idempotency import (
    PENDING_TTL_S,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RedisIdempotencyStore,
    request_digest,
)
from api.intake import Sources
from broker import keys
from broker.jobstore import InMemoryJobStore, RedisJobStore
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings, queued

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
GLOBEX = {"Authorization": f"Bearer {TEST_KEYS['globex']}"}
GENERATE = {"operation": "generate", "prompt": "a red bicycle", "width": 64, "height": 64, "seed": 7}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def make_client(services: Services | None = None) -> tuple[TestClient, Services]:
    services = services or fake_services()
    return TestClient(create_app(services=services)), services




def post(client: TestClient, key: str | None, body: dict[str, Any] = GENERATE,
         headers: dict[str, str] = ACME) -> Any:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/jobs", json=body, headers={**headers, **extra})


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param


def test_the_same_key_and_body_return_the_same_job_with_200() -> None:
    client, services = make_client()
    first = post(client, "order-42")
    assert first.status_code == 202
    again = post(client, "order-42")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert "Idempotent-Replayed" not in first.headers
    assert len(queued(services)) == 1
    # the current view, not a copy of the first answer
    services.store.compare_and_set(first.json()["id"], {}, {"status": "running", "started_at": time.time()})
    assert post(client, "order-42").json()["status"] == "running"


def test_json_whitespace_and_key_order_do_not_matter() -> None:
    client, _ = make_client()
    first = post(client, "k1")
    raw = json.dumps(dict(reversed(list(GENERATE.items()))), indent=2).encode()
    again = client.post("/v1/jobs", content=raw,
                        headers={**ACME, "Content-Type": "application/json", "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_a_multipart_retry_with_a_new_boundary_is_the_same_request() -> None:
    client, services = make_client()
    image = png()
    fields: dict[str, Any] = {"operation": (None, "edit"), "prompt": (None, "make it blue"), "seed": (None, "3"),
                              "image": ("a.png", image, "image/png")}
    first = client.post("/v1/jobs", files=fields, headers={**ACME, "Idempotency-Key": "mp"})
    assert first.status_code == 202, first.text
    again = client.post("/v1/jobs", files=fields, headers={**ACME, "Idempotency-Key": "mp"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other_image = {**fields, "image": ("a.png", image + b"\0", "image/png")}
    assert_error(client.post("/v1/jobs", files=other_image, headers={**ACME, "Idempotency-Key": "mp"}),
                 409, "idempotency_conflict", "Idempotency-Key")
    assert len(queued(services)) == 1


def test_the_same_key_with_another_body_is_409_idempotency_conflict() -> None:
    client, services = make_client()
    assert post(client, "k").status_code == 202
    assert_error(post(client, "k", {**GENERATE, "seed": 8}), 409, "idempotency_conflict", "Idempotency-Key")
    assert len(queued(services)) == 1


def test_keys_are_per_tenant() -> None:
    client, _ = make_client()
    mine = post(client, "shared").json()["id"]
    theirs = post(client, "shared", headers=GLOBEX)
    assert theirs.status_code == 202 and theirs.json()["id"] != mine
    # and another body under another tenant's key is no conflict
    assert post(client, "shared2", {**GENERATE, "seed": 1}, headers=GLOBEX).status_code == 202
    assert post(client, "shared2").status_code == 202


def test_without_the_header_every_submission_is_a_new_job() -> None:
    client, _ = make_client()
    assert post(client, None).json()["id"] != post(client, None).json()["id"]


@pytest.mark.parametrize("key", ["x" * 256, " padded", "tab\there", ""])
def test_a_bad_key_is_422_invalid_parameter(key: str) -> None:
    client, services = make_client()
    assert_error(post(client, key), 422, "invalid_parameter", "Idempotency-Key")
    assert queued(services) == []


def test_a_non_ascii_key_is_422() -> None:
    client, _ = make_client()
    headers = [(k.encode(), v.encode()) for k, v in ACME.items()] + [(b"Idempotency-Key", "clé".encode())]
    response = client.post("/v1/jobs", json=GENERATE, headers=headers)
    assert_error(response, 422, "invalid_parameter", "Idempotency-Key")


def test_a_255_character_printable_key_is_fine() -> None:
    client, _ = make_client()
    key = ("a b~!" * 51)[:255]
    assert post(client, key).status_code == 202
    assert post(client, key).status_code == 200


def test_a_refused_request_does_not_keep_the_key() -> None:
    client, services = make_client()
    assert_error(post(client, "k", {**GENERATE, "steps": 0}), 422, "invalid_parameter", "steps")
    # not remembered: the corrected request under the same key is a new job
    assert post(client, "k").status_code == 202
    assert len(queued(services)) == 1


class _FlakyStore(InMemoryJobStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def create(self, job: Any) -> None:
        if self.down:
            raise redis.exceptions.ConnectionError("down")
        super().create(job)


def test_a_job_store_failure_frees_the_key_for_the_retry() -> None:
    services = fake_services()
    services.store = store = _FlakyStore()
    client, _ = make_client(services)
    store.down = True
    assert_error(post(client, "k"), 503, "unavailable")
    store.down = False
    retry = post(client, "k")
    assert retry.status_code == 202 and len(queued(services)) == 1


class _LostReplyStore(RedisJobStore):
    """The create runs on Redis, then its reply is lost (the connection dropped, as in a failover)."""

    async def create_and_enqueue_within_async(self, *args: Any, **kwargs: Any) -> Any:
        await super().create_and_enqueue_within_async(*args, **kwargs)
        raise redis.exceptions.ConnectionError("connection reset by peer")


def test_a_create_whose_reply_was_lost_leaves_the_key_naming_its_job(redis_client: redis.Redis) -> None:
    """The key is pointed by the create itself: the request's clean-up (the 503) must not free it, or a
    retry with the key would make a second job beside the one the lost reply created."""
    services = fake_services()
    services.store = _LostReplyStore(redis_client)
    services.idempotency = RedisIdempotencyStore(redis_client)
    client, _ = make_client(services)
    assert_error(post(client, "order-7"), 503, "unavailable")
    (made,) = [i.decode() for i in redis_client.zrange(keys.tenant_jobs("acme"), 0, -1)]
    services.store = RedisJobStore(redis_client)
    retry = post(client, "order-7")
    assert retry.status_code == 200 and retry.json()["id"] == made, retry.text
    assert redis_client.zcard(keys.tenant_jobs("acme")) == 1


class _DownOnce(InMemoryIdempotencyStore):
    """Deletes fail while ``down`` (a store unreachable when the request ends)."""

    down = True

    def swap(self, tenant: str, key: str, expected: str, value: str | None, ttl_s: int) -> bool:
        if value is None and self.down:
            raise redis.exceptions.ConnectionError("down")
        return super().swap(tenant, key, expected, value, ttl_s)


def test_a_key_the_request_could_not_free_is_freed_once_the_store_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idem, "IN_PROGRESS_WAIT_S", 0.1)
    services = fake_services()
    services.store = store = _FlakyStore()
    services.idempotency = keys_store = _DownOnce()
    with TestClient(create_app(services=services)) as client:
        store.down = True
        assert_error(post(client, "k"), 503, "unavailable")
        assert_error(post(client, "k"), 409, "idempotency_in_progress")  # its marker is still there
        store.down = keys_store.down = False
        deadline = time.monotonic() + 10
        while keys_store.values and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not keys_store.values  # released in the background, not after PENDING_TTL_S
        retry = post(client, "k")
    assert retry.status_code == 202 and len(queued(services)) == 1


def test_a_key_whose_job_is_gone_is_free_again() -> None:
    client, services = make_client()
    first = post(client, "k").json()["id"]
    store = services.store
    assert isinstance(store, InMemoryJobStore)
    store._jobs.pop(first)  # expired
    again = post(client, "k")
    assert again.status_code == 202 and again.json()["id"] != first


def _digest() -> str:
    """The hash the route computes for GENERATE (JSON: no image sources)."""
    return request_digest(dict(GENERATE), Sources())


def test_a_duplicate_while_the_first_is_in_flight_waits_then_gets_409_in_progress(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idem, "IN_PROGRESS_WAIT_S", 0.2)
    client, services = make_client()
    services.idempotency.reserve("acme", "k", f"{_digest()} pending:other", PENDING_TTL_S)
    response = post(client, "k")
    assert_error(response, 409, "idempotency_in_progress", "Idempotency-Key")
    assert response.headers["Retry-After"] == "1"
    # another body under a pending key is a conflict at once
    assert_error(post(client, "k", {**GENERATE, "seed": 9}), 409, "idempotency_conflict")


def test_a_duplicate_that_waits_gets_the_job_when_the_first_finishes() -> None:
    client, services = make_client()
    job_id = post(client, None).json()["id"]
    pending = f"{_digest()} pending:other"
    services.idempotency.reserve("acme", "k", pending, PENDING_TTL_S)

    def finish() -> None:
        time.sleep(0.3)
        services.idempotency.swap("acme", "k", pending, f"{_digest()} {job_id}", 60)

    thread = threading.Thread(target=finish)
    thread.start()
    response = post(client, "k")
    thread.join()
    assert response.status_code == 200 and response.json()["id"] == job_id


def test_concurrent_duplicates_make_one_job() -> None:
    client, services = make_client()
    results: list[Any] = []

    def submit() -> None:
        results.append(post(client, "race"))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(202) == 1, statuses
    assert set(statuses) <= {200, 202, 409}
    assert len({r.json()["id"] for r in results if r.status_code in (200, 202)}) == 1
    assert len(queued(services)) == 1


# -- the stores ------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> IdempotencyStore:
    if request.param == "memory":
        return InMemoryIdempotencyStore()
    client: redis.Redis = request.getfixturevalue("redis_client")
    return RedisIdempotencyStore(client)


def test_reserve_is_set_if_absent_and_swap_is_compare_and_set(store: IdempotencyStore) -> None:
    assert store.reserve("acme", "k", "d pending:1", 60) is None
    assert store.reserve("acme", "k", "d pending:2", 60) == "d pending:1"
    assert store.reserve("globex", "k", "d pending:3", 60) is None
    assert not store.swap("acme", "k", "d pending:2", "d job_x", 60)
    assert store.swap("acme", "k", "d pending:1", "d job_x", 60)
    assert store.reserve("acme", "k", "d pending:4", 60) == "d job_x"
    assert store.swap("acme", "k", "d job_x", None, 0)
    assert store.reserve("acme", "k", "d pending:5", 60) is None


def test_the_redis_store_keeps_a_pending_marker_briefly_and_a_job_for_the_ttl(redis_client: redis.Redis) -> None:
    services = fake_services(make_settings(idempotency_ttl_s=3600))
    services.store = RedisJobStore(redis_client)
    services.idempotency = RedisIdempotencyStore(redis_client)
    client, _ = make_client(services)
    first = post(client, "order-1")
    assert first.status_code == 202
    key = keys.idempotency("acme", "order-1")
    value = redis_client.get(key)
    assert isinstance(value, bytes) and value.decode().endswith(" " + first.json()["id"])
    assert 3500 < int(redis_client.ttl(key)) <= 3600  # type: ignore[arg-type]
    assert post(client, "order-1").json()["id"] == first.json()["id"]
    assert_error(post(client, "order-1", {**GENERATE, "seed": 1}), 409, "idempotency_conflict")
    redis_client.set(keys.idempotency("acme", "p"), f"{_digest()} pending:x", ex=PENDING_TTL_S)
    assert 0 < int(redis_client.ttl(keys.idempotency("acme", "p"))) <= PENDING_TTL_S  # type: ignore[arg-type]


def test_the_request_hash_covers_image_bytes_and_urls() -> None:
    a = request_digest({"prompt": "p"}, Sources(image=b"abc"))
    assert a == request_digest({"prompt": "p"}, Sources(image=b"abc"))
    assert a != request_digest({"prompt": "p"}, Sources(image=b"abd"))
    assert a != request_digest({"prompt": "p"}, Sources(image="abc"))
    assert a != request_digest({"prompt": "q"}, Sources(image=b"abc"))
    assert request_digest({"seed": 1}, Sources()) != request_digest({"seed": 1.0}, Sources())
    big = "data:image/png;base64," + base64.b64encode(b"x" * 100_000).decode()
    assert len(request_digest({}, Sources(references=[big]))) == 64


def test_the_document_declares_the_header_200_and_409() -> None:
    client, _ = make_client()
    post_op = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]
    header = next(p for p in post_op["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header" and header["schema"]["maxLength"] == 255
    assert {"200", "202", "409", "429"} <= set(post_op["responses"])
