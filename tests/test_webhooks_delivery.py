"""Integration tests: the Redis outbox (DB 15) and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import base64
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook

from broker import keys
from editfarm_testing.outbox import job_messages, mark_delivered
from editfarm_testing.webhooks import Reply, ScriptedReceiver, WebhookReceiver
from workers import webhooks as wh

SECRET = "whsec_" + base64.b64encode(b"integration-secret-0123456789abc").decode()
pytestmark = pytest.mark.integration

BODY = wh.build_body("job.succeeded", {"id": "job_1", "status": "succeeded"}, time.time())


@pytest.fixture
def receiver() -> Iterator[ScriptedReceiver]:
    """Answers its ``script`` in turn, then 200; records every request (a followed redirect as GET)."""
    with ScriptedReceiver() as rec:
        yield rec


@pytest.fixture
def r(redis_client: redis.Redis) -> redis.Redis:
    """The session's private Redis server (see conftest), flushed per test."""
    return redis_client


@pytest.fixture
def prefix(r: redis.Redis) -> Iterator[str]:
    """A unique message-id prefix; every key under it is deleted afterwards."""
    p = f"msg_test{uuid.uuid4().hex[:12]}"
    yield p
    for key in r.scan_iter(match=keys.webhook_message(p) + "*"):
        r.delete(key)


@pytest.fixture
def outbox(r: redis.Redis) -> wh.WebhookOutbox:
    return wh.WebhookOutbox(r, ttl_s=600)


def config(**kw: object) -> wh.WebhookConfig:
    base: dict[str, object] = {"secrets": [SECRET], "timeout_s": 0.3, "jitter": 0.1,
                               "retry_schedule_s": (0, 0.01, 0.01, 0.01), "allow_private": True,
                               "allow_http": True}
    base.update(kw)
    return wh.WebhookConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with wh.make_client(config()) as c:
        yield c


def test_two_500s_then_a_200_make_three_attempts_and_one_signed_delivery(receiver, outbox, prefix, client):
    receiver.script = [Reply(500), Reply(500)]
    mid = prefix + "_a"
    assert outbox.put(mid, receiver.url, BODY, "tenant1")
    outcomes = []
    for _ in range(5):
        result = wh.deliver_once(outbox, mid, config(), client)
        outcomes.append(result.outcome)
        if result.outcome == "retry":
            assert 0.01 <= result.retry_in_s <= 0.011  # type: ignore[operator]
    assert outcomes == ["retry", "retry", "delivered", "done", "done"]
    assert len(receiver.requests) == 3
    assert {d.headers["webhook-id"] for d in receiver.requests} == {mid}
    for delivery in receiver.requests:
        assert delivery.body == BODY and delivery.headers["content-type"] == "application/json"
        Webhook(SECRET).verify(delivery.body, delivery.headers)
    attempts = outbox.attempts(mid)
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert all(a["duration_ms"] >= 0 and a["at"] > 0 for a in attempts)
    msg = outbox.get(mid)
    assert msg and msg.state == "delivered" and msg.attempts == 3 and msg.status_code == 200


def test_each_attempt_carries_a_fresh_timestamp_covered_by_the_signature(receiver, outbox, prefix, client):
    receiver.script = [Reply(503)]
    mid = prefix + "_ts"
    outbox.put(mid, receiver.url, BODY, "t")
    clock = [time.time()]
    wh.deliver_once(outbox, mid, config(), client, now=lambda: clock[0])
    clock[0] += 1000
    wh.deliver_once(outbox, mid, config(), client, now=lambda: clock[0])
    stamps = [d.headers["webhook-timestamp"] for d in receiver.requests]
    t0 = int(clock[0]) - 1000
    assert stamps == [str(t0), str(t0 + 1000)]
    sigs = [d.headers["webhook-signature"] for d in receiver.requests]
    assert sigs == [wh.sign(SECRET, mid, t0, BODY), wh.sign(SECRET, mid, t0 + 1000, BODY)]


def test_a_410_stops_delivery_for_good(receiver, outbox, prefix, client):
    receiver.script = [Reply(410)]
    mid = prefix + "_gone"
    outbox.put(mid, receiver.url, BODY, "t")
    result = wh.deliver_once(outbox, mid, config(), client)
    assert result.outcome == "failed" and result.status_code == 410 and result.retry_in_s is None
    assert wh.deliver_once(outbox, mid, config(), client).outcome == "done"
    assert len(receiver.requests) == 1 and outbox.get(mid).state == "failed"  # type: ignore[union-attr]


def test_a_refused_connection_is_retried(outbox, prefix, client):
    with socket.socket() as sock:  # bound but not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        mid = prefix + "_refused"
        outbox.put(mid, url, BODY, "t")
        result = wh.deliver_once(outbox, mid, config(), client)
    assert result.outcome == "retry" and result.status_code is None
    assert (result.error or "").startswith("connection_refused: ")
    (attempt,) = outbox.attempts(mid)
    assert attempt["status_code"] is None and attempt["error"] == result.error


def test_a_receiver_slower_than_the_timeout_is_retried(receiver, outbox, prefix, client):
    receiver.script = [Reply(200, delay_s=1.0)]
    mid = prefix + "_slow"
    outbox.put(mid, receiver.url, BODY, "t")
    started = time.monotonic()
    result = wh.deliver_once(outbox, mid, config(timeout_s=0.2), client)
    assert time.monotonic() - started < 0.9
    assert result.outcome == "retry" and (result.error or "").startswith("timeout")
    assert outbox.get(mid).state == "pending"  # type: ignore[union-attr]


def test_a_302_redirect_is_not_followed_and_counts_as_a_failure(receiver, outbox, prefix, client):
    receiver.script = [Reply(302, headers={"location": "/elsewhere"})]
    mid = prefix + "_redirect"
    outbox.put(mid, receiver.url, BODY, "t")
    result = wh.deliver_once(outbox, mid, config(), client)
    assert result.outcome == "retry" and result.status_code == 302
    assert [d.path for d in receiver.requests] == ["/hook"]
    assert outbox.attempts(mid)[0]["error"] == "http 302"


def test_a_redirect_is_not_followed_even_by_a_client_configured_to_follow(receiver, outbox, prefix):
    receiver.script = [Reply(307, headers={"location": "/elsewhere"})]
    mid = prefix + "_redirect2"
    outbox.put(mid, receiver.url, BODY, "t")
    with httpx.Client(follow_redirects=True, trust_env=False) as following:
        assert wh.deliver_once(outbox, mid, config(), following).status_code == 307
    assert len(receiver.requests) == 1


def test_a_second_deliver_once_after_success_sends_nothing(receiver, outbox, prefix, client):
    mid = prefix + "_once"
    outbox.put(mid, receiver.url, BODY, "t")
    assert wh.deliver_once(outbox, mid, config(), client).outcome == "delivered"
    assert wh.deliver_once(outbox, mid, config(), client).outcome == "done"
    assert len(receiver.requests) == 1 and len(outbox.attempts(mid)) == 1


def test_the_url_policy_refuses_loopback_without_opening_a_socket(receiver, outbox, prefix, monkeypatch):
    mid = prefix + "_private"
    outbox.put(mid, receiver.url, BODY, "t")
    connects: list[object] = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect",
                        lambda self, addr: connects.append(addr) or real_connect(self, addr))
    with wh.make_client(config()) as c:
        result = wh.deliver_once(outbox, mid, config(allow_private=False), c)
    assert result.outcome == "failed" and "url_not_allowed" in (result.error or "")
    assert receiver.requests == [] and connects == []
    assert outbox.get(mid).state == "failed"  # type: ignore[union-attr]
    assert wh.deliver_once(outbox, mid, config(), wh.make_client(config())).outcome == "done"


def test_plain_http_is_refused_unless_allowed(receiver, outbox, prefix, client):
    mid = prefix + "_http"
    outbox.put(mid, receiver.url, BODY, "t")
    result = wh.deliver_once(outbox, mid, config(allow_http=False), client)
    assert result.outcome == "failed" and receiver.requests == []


def test_attempts_run_out_after_max_attempts(receiver, outbox, prefix, client):
    receiver.script = [Reply(500)] * 5
    mid = prefix + "_exhaust"
    outbox.put(mid, receiver.url, BODY, "t")
    cfg = config(max_attempts=3)
    outcomes = [wh.deliver_once(outbox, mid, cfg, client).outcome for _ in range(4)]
    assert outcomes == ["retry", "retry", "failed", "done"]
    assert len(receiver.requests) == 3 and outbox.get(mid).error == "http 500"  # type: ignore[union-attr]


def test_a_concurrent_delivery_of_the_same_message_is_deferred(receiver, outbox, prefix, client, r):
    receiver.script = [Reply(200, delay_s=0.4)]
    mid = prefix + "_race"
    outbox.put(mid, receiver.url, BODY, "t")
    first: list[wh.DeliveryResult] = []
    t = threading.Thread(
        target=lambda: first.append(wh.deliver_once(outbox, mid, config(timeout_s=2), client)))
    t.start()
    deadline = time.monotonic() + 2
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    with wh.make_client(config()) as other:
        second = wh.deliver_once(outbox, mid, config(busy_retry_s=1.5), other)
    t.join()
    assert second.outcome == "retry" and second.retry_in_s == 1.5
    assert first[0].outcome == "delivered" and len(receiver.requests) == 1
    assert r.exists(keys.webhook_message(mid) + ":lock") == 0  # released afterwards


def test_put_is_create_once_and_sets_a_ttl_on_both_keys(outbox, prefix, r):
    mid = prefix + "_put"
    assert outbox.put(mid, "https://example.com/a", b'{"v":1}', "t1") is True
    assert outbox.put(mid, "https://example.com/b", b'{"v":2}', "t2") is False
    msg = outbox.get(mid)
    assert msg and msg.url == "https://example.com/a" and msg.body == b'{"v":1}' and msg.tenant == "t1"
    outbox.record_attempt(mid, {"attempt": 1, "error": "x"})
    assert 0 < r.ttl(keys.webhook_message(mid)) <= 600
    assert 0 < r.ttl(keys.webhook_attempts(mid)) <= 600
    assert outbox.get(prefix + "_nothing") is None
    assert outbox.record_attempt(prefix + "_nothing", {}) == 0
    assert not outbox.mark_failed(prefix + "_nothing", "x", 1)
    assert r.exists(keys.webhook_message(prefix + "_nothing")) == 0


def test_the_outbox_works_with_a_decode_responses_client(r, prefix):
    client = redis.Redis(host="127.0.0.1", port=6379, db=15, decode_responses=True)
    box = wh.WebhookOutbox(client, ttl_s=60)
    mid = prefix + "_decoded"
    box.put(mid, "https://example.com/a", BODY, "t")
    mark_delivered(box, mid, 204, 123.5)
    msg = box.get(mid)
    assert msg and msg.body == BODY and msg.state == "delivered" and msg.status_code == 204
    assert msg.finished_at == 123.5
    client.close()


def test_a_redelivered_task_that_runs_before_the_scheduled_retry_waits_instead_of_sending(
        receiver, outbox, prefix, client):
    receiver.script = [Reply(500)]
    mid = prefix + "_early"
    outbox.put(mid, receiver.url, BODY, "t")
    cfg = config(retry_schedule_s=(0, 30, 30), jitter=0)
    assert wh.deliver_once(outbox, mid, cfg, client).retry_in_s == 30
    early = wh.deliver_once(outbox, mid, cfg, client)
    assert early.outcome == "retry" and early.attempt is None
    assert 28 < early.retry_in_s <= 30  # type: ignore[operator]
    assert len(receiver.requests) == 1
    due = wh.deliver_once(outbox, mid, cfg, client, now=lambda: time.time() + 30)
    assert due.outcome == "delivered" and len(receiver.requests) == 2


def test_claim_locks_only_a_pending_message_and_finish_attempt_records_and_unlocks_in_one_step(
        outbox, prefix, r):
    mid = prefix + "_claim"
    assert outbox.claim(mid, 5000) == (None, None)
    outbox.put(mid, "https://example.com/a", BODY, "t")
    msg, token = outbox.claim(mid, 5000)
    assert msg is not None and msg.state == "pending" and msg.body == BODY and token
    held, none = outbox.claim(mid, 5000)
    assert held is not None and none is None  # another caller holds the lock
    assert outbox.finish_attempt(mid, {"attempt": 1, "status_code": 204}, outbox.delivered_fields(204, 5.0),
                                 token) == 1
    assert r.exists(keys.webhook_lock(mid)) == 0
    done, no_token = outbox.claim(mid, 5000)
    assert done is not None and done.state == "delivered" and done.status_code == 204 and no_token is None
    assert r.exists(keys.webhook_lock(mid)) == 0  # a delivered message is never locked again
    assert outbox.attempts(mid) == [{"attempt": 1, "status_code": 204}]


def test_finish_attempt_of_a_vanished_message_records_nothing_and_still_unlocks(outbox, prefix, r):
    mid = prefix + "_vanished"
    outbox.put(mid, "https://example.com/a", BODY, "t")
    _, token = outbox.claim(mid, 5000)
    assert token is not None and r.exists(keys.webhook_lock(mid)) == 1
    r.delete(keys.webhook_message(mid))
    assert outbox.finish_attempt(mid, {"attempt": 1}, outbox.retry_fields(1.0), token) == 0
    assert r.exists(keys.webhook_lock(mid)) == 0 and r.exists(keys.webhook_message(mid)) == 0


def test_put_links_the_message_into_its_jobs_delivery_log_even_when_it_exists(outbox, prefix, r):
    mid, job_id = prefix + "_linked", prefix + "_job"
    assert outbox.put(mid, "https://example.com/a", BODY, "t", job_id=job_id) is True
    r.delete(keys.job_webhooks(job_id))
    assert outbox.put(mid, "https://example.com/a", BODY, "t", job_id=job_id) is False
    assert job_messages(outbox, job_id) == {mid}
    assert 0 < r.ttl(keys.job_webhooks(job_id)) <= 600
    r.delete(keys.job_webhooks(job_id))


def test_a_long_answer_body_is_not_read_to_the_end_and_the_delivery_still_counts(outbox, prefix):
    big = b"x" * (wh.MAX_RESPONSE_BODY_BYTES * 4)
    with WebhookReceiver(reply=lambda delivery: Reply(200, body=big), keep_alive=True, path="/hook") as server:
        mid = prefix + "_bigbody"
        outbox.put(mid, server.url, BODY, "t")
        with wh.make_client(config()) as c:
            result = wh.deliver_once(outbox, mid, config(timeout_s=2), c)
            assert result.outcome == "delivered" and result.status_code == 200
            assert len(c._transport._pool.connections) == 0  # type: ignore[attr-defined]  # not kept
