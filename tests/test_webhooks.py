"""Unit tests of signing, ids, bodies, retry schedule and the in-memory outbox (no network)."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from broker.urlpolicy import HostDoesNotResolve
from editfarm_testing.outbox import InMemoryWebhookOutbox, job_messages, mark_delivered
from workers import webhooks as wh

SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 24).decode()
BODY = b'{"type":"job.succeeded","data":{"id":"job_1"}}'


def headers_for(secrets: list[str], body: bytes = BODY, msg_id: str = "msg_1") -> dict[str, str]:
    ts = int(time.time())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": wh.sign_all(secrets, msg_id, ts, body)}


def test_a_signature_verifies_with_the_reference_standardwebhooks_package():
    assert Webhook(SECRET_A).verify(BODY, headers_for([SECRET_A])) == json.loads(BODY)


def test_a_signature_has_the_v1_base64_format():
    sig = wh.sign(SECRET_A, "msg_1", 1700000000, BODY)
    version, b64 = sig.split(",")
    assert version == "v1" and len(base64.b64decode(b64)) == 32


def test_a_raw_secret_without_prefix_is_used_as_its_utf8_bytes():
    headers = headers_for(["plain-text-secret"])
    Webhook(b"plain-text-secret").verify(BODY, headers)


def test_an_unpadded_whsec_secret_is_accepted_like_the_reference_does():
    padded = "whsec_" + base64.b64encode(b"k" * 31).decode()
    assert padded.endswith("=")
    unpadded = padded.rstrip("=")
    Webhook(padded).verify(BODY, headers_for([unpadded]))


def test_with_two_secrets_the_header_carries_two_signatures_and_each_secret_verifies_alone():
    headers = headers_for([SECRET_A, SECRET_B])
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(SECRET_A).verify(BODY, headers)
    Webhook(SECRET_B).verify(BODY, headers)
    Webhook(SECRET_A).verify(BODY, headers_for([SECRET_A]))
    Webhook(SECRET_B).verify(BODY, headers_for([SECRET_B]))


def test_a_tampered_body_fails_verification():
    headers = headers_for([SECRET_A])
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(BODY.replace(b"job_1", b"job_2"), headers)


def test_a_signature_from_another_secret_fails_verification():
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(BODY, headers_for([SECRET_A]))


@pytest.mark.parametrize("bad", ["", "whsec_", "whsec_!!notbase64!!"])
def test_empty_or_malformed_secrets_are_rejected(bad):
    with pytest.raises(ValueError):
        wh.sign(bad, "msg_1", 1, BODY)
    with pytest.raises(ValueError):
        wh.WebhookConfig(secrets=[bad])


def test_a_config_without_secrets_is_rejected():
    with pytest.raises(ValueError):
        wh.WebhookConfig(secrets=[])


def test_message_id_for_is_stable_and_distinct_per_event():
    a = wh.message_id_for("job_abc", "job.succeeded")
    assert a == wh.message_id_for("job_abc", "job.succeeded") == "msg_job_abc_job_succeeded"
    assert a != wh.message_id_for("job_abc", "job.failed")
    assert a != wh.message_id_for("job_abd", "job.succeeded")


@pytest.mark.parametrize(("job_id", "event"),
                         [("job:1", "job.failed"), ("job_1", "job.exploded"), ("", "job.failed")])
def test_message_id_for_rejects_unknown_events_and_unsafe_job_ids(job_id, event):
    with pytest.raises(ValueError):
        wh.message_id_for(job_id, event)


def test_build_body_is_compact_json_with_type_iso_timestamp_and_data():
    body = wh.build_body("job.failed", {"id": "job_1", "status": "failed"}, 1700000000.5)
    assert b" " not in body
    assert json.loads(body) == {"type": "job.failed", "timestamp": "2023-11-14T22:13:20.500000Z",
                                "data": {"id": "job_1", "status": "failed"}}
    with pytest.raises(ValueError):
        wh.build_body("job.running", {}, 0)


def test_the_retry_schedule_is_followed_and_then_runs_out():
    schedule = (0, 5, 300, 1800)
    delays = [wh.next_delay_s(n, schedule, 0.0) for n in range(1, 5)]
    assert delays == [5, 300, 1800, None]


def test_max_attempts_beyond_the_schedule_repeats_its_last_delay():
    assert wh.next_delay_s(5, (0, 5, 60), 0.0, max_attempts=7) == 60
    assert wh.next_delay_s(7, (0, 5, 60), 0.0, max_attempts=7) is None
    assert wh.next_delay_s(1, (0, 5, 60), 0.0, max_attempts=1) is None


def test_jitter_only_lengthens_a_delay_and_by_at_most_the_fraction():
    assert wh.next_delay_s(1, (0, 100), 0.1, rng=lambda: 0.0) == 100
    assert wh.next_delay_s(1, (0, 100), 0.1, rng=lambda: 0.999999) == pytest.approx(110, abs=1e-3)
    for _ in range(200):
        assert 100 <= wh.next_delay_s(1, (0, 100), 0.1) <= 110  # type: ignore[operator]


def test_the_default_config_follows_the_standard_webhooks_example_schedule():
    cfg = wh.WebhookConfig(secrets=[SECRET_A])
    assert cfg.retry_schedule_s[:7] == (0, 5, 300, 1800, 7200, 18000, 36000)
    assert cfg.max_attempts == len(cfg.retry_schedule_s) and cfg.timeout_s == 15
    assert not cfg.allow_private and not cfg.allow_http


def test_the_in_memory_outbox_creates_a_message_only_once():
    box = InMemoryWebhookOutbox()
    assert box.put("msg_1", "https://example.com/hook", b"first", "t1") is True
    assert box.put("msg_1", "https://example.com/other", b"second", "t2") is False
    msg = box.get("msg_1")
    assert msg is not None and msg.body == b"first" and msg.state == "pending" and msg.tenant == "t1"
    assert box.get("msg_missing") is None


def test_the_in_memory_outbox_records_attempts_and_states():
    box = InMemoryWebhookOutbox()
    box.put("msg_1", "https://example.com/hook", b"{}", "t1")
    assert box.record_attempt("msg_1", {"attempt": 1, "status_code": 500}) == 1
    assert box.attempts("msg_1") == [{"attempt": 1, "status_code": 500}]
    assert box.mark_failed("msg_1", "http 410", 5.0, 410)
    msg = box.get("msg_1")
    assert msg and msg.state == "failed" and msg.status_code == 410 and msg.attempts == 1
    assert box.record_attempt("msg_missing", {}) == 0 and not mark_delivered(box, "msg_missing", 200, 1.0)


def test_the_in_memory_outbox_claims_a_pending_message_once_and_finishes_it_with_its_lock():
    box = InMemoryWebhookOutbox()
    assert box.claim("msg_1", 1000) == (None, None)
    box.put("msg_1", "https://example.com/hook", b"{}", "t1", job_id="job_1")
    assert job_messages(box, "job_1") == {"msg_1"}
    msg, token = box.claim("msg_1", 1000)
    assert msg is not None and token and box.claim("msg_1", 1000)[1] is None
    assert box.finish_attempt("msg_1", {"attempt": 1}, box.delivered_fields(204, 2.0), token) == 1
    assert box.locks == {}
    done, none = box.claim("msg_1", 1000)
    assert done is not None and done.state == "delivered" and none is None and box.locks == {}


def test_config_for_signs_with_the_messages_tenants_secrets():
    box = InMemoryWebhookOutbox()
    box.put("msg_1", "https://hooks.example.com/x", BODY, "acme")
    client, sent = _guard_client()
    per_tenant = {"acme": wh.WebhookConfig(secrets=[SECRET_B, SECRET_A])}
    result = wh.deliver_once(box, "msg_1", wh.WebhookConfig(secrets=[SECRET_A]), client,
                             resolver=lambda h, p: ["93.184.216.34"], config_for=per_tenant.__getitem__)
    assert result.outcome == "delivered"
    assert len(sent[0].headers["webhook-signature"].split(" ")) == 2
    Webhook(SECRET_B).verify(sent[0].content, dict(sent[0].headers))


def test_an_outbox_rejects_message_ids_that_would_break_redis_keys():
    with pytest.raises(ValueError):
        InMemoryWebhookOutbox().put("msg:1", "https://example.com", b"{}", "t")


def _guard_client() -> tuple[httpx.Client, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    return httpx.Client(transport=httpx.MockTransport(handler)), sent


def test_a_message_whose_lock_is_held_is_retried_soon_without_sending():
    box = InMemoryWebhookOutbox()
    box.put("msg_1", "https://203.0.113.5/hook", b"{}", "t")
    cfg = wh.WebhookConfig(secrets=[SECRET_A], busy_retry_s=2.0)
    assert box.acquire_lock("msg_1", 10_000)
    client, sent = _guard_client()
    result = wh.deliver_once(box, "msg_1", cfg, client, resolver=lambda h, p: ["203.0.113.5"])
    assert result.outcome == "retry" and result.retry_in_s == 2.0 and result.attempt is None
    assert sent == [] and box.attempts("msg_1") == []


def test_deliver_once_with_a_mock_transport_delivers_with_the_right_headers():
    box = InMemoryWebhookOutbox()
    box.put("msg_1", "https://hooks.example.com/x", BODY, "t")
    client, sent = _guard_client()
    cfg = wh.WebhookConfig(secrets=[SECRET_A])
    result = wh.deliver_once(box, "msg_1", cfg, client, resolver=lambda h, p: ["93.184.216.34"])
    assert result.outcome == "delivered" and result.attempt == 1
    (req,) = sent
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"].startswith("editfarm-webhooks/")
    Webhook(SECRET_A).verify(req.content, dict(req.headers))
    assert box.get("msg_1").state == "delivered"  # type: ignore[union-attr]


def test_a_host_that_does_not_resolve_is_retried_not_refused():
    box = InMemoryWebhookOutbox()
    box.put("msg_1", "https://nowhere.invalid/x", BODY, "t")
    client, sent = _guard_client()

    def no_dns(host: str, port: int) -> list[str]:
        raise HostDoesNotResolve(f"host {host!r} does not resolve")

    cfg = wh.WebhookConfig(secrets=[SECRET_A], retry_schedule_s=(0, 0.01), jitter=0)
    result = wh.deliver_once(box, "msg_1", cfg, client, resolver=no_dns)
    assert result.outcome == "retry" and sent == []
    result = wh.deliver_once(box, "msg_1", cfg, client, resolver=no_dns)
    assert result.outcome == "failed" and box.get("msg_1").state == "failed"  # type: ignore[union-attr]


def test_delivering_a_missing_message_raises_lookup_error():
    client, _ = _guard_client()
    with pytest.raises(LookupError):
        wh.deliver_once(InMemoryWebhookOutbox(), "msg_gone", wh.WebhookConfig(secrets=[SECRET_A]), client)


def test_secrets_and_signatures_never_reach_the_log(caplog):
    box = InMemoryWebhookOutbox()
    box.put("msg_1", "https://hooks.example.com/x", BODY, "t")
    client, sent = _guard_client()
    with caplog.at_level("DEBUG"):
        wh.deliver_once(box, "msg_1", wh.WebhookConfig(secrets=[SECRET_A]), client,
                        resolver=lambda h, p: ["93.184.216.34"])
    sig = sent[0].headers["webhook-signature"].split(",")[1]
    assert SECRET_A not in caplog.text and SECRET_A[6:] not in caplog.text and sig[:12] not in caplog.text
