"""GET /v1/jobs/{id}/events: Server-Sent Events, on the in-memory bus and on real Redis pub/sub."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.deps import Services
from api.events import InMemoryEventBus, RedisEventSource
from broker import keys
from broker.events import RedisEventPublisher
from broker.jobstore import RedisJobStore
from broker.schema import JobStatus, Output
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
GLOBEX = {"Authorization": f"Bearer {TEST_KEYS['globex']}"}


def data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def submit(client: TestClient | httpx.Client) -> str:
    response = client.post("/v1/jobs", json={"prompt": "p", "image": data_url()}, headers=ACME)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def parse_frame(lines: list[str]) -> dict[str, Any]:
    frame: dict[str, Any] = {}
    for line in lines:
        if line.startswith(":"):
            frame["comment"] = line[1:].strip()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        frame[name] = json.loads(value) if name == "data" else value
    return frame


def parse_stream(text: str) -> list[dict[str, Any]]:
    return [parse_frame(block.split("\n")) for block in text.split("\n\n") if block.strip()]


def named(frames: list[dict[str, Any]]) -> list[str]:
    """The event names, in order, with keepalive comments left out."""
    return [f["event"] for f in frames if "event" in f]


def bus_of(services: Services) -> InMemoryEventBus:
    assert isinstance(services.events, InMemoryEventBus)
    return services.events


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def in_thread(target: Callable[[], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test through join_ok
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def join_ok(thread: threading.Thread) -> None:
    thread.join(10)
    assert not thread.is_alive()
    for error in thread.errors:  # type: ignore[attr-defined]
        raise error


def count_reads(services: Services) -> list[int]:
    """Counts the route's reads of the job (``[n]``), so a test's worker can wait until the stream
    has read the state it starts with (the 404 check, then the read after subscribing)."""
    reads = [0]
    read = services.store.get_for_tenant

    def counting(job_id: str, tenant: str) -> Any:
        job = read(job_id, tenant)
        reads[0] += 1
        return job

    services.store.get_for_tenant = counting  # type: ignore[method-assign]
    return reads


def output_of(job_id: str) -> dict[str, Any]:
    return Output(key=f"tenants/acme/jobs/{job_id}/outputs/0.png", content_type="image/png", width=16,
                  height=16, sha256="0" * 64, size_bytes=10).model_dump()


# -- in memory -----------------------------------------------------------------------------------


def test_a_finished_job_gets_status_then_done_at_once_and_the_stream_closes() -> None:
    services = fake_services()
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    assert services.store.transition(job_id, JobStatus.RUNNING)
    assert services.store.transition(job_id, JobStatus.SUCCEEDED, {"outputs": [output_of(job_id)],
                                                                   "finished_at": time.time()})
    response = client.get(f"/v1/jobs/{job_id}/events", headers=ACME)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    frames = parse_stream(response.text)
    assert named(frames) == ["status", "done"]
    assert frames[0]["retry"] == "3000" and [f["id"] for f in frames] == ["1", "2"]
    assert frames[0]["data"]["status"] == "succeeded" and frames[0]["data"] == frames[1]["data"]
    assert frames[1]["data"]["outputs"][0]["url"].startswith("memory://objects/")
    assert bus_of(services).subscriber_count(job_id) == 0


def test_a_client_gets_the_current_state_first_then_throttled_progress_previews_and_done() -> None:
    services = fake_services()
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    bus, reads = bus_of(services), count_reads(services)

    def worker() -> None:
        wait_for(lambda: bus.subscriber_count(job_id) == 1 and reads[0] >= 2)
        assert services.store.transition(job_id, JobStatus.RUNNING, {"started_at": time.time()})
        bus.publish(job_id, "status", {"status": "running"})
        for step in range(1, 6):  # faster than sse_progress_interval_s: only the first and the last go out
            bus.publish(job_id, "progress", {"step": step, "total": 5})
        bus.publish(job_id, "preview", {"step": 3, "key": f"tenants/acme/jobs/{job_id}/previews/3.jpg"})
        bus.publish(job_id, "preview", {"step": 3, "key": "tenants/globex/jobs/job_x/outputs/0.png"})
        # the stream re-reads the record on each status event: finish only once it has taken them all
        wait_for(lambda: bus.undelivered(job_id) == 0)
        assert services.store.transition(job_id, JobStatus.SUCCEEDED, {"outputs": [output_of(job_id)],
                                                                       "progress": {"step": 5, "total": 5}})
        bus.publish(job_id, "status", {"status": "succeeded"})

    thread = in_thread(worker)
    response = client.get(f"/v1/jobs/{job_id}/events", headers=ACME)
    join_ok(thread)
    frames = parse_stream(response.text)
    assert named(frames) == ["status", "status", "progress", "progress", "preview", "status", "done"]
    # the position is read just after the record; the worker may start the job in between
    assert frames[0]["data"]["status"] == "queued" and frames[0]["data"]["queue_position"] in (0, None)
    assert frames[1]["data"]["status"] == "running" and frames[1]["data"]["started_at"]
    assert [f["data"] for f in frames[2:4]] == [{"step": 1, "total": 5}, {"step": 5, "total": 5}]
    preview = frames[4]["data"]
    assert preview["key"].endswith("/previews/3.jpg") and preview["url"].startswith("memory://objects/")
    assert frames[5]["data"]["status"] == "succeeded" and frames[5]["data"]["outputs"][0]["url"]
    assert frames[6]["data"] == frames[5]["data"]
    assert [int(f["id"]) for f in frames] == list(range(1, 8))
    assert bus.subscriber_count(job_id) == 0


def test_the_latest_throttled_progress_is_sent_when_the_interval_ends() -> None:
    services = fake_services(make_settings(sse_progress_interval_s=0.1))
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    bus, reads = bus_of(services), count_reads(services)

    def worker() -> None:
        wait_for(lambda: bus.subscriber_count(job_id) == 1 and reads[0] >= 2)
        for step in (1, 2, 3):
            bus.publish(job_id, "progress", {"step": step, "total": 10})
        time.sleep(0.3)
        assert services.store.transition(job_id, JobStatus.FAILED, {"error": {"code": "render_failed",
                                                                              "message": "boom"}})
        bus.publish(job_id, "status", {"status": "failed"})

    thread = in_thread(worker)
    frames = parse_stream(client.get(f"/v1/jobs/{job_id}/events", headers=ACME).text)
    join_ok(thread)
    assert named(frames) == ["status", "progress", "progress", "status", "done"]
    assert [f["data"]["step"] for f in frames if f.get("event") == "progress"] == [1, 3]
    assert frames[-1]["data"]["error"] == {"code": "render_failed", "message": "boom"}


def test_keepalives_are_comments_and_a_status_change_the_feed_missed_is_caught_at_the_next_one() -> None:
    services = fake_services(make_settings(sse_keepalive_s=0.05))
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    bus, reads = bus_of(services), count_reads(services)

    def worker() -> None:
        wait_for(lambda: bus.subscriber_count(job_id) == 1 and reads[0] >= 2)
        time.sleep(0.2)
        # the job ends but no event is published (a lost pub/sub message)
        assert services.store.transition(job_id, JobStatus.CANCELED, {"finished_at": time.time()})

    thread = in_thread(worker)
    frames = parse_stream(client.get(f"/v1/jobs/{job_id}/events", headers=ACME).text)
    join_ok(thread)
    assert any(f.get("comment") == "ping" for f in frames)
    assert named(frames) == ["status", "status", "done"]
    assert frames[-1]["data"]["status"] == "canceled"


def test_canceling_through_the_api_ends_a_watchers_stream() -> None:
    services = fake_services()
    app = create_app(services=services)
    watcher, controller = TestClient(app), TestClient(app)
    job_id = submit(controller)
    bus, reads = bus_of(services), count_reads(services)

    def cancel() -> None:
        wait_for(lambda: bus.subscriber_count(job_id) == 1 and reads[0] >= 2)
        assert controller.post(f"/v1/jobs/{job_id}/cancel", headers=ACME).status_code == 200

    thread = in_thread(cancel)
    frames = parse_stream(watcher.get(f"/v1/jobs/{job_id}/events", headers=ACME).text)
    join_ok(thread)
    assert named(frames) == ["status", "status", "done"]
    assert frames[-1]["data"]["error"]["code"] == "canceled"


def test_a_stream_ends_after_its_maximum_duration_and_the_client_reconnects_for_the_current_state() -> None:
    services = fake_services(make_settings(sse_max_duration_s=0.1, sse_retry_ms=500))
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    frames = parse_stream(client.get(f"/v1/jobs/{job_id}/events", headers=ACME).text)
    assert named(frames) == ["status"] and frames[0]["retry"] == "500"
    assert bus_of(services).subscriber_count(job_id) == 0


def test_an_unknown_or_another_tenants_job_is_404_before_any_stream() -> None:
    services = fake_services()
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    theirs = client.get(f"/v1/jobs/{job_id}/events", headers=GLOBEX)
    unknown = client.get("/v1/jobs/job_000000000000000000000000/events", headers=GLOBEX)
    for response in (theirs, unknown):
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert theirs.content == unknown.content
    assert client.get(f"/v1/jobs/{job_id}/events").status_code == 401
    assert bus_of(services).subscriber_count(job_id) == 0


def test_no_event_feed_is_503_unavailable() -> None:
    services = fake_services()
    services.events = RedisEventSource("redis://127.0.0.1:1/0", connect_timeout_s=0.5)
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    response = client.get(f"/v1/jobs/{job_id}/events", headers=ACME)
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"


# -- real Redis ----------------------------------------------------------------------------------


def redis_services(redis_client: redis.Redis, redis_port: int, **settings: Any) -> Services:
    services = fake_services(make_settings(redis_url=f"redis://127.0.0.1:{redis_port}/0", **settings))
    services.store = RedisJobStore(redis_client)
    services.publisher = RedisEventPublisher(redis_client)
    services.events = RedisEventSource(services.settings.redis_url)
    return services


def subscribers(redis_client: redis.Redis, job_id: str) -> int:
    ((_, count),) = redis_client.pubsub_numsub(keys.job_events(job_id))
    return int(count)


def test_on_real_redis_a_watcher_gets_the_current_state_then_progress_and_done_in_order(
    redis_client: redis.Redis, redis_server: Any,
) -> None:
    services = redis_services(redis_client, redis_server.port, sse_progress_interval_s=0.0)
    reads = count_reads(services)
    client = TestClient(create_app(services=services))
    job_id = submit(client)
    store, publisher = RedisJobStore(redis_client), RedisEventPublisher(redis_client)
    assert store.transition(job_id, JobStatus.RUNNING, {"started_at": time.time(), "attempts": 1})

    def worker() -> None:  # what a render worker does, through the real store and pub/sub
        wait_for(lambda: subscribers(redis_client, job_id) == 1)
        wait_for(lambda: reads[0] >= 2)  # the 404 check, then the state read after subscribing
        for step in range(1, 5):
            publisher.publish(job_id, "progress", {"step": step, "total": 4})
        assert store.transition(job_id, JobStatus.SUCCEEDED, {"finished_at": time.time(),
                                                              "outputs": [output_of(job_id)]})
        publisher.publish(job_id, "status", {"status": "succeeded"})

    thread = in_thread(worker)
    frames = parse_stream(client.get(f"/v1/jobs/{job_id}/events", headers=ACME).text)
    join_ok(thread)
    assert named(frames) == ["status", *["progress"] * 4, "status", "done"]
    assert [f["data"]["status"] for f in frames if f.get("event") == "status"] == ["running", "succeeded"]
    assert [f["data"]["step"] for f in frames if f.get("event") == "progress"] == [1, 2, 3, 4]
    assert frames[-1]["data"]["outputs"][0]["key"].endswith("/outputs/0.png")
    wait_for(lambda: subscribers(redis_client, job_id) == 0)


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """The app under uvicorn on a loopback port, in a thread (responses really stream)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class FrameReader:
    """Frames of a live SSE response, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.iter_lines()

    def next(self) -> dict[str, Any] | None:
        block: list[str] = []
        for line in self._lines:
            if line == "":
                if block:
                    return parse_frame(block)
                continue
            block.append(line)
        return parse_frame(block) if block else None


def test_over_http_the_first_frame_arrives_before_anything_happens_and_the_stream_closes_after_done(
    redis_client: redis.Redis, redis_server: Any,
) -> None:
    services = redis_services(redis_client, redis_server.port, sse_progress_interval_s=0.0)
    store, publisher = RedisJobStore(redis_client), RedisEventPublisher(redis_client)
    seen = {"running": threading.Event(), "progress": threading.Event()}

    def worker(job_id: str) -> None:  # a render worker, in step with what the watcher has seen
        assert store.transition(job_id, JobStatus.RUNNING, {"started_at": time.time(), "attempts": 1})
        publisher.publish(job_id, "status", {"status": "running"})
        assert seen["running"].wait(5)
        for step in range(1, 4):
            publisher.publish(job_id, "progress", {"step": step, "total": 3})
        assert seen["progress"].wait(5)
        assert store.transition(job_id, JobStatus.SUCCEEDED, {"finished_at": time.time(),
                                                              "outputs": [output_of(job_id)]})
        publisher.publish(job_id, "status", {"status": "succeeded"})

    with live_server(create_app(services=services)) as base, httpx.Client(base_url=base, timeout=10) as http:
        job_id = submit(http)
        with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=ACME) as response:
            assert response.status_code == 200
            reader = FrameReader(response)
            first = reader.next()  # nothing was published yet: this is the record, streamed at once
            assert first is not None and first["event"] == "status" and first["data"]["status"] == "queued"
            thread = in_thread(lambda: worker(job_id))
            frames = []
            while (frame := reader.next()) is not None:  # ends when the server closes the stream
                frames.append(frame)
                if frame.get("event") == "status" and frame["data"]["status"] == "running":
                    seen["running"].set()
                if frame.get("event") == "progress" and frame["data"]["step"] == 3:
                    seen["progress"].set()
            join_ok(thread)
        assert named(frames) == ["status", "progress", "progress", "progress", "status", "done"]
        assert [f["data"]["status"] for f in frames if f.get("event") == "status"] == ["running", "succeeded"]
    wait_for(lambda: subscribers(redis_client, job_id) == 0)


@pytest.mark.xfail(strict=False, reason="flaky: about one run in three the stream's Redis subscription is not "
                   "seen by PUBSUB NUMSUB while the stream is open; under investigation (see the issue notes)")
def test_over_http_a_client_that_goes_away_releases_its_redis_subscription(
    redis_client: redis.Redis, redis_server: Any,
) -> None:
    # a short keepalive: the server notices a gone client at its next write at the latest
    services = redis_services(redis_client, redis_server.port, sse_keepalive_s=0.5)
    with live_server(create_app(services=services)) as base, httpx.Client(base_url=base, timeout=10) as http:
        job_id = submit(http)
        with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=ACME) as response:
            first = FrameReader(response).next()
            assert first is not None and first["event"] == "status"
            wait_for(lambda: subscribers(redis_client, job_id) == 1, timeout=5)
        # the client closed the connection while the job is still queued
        wait_for(lambda: subscribers(redis_client, job_id) == 0, timeout=20)
        wait_for(lambda: stream_connections(redis_client) == 0, timeout=20)  # closed, not just idle


def stream_connections(redis_client: redis.Redis) -> int:
    return sum(1 for c in redis_client.client_list() if c.get("name") == RedisEventSource.CLIENT_NAME)
