"""No message a tenant can read carries internals (issue 16.5).

``assert_for_tenant`` (the reusable checker, over ``broker.tenanttext.find_leaks``) is applied to
what each failure leaves where a tenant reads it: the job's ``error``, its status events, the
delivery log, API error bodies. The raw text goes to the worker's log, with the job id.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from api.delivery_log import InMemoryDeliveryLog, RedisDeliveryLog
from api.errors import ApiError
from api.fetch import fetch_image_bytes
from api.settings import ApiSettings
from broker.schema import JobStatus
from broker.tenanttext import find_leaks
from editfarm_testing.webhooks import Reply, WebhookReceiver
from storage import StorageUnavailable
from tests.test_runner import Harness
from workers import webhooks as wh
from workers.pipeline.base import InvalidRequest
from workers.runner import RetryLater

SSL_TEXT = "ConnectError: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)"


def assert_for_tenant(*texts: Any) -> None:
    """Every text (strings, or JSON-able structures: each string inside) carries no filesystem
    path, Python exception class name or traceback."""
    for text in texts:
        flat = text if isinstance(text, str) else json.dumps(text)
        leaks = find_leaks(flat)
        assert not leaks, f"{leaks} in {flat!r}"


# -- the checker itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "LoRA file '/tmp/editfarm/loras/files/ab12.safetensors' cannot be read: No such file or directory",
    "OSError: [Errno 28] No space left on device",
    "could not fetch the LoRA URL (ConnectError)",
    SSL_TEXT,
    "timeout: ReadTimeout",
    "render failed: KeyError: 'transformer'",
    'Traceback (most recent call last):\n  File "/app/workers/runner.py", line 3, in run',
    "error in runner.py",
    "C:\\Users\\worker\\cache",
    "see ~/editfarm/loras",
    "<class 'safetensors.SafetensorError'>",
    "object at 0x7f3a2b1c",
    "StopIteration raised",
    "HTTPStatusError on the way",
])
def test_the_checker_finds_internals(text: str) -> None:
    assert find_leaks(text)


@pytest.mark.parametrize("text", [
    "the mask selects no pixel to repaint",
    "LoRA 's3://editfarm/loras/none.safetensors': no such object",
    "could not fetch the LoRA URL (tls_failed: the TLS handshake failed)",
    "image URL answered HTTP 404",
    "host 'hooks.example.com' resolves to a non-public address",
    "https://hooks.example.com/a/b/c answered",
    "see POST /v1/jobs/{id}/deliveries/redeliver",
    "the outpainted canvas (5000, 10) exceeds 4096 px per side",
    "an input of the job could not be read",
    "PNG, JPEG or WebP; a LoRA; 16-bit grey",
])
def test_the_checker_lets_tenant_sentences_through(text: str) -> None:
    assert find_leaks(text) == []


# -- job failures on the worker -------------------------------------------------------------------


def _failed(h: Harness, job_id: str) -> dict[str, Any]:
    job = h.job(job_id)
    assert job.status is JobStatus.FAILED and job.error is not None
    return job.error.model_dump()


def _tenant_views(h: Harness, job_id: str) -> list[Any]:
    """What the tenant reads of the job: its record's error and its status events."""
    return [h.job(job_id).error.model_dump() if h.job(job_id).error else None,  # type: ignore[union-attr]
            [e["data"] for e in h.events.events if e["job_id"] == job_id]]


def test_a_render_error_with_a_path_reaches_the_log_with_the_job_id_not_the_tenant(
        caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.renderer.error = OSError(2, "No such file or directory", "/tmp/editfarm/loras/files/ab12.safetensors")
    job = h.submit()
    with caplog.at_level(logging.INFO):
        h.runner.run(job.id)
    error = _failed(h, job.id)
    assert error["code"] == "render_failed" and error["message"]
    assert_for_tenant(*_tenant_views(h, job.id))
    assert any(job.id in r.getMessage() or job.id in str(r.args) for r in caplog.records)
    assert "/tmp/editfarm/loras/files/ab12.safetensors" in caplog.text


def test_an_invalid_lora_error_chained_from_an_oserror_shows_only_its_own_sentence(
        caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    try:
        raise OSError(2, "No such file or directory", "/var/cache/editfarm/x.safetensors")
    except OSError as cause:
        err = InvalidRequest("a LoRA file cannot be read")
        err.__cause__ = cause
    h.renderer.error = err
    job = h.submit()
    with caplog.at_level(logging.INFO):
        h.runner.run(job.id)
    assert _failed(h, job.id) == {"code": "invalid_input", "message": "a LoRA file cannot be read"}
    assert_for_tenant(*_tenant_views(h, job.id))
    assert f"job {job.id}" in caplog.text and "/var/cache/editfarm/x.safetensors" in caplog.text


def test_an_invalid_request_whose_text_leaks_is_replaced_by_the_codes_message() -> None:
    h = Harness()
    h.renderer.error = InvalidRequest("LoRA file '/tmp/x/y.safetensors' does not fit: KeyError: 'a'")
    job = h.submit()
    h.runner.run(job.id)
    assert _failed(h, job.id)["code"] == "invalid_input"
    assert_for_tenant(*_tenant_views(h, job.id))


@pytest.mark.parametrize(("stored", "message"), [
    (b"not an image", "the image could not be decoded as an image"),
    (None, "the image is not stored (any more)"),
])
def test_an_unreadable_or_missing_input_is_named_as_the_tenant_knows_it(stored: bytes | None, message: str) -> None:
    h = Harness()
    job = h.submit()
    if stored is None:
        h.objects.delete("in/0.png")
    else:
        h.objects.put("in/0.png", stored, "image/png")
    h.runner.run(job.id)
    assert _failed(h, job.id) == {"code": "input_unreadable", "message": message}
    assert_for_tenant(*_tenant_views(h, job.id))


def test_an_upload_failure_shows_a_generic_message(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    job = h.submit()

    def broken_put(*args: object, **kwargs: object) -> None:
        raise ValueError("cannot write /srv/editfarm/tmp/out.png: PermissionError")

    monkeypatch.setattr(h.objects, "put", broken_put)
    h.runner.run(job.id)
    assert _failed(h, job.id)["code"] == "upload_failed"
    assert_for_tenant(*_tenant_views(h, job.id))


def test_a_storage_outage_hands_back_with_a_reason_written_for_the_tenant(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    job = h.submit()

    def s3_down(*args: object, **kwargs: object) -> None:  # what storage.store raises for S3
        raise StorageUnavailable("put 'acme/job_x/outputs/0.png' failed: EndpointConnectionError")

    monkeypatch.setattr(h.objects, "put", s3_down)
    with caplog.at_level(logging.INFO), pytest.raises(RetryLater):  # the job is delivered again
        h.runner.run(job.id)
    queued = [e["data"] for e in h.events.events if e["data"].get("status") == "queued"]
    assert queued and all(e["reason"] for e in queued)
    assert_for_tenant(*_tenant_views(h, job.id))
    assert f"job {job.id} handed back: put" in caplog.text  # the raw text is in the log


# -- webhook deliveries: the delivery log ----------------------------------------------------------


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """A loopback port that answers plain HTTP (where a webhook URL says https)."""
    with WebhookReceiver(reply=lambda delivery: Reply(200)) as receiver:
        yield receiver.port


@pytest.fixture
def refused_port() -> Iterator[int]:
    with socket.socket() as sock:  # bound, not listening: a connection is refused
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _config() -> wh.WebhookConfig:
    return wh.WebhookConfig(secrets=["whsec_" + "QUJDREVGR0hJSktMTU5PUA=="], timeout_s=2.0, jitter=0.0,
                            retry_schedule_s=(0, 60), allow_private=True, allow_http=False)


@pytest.mark.integration
@pytest.mark.parametrize(("scheme_port", "code"), [("plain", "tls_failed"), ("refused", "connection_refused")])
def test_a_failed_delivery_shows_a_code_and_a_sentence_in_the_delivery_log(
        scheme_port: str, code: str, plain_http_port: int, refused_port: int, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    port = plain_http_port if scheme_port == "plain" else refused_port
    outbox = wh.WebhookOutbox(redis_client, ttl_s=600)
    job_id = f"job_leak{scheme_port}{int(time.time() * 1000)}"
    mid = wh.message_id_for(job_id, "job.failed")
    outbox.put(mid, f"https://127.0.0.1:{port}/hook", b"{}", "acme", job_id=job_id)
    with wh.make_client(_config()) as client, caplog.at_level(logging.INFO):
        result = wh.deliver_once(outbox, mid, _config(), client)

    assert result.outcome == "retry" and (result.error or "").startswith(f"{code}: ")
    [delivery] = RedisDeliveryLog(redis_client).for_job(job_id, "acme")
    view = delivery.view()
    assert view["attempts"][0]["error"] == result.error
    assert_for_tenant(view)
    assert mid in caplog.text  # the raw exception is in the worker's log, under the message (and job) id


def test_a_delivery_record_written_before_the_fix_is_shown_without_its_raw_text() -> None:
    log = InMemoryDeliveryLog()
    log.add("job_old", "msg_job_old_job_failed", "https://hooks.example.com/x", b"{}", "acme")
    for n, error in enumerate([SSL_TEXT, "timeout: ReadTimeout", "http 500", "url_not_allowed: host 'h' does "
                               "not resolve", "Errno: [Errno 111] Connection refused"], start=1):
        log.add_attempt("msg_job_old_job_failed", {"attempt": n, "at": 1.0, "status_code": None, "error": error})
    [delivery] = log.for_job("job_old", "acme")
    errors = [a["error"] for a in delivery.view()["attempts"]]
    assert errors[0] == "request_failed: the request failed"
    assert errors[1] == "timeout: no answer came in time"
    assert errors[2] == "http 500" and errors[3].startswith("url_not_allowed: host 'h'")
    assert_for_tenant(delivery.view())


# -- the API ---------------------------------------------------------------------------------------


def test_an_image_url_that_speaks_plain_http_where_https_is_expected_fails_with_a_sentence(
        plain_http_port: int, refused_port: int) -> None:
    import anyio

    settings = ApiSettings(allow_private_urls=True, url_fetch_timeout_s=5)
    for port, code in ((plain_http_port, "tls_failed"), (refused_port, "connection_refused")):
        with pytest.raises(ApiError) as failed:
            anyio.run(fetch_image_bytes, f"https://127.0.0.1:{port}/in.png", settings)
        assert failed.value.code == "image_fetch_failed" and code in failed.value.message
        assert_for_tenant(failed.value.body())


def test_an_api_error_body_never_carries_internals(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        body = ApiError(422, "invalid_parameter", "bad value: KeyError at /usr/lib/python3/x.py", param="x").body()
    assert body["error"]["code"] == "invalid_parameter" and body["error"]["param"] == "x"
    assert_for_tenant(body)
    assert "KeyError" in caplog.text


def test_an_http_error_of_a_real_connection_is_classified(refused_port: int) -> None:
    from broker.netfailure import describe_network_failure

    with pytest.raises(httpx.HTTPError) as caught:
        httpx.get(f"http://127.0.0.1:{refused_port}/", timeout=2)
    code, sentence = describe_network_failure(caught.value)
    assert code == "connection_refused"
    assert_for_tenant(sentence)
