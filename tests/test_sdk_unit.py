"""The Python SDK (editfarm_client) offline: retries, request encoding, SSE parsing, webhook verification.

The network is an ``httpx.MockTransport`` (nothing leaves the process); webhook
signatures come from the reference ``standardwebhooks`` package.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from editfarm_client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    DoneEvent,
    IntegrityError,
    Job,
    JobFailed,
    NotFound,
    Output,
    PreviewEvent,
    ProgressEvent,
    RateLimited,
    ServerError,
    StatusEvent,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    WebhookVerificationError,
    sign_webhook,
    verify_webhook,
)
from editfarm_client._base import build_submit, parse_retry_after
from editfarm_client._sse import SSEParser
from PIL import Image
from standardwebhooks.webhooks import Webhook

from tests.e2e_support import png_bytes

BASE = "http://editfarm.test"
KEY = "key-acme-0123456789"
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def job_json(job_id: str = "job_1", status: str = "queued", **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id, "status": status, "queue_position": 0 if status == "queued" else None,
        "operation": "edit", "params": {"operation": "edit", "prompt": "p", "seed": 7, "steps": 2},
        "progress": {"step": 0, "total": 0}, "outputs": [], "error": None, "attempts": 0,
        "created_at": "2025-01-02T03:04:05.123456Z", "started_at": None, "finished_at": None,
        "urls": {"self": f"{BASE}/v1/jobs/{job_id}", "cancel": f"{BASE}/v1/jobs/{job_id}/cancel"}, **extra,
    }


def error_json(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **({"param": param} if param else {})}}


class Recorder:
    """A MockTransport handler answering from a list of responses, recording the requests."""

    def __init__(self, *responses: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        return answer(request) if callable(answer) else answer


def make_client(handler: Recorder, **kwargs: Any) -> tuple[Client, list[float]]:
    client = Client(BASE, KEY, transport=httpx.MockTransport(handler), **kwargs)
    sleeps: list[float] = []
    client._sleep = sleeps.append  # record the waits instead of sleeping
    return client, sleeps


# -- retries ---------------------------------------------------------------------------------------


def test_a_429_is_retried_after_the_retry_after_it_names_with_the_same_idempotency_key() -> None:
    handler = Recorder(
        httpx.Response(429, headers={"Retry-After": "2"}, json=error_json("rate_limited", "slow down")),
        httpx.Response(202, json=job_json()),
    )
    client, sleeps = make_client(handler)
    job = client.edit(png_bytes(), "make the sky purple", seed=7)
    assert job.id == "job_1" and job.status == "queued" and job.queue_position == 0
    assert sleeps == [2.0]
    assert len(handler.requests) == 2
    keys = {r.headers["idempotency-key"] for r in handler.requests}
    assert len(keys) == 1 and keys.pop()
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in handler.requests)


def test_retry_after_is_really_waited_for() -> None:
    handler = Recorder(httpx.Response(429, headers={"Retry-After": "1"}, json=error_json("rate_limited", "x")),
                       httpx.Response(200, json=job_json()))
    with Client(BASE, KEY, transport=httpx.MockTransport(handler)) as client:
        started = time.monotonic()
        client.get("job_1")
        assert time.monotonic() - started >= 0.95


def test_a_503_without_retry_after_backs_off_and_retries() -> None:
    handler = Recorder(httpx.Response(503, json=error_json("unavailable", "the job store is unavailable")),
                       httpx.Response(503, json=error_json("unavailable", "the job store is unavailable")),
                       httpx.Response(200, json=job_json()))
    client, sleeps = make_client(handler)
    assert client.get("job_1").id == "job_1"
    assert len(sleeps) == 2 and 0 < sleeps[0] <= 0.5 and sleeps[1] <= 1.0


def test_retries_are_bounded_and_then_the_typed_error_is_raised() -> None:
    handler = Recorder(httpx.Response(429, headers={"Retry-After": "1"}, json=error_json("rate_limited", "busy")))
    client, sleeps = make_client(handler, max_retries=2)
    with pytest.raises(RateLimited) as raised:
        client.get("job_1")
    assert len(handler.requests) == 3 and sleeps == [1.0, 1.0]
    assert raised.value.status_code == 429 and raised.value.code == "rate_limited"
    assert raised.value.retry_after == 1.0 and raised.value.message == "busy"


def test_a_retry_after_beyond_the_limit_is_raised_at_once() -> None:
    handler = Recorder(httpx.Response(503, headers={"Retry-After": "120"},
                                      json=error_json("unavailable", "down for maintenance")))
    client, sleeps = make_client(handler, max_retry_wait_s=30)
    with pytest.raises(Unavailable) as raised:
        client.get("job_1")
    assert sleeps == [] and len(handler.requests) == 1 and raised.value.retry_after == 120


def test_a_500_on_submit_is_not_retried() -> None:
    handler = Recorder(httpx.Response(500, json=error_json("internal_error", "boom")))
    client, sleeps = make_client(handler)
    with pytest.raises(ServerError) as raised:
        client.submit("edit", prompt="p", image=png_bytes())
    assert len(handler.requests) == 1 and sleeps == [] and raised.value.code == "internal_error"


def test_a_connection_that_was_never_made_is_retried_then_reported() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    handler = Recorder(refuse)
    client, sleeps = make_client(handler, max_retries=1)
    with pytest.raises(APIConnectionError):
        client.submit("edit", prompt="p", image=png_bytes())
    assert len(handler.requests) == 2 and len(sleeps) == 1


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("garbage") is None and parse_retry_after(None) is None
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    seconds = parse_retry_after(when.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert seconds is not None and 25 <= seconds <= 31


def test_the_async_client_retries_429_too() -> None:
    handler = Recorder(httpx.Response(429, headers={"Retry-After": "0"}, json=error_json("rate_limited", "x")),
                       httpx.Response(200, json=job_json(status="running")))

    async def main() -> Job:
        async with AsyncClient(BASE, KEY, transport=httpx.MockTransport(handler)) as client:
            return await client.get("job_1")

    assert asyncio.run(main()).status == "running"
    assert len(handler.requests) == 2


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequest), (401, Unauthorized), (404, NotFound), (409, Conflict), (413, BadRequest),
    (415, BadRequest), (422, BadRequest), (500, ServerError), (503, Unavailable),
])
def test_each_error_status_has_its_typed_error_with_the_api_code(status: int, cls: type[Exception]) -> None:
    handler = Recorder(httpx.Response(status, json=error_json("some_code", "it went wrong", param="image")))
    client, _ = make_client(handler, max_retries=0)
    with pytest.raises(cls) as raised:
        client.get("job_1")
    error = raised.value
    assert error.code == "some_code" and error.message == "it went wrong"  # type: ignore[attr-defined]
    assert error.param == "image" and error.status_code == status  # type: ignore[attr-defined]


def test_a_non_json_error_body_still_gives_a_typed_error() -> None:
    handler = Recorder(httpx.Response(502, text="<html>Bad Gateway</html>"))
    client, _ = make_client(handler, max_retries=0)
    with pytest.raises(ServerError) as raised:
        client.get("job_1")
    assert raised.value.code == "http_502" and "Bad Gateway" in raised.value.message


def test_a_client_needs_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDITFARM_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key"):
        Client(BASE)
    monkeypatch.setenv("EDITFARM_API_KEY", KEY)
    monkeypatch.setenv("EDITFARM_API_URL", BASE + "/")
    with Client() as client:
        assert client.base_url == BASE and KEY not in repr(client)


# -- request encoding ------------------------------------------------------------------------------


def test_local_images_go_as_multipart_file_parts(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes())
    spec = build_submit({"operation": "edit", "prompt": "hat", "image": path, "seed": 3, "steps": 2,
                         "webhook_events": ["started", "completed"]}, "auto", None)
    assert spec.json is None and spec.files is not None and spec.data is not None
    [(name, (filename, data, content_type))] = spec.files
    assert (name, filename, data, content_type) == ("image", "cat.png", path.read_bytes(), "image/png")
    assert spec.data == {"operation": "edit", "prompt": "hat", "seed": "3", "steps": "2",
                         "webhook_events": ["started", "completed"]}
    assert spec.headers["Idempotency-Key"]


def test_structured_fields_go_as_json_with_inlined_images() -> None:
    spec = build_submit({"operation": "inpaint", "prompt": "p", "image": png_bytes(), "mask": png_bytes(),
                         "boxes": [(0.1, 0.2, 0.5, 0.6)]}, "auto", "my-key")
    assert spec.files is None and spec.headers["Idempotency-Key"] == "my-key"
    assert spec.json["boxes"] == [[0.1, 0.2, 0.5, 0.6]]
    assert spec.json["image"].startswith("data:image/png;base64,")
    assert base64.b64decode(spec.json["mask"].split(",", 1)[1]) == png_bytes()


def test_forced_multipart_sends_structured_fields_as_json_text() -> None:
    spec = build_submit({"operation": "outpaint", "image": png_bytes(), "outpaint": {"left": 64, "right": 0},
                         "images": [png_bytes(), png_bytes((32, 32))]}, "multipart", None)
    assert spec.data is not None and spec.files is not None
    assert json.loads(spec.data["outpaint"]) == {"left": 64, "right": 0}
    assert [name for name, _ in spec.files] == ["image", "images", "images"]


def test_urls_are_sent_as_is_and_json_mode_inlines_everything() -> None:
    spec = build_submit({"operation": "edit", "prompt": "p", "image": "https://img.example/cat.png"}, "auto", None)
    assert spec.json == {"operation": "edit", "prompt": "p", "image": "https://img.example/cat.png"}
    spec = build_submit({"operation": "edit", "prompt": "p", "image": png_bytes()}, "json", None)
    assert spec.json["image"].startswith("data:image/png;base64,")


def test_pil_images_and_file_objects_are_uploaded() -> None:
    image = Image.new("RGB", (20, 10), (200, 10, 10))
    spec = build_submit({"operation": "edit", "prompt": "p", "image": image}, "auto", None)
    [(_, (filename, data, content_type))] = spec.files or []
    assert (filename, content_type) == ("image.png", "image/png")
    assert Image.open(io.BytesIO(data)).size == (20, 10)

    spec = build_submit({"operation": "edit", "prompt": "p", "image": io.BytesIO(png_bytes())}, "auto", None)
    assert (spec.files or [])[0][1][2] == "image/png"
    with pytest.raises(TypeError):
        build_submit({"operation": "edit", "prompt": "p", "image": 12}, "auto", None)
    with pytest.raises(FileNotFoundError):
        build_submit({"operation": "edit", "prompt": "p", "image": "/no/such/file.png"}, "auto", None)


def test_convenience_methods_send_their_operation_fields() -> None:
    handler = Recorder(lambda request: httpx.Response(202, json=job_json()))
    client, _ = make_client(handler)
    client.move(png_bytes(), (0.1, 0.1, 0.4, 0.4), dx=0.2, dy=-0.1, scale=1.5, steps=4)
    client.outpaint(png_bytes(), "more sky", top=128)
    client.generate("a red bicycle", width=512, height=512, seed=1)
    with pytest.raises(ValueError):
        client.inpaint(png_bytes(), "p")
    bodies = [json.loads(r.content) for r in handler.requests]
    assert bodies[0]["operation"] == "move" and bodies[0]["move"] == {"box": [0.1, 0.1, 0.4, 0.4], "dx": 0.2,
                                                                      "dy": -0.1, "scale": 1.5}
    assert bodies[1]["outpaint"] == {"left": 0, "right": 0, "top": 128, "bottom": 0}
    assert bodies[2] == {"operation": "generate", "prompt": "a red bicycle", "width": 512, "height": 512,
                         "seed": 1}


# -- SSE, wait, download ---------------------------------------------------------------------------


def test_the_sse_parser_handles_comments_multiline_data_and_crlf() -> None:
    parser = SSEParser()
    frames = [parser.feed(line) for line in
              ["retry: 3000", "id: 1", "event: status", 'data: {"a":', "data: 1}", "", ": ping", "",
               "event:progress\r", "data:{}", ""]]
    got = [f for f in frames if f is not None]
    assert [(f.event, f.data) for f in got] == [("status", '{"a":\n1}'), ("progress", "{}")]
    assert parser.retry_ms == 3000 and got[0].id == "1"


def sse_body(*frames: tuple[str, Any]) -> bytes:
    out = "retry: 10\n\n" + "".join(f"id: {i}\nevent: {name}\ndata: {json.dumps(data)}\n\n: ping\n\n"
                                    for i, (name, data) in enumerate(frames))
    return out.encode()


def test_stream_yields_typed_events_and_reconnects_after_a_drop() -> None:
    running = job_json(status="running")
    done = job_json(status="succeeded", progress={"step": 2, "total": 2})
    handler = Recorder(
        httpx.Response(200, content=sse_body(("status", running), ("progress", {"step": 1, "total": 2}))),
        httpx.Response(200, content=sse_body(("status", running),
                                             ("preview", {"step": 2, "key": "k", "url": "https://s3/p.webp"}),
                                             ("progress", {"step": 2, "total": 2}), ("mystery", {}),
                                             ("status", done), ("done", done))),
    )
    client, sleeps = make_client(handler)
    events = list(client.stream("job_1"))
    kinds = [type(e) for e in events]
    assert kinds == [StatusEvent, ProgressEvent, StatusEvent, PreviewEvent, ProgressEvent, StatusEvent, DoneEvent]
    assert events[1] == ProgressEvent(step=1, total=2) and events[1].fraction == 0.5
    assert isinstance(events[-1], DoneEvent) and events[-1].job.succeeded
    assert len(handler.requests) == 2 and sleeps == [0.01]  # the server's retry: 10 ms
    assert handler.requests[0].headers["accept"] == "text/event-stream"


def test_wait_gives_up_with_wait_timeout() -> None:
    handler = Recorder(httpx.Response(200, json=job_json(status="running")))
    client = Client(BASE, KEY, transport=httpx.MockTransport(handler))
    with pytest.raises(WaitTimeout) as raised:
        client.wait("job_1", timeout_s=0.3, poll_interval_s=0.05)
    assert raised.value.job is not None and raised.value.job.status == "running"
    assert isinstance(raised.value, TimeoutError)


def test_a_failed_job_raises_job_failed_on_demand() -> None:
    failed = Job.from_dict(job_json(status="failed", error={"code": "render_failed", "message": "out of ink"}))
    with pytest.raises(JobFailed) as raised:
        failed.raise_for_status()
    assert raised.value.code == "render_failed" and raised.value.job is failed


def test_download_checks_the_sha256_and_writes_named_files(tmp_path: Path) -> None:
    data = png_bytes()

    def serve(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers  # presigned URLs never get the API key
        return httpx.Response(200, content=data)

    client, _ = make_client(Recorder(serve))
    good = Output(url="https://s3.test/o.png", key="tenants/acme/jobs/job_9/outputs/0.png",
                  content_type="image/png", width=96, height=64, sha256=hashlib.sha256(data).hexdigest(),
                  size_bytes=len(data))
    [path] = client.download(good, tmp_path)
    assert path == tmp_path / "job_9_0.png" and path.read_bytes() == data
    bad = Output(**{**good.__dict__, "sha256": "0" * 64})
    with pytest.raises(IntegrityError):
        client.download(bad, tmp_path / "bad")
    assert not (tmp_path / "bad" / "job_9_0.png").exists()


# -- webhooks --------------------------------------------------------------------------------------


def reference_signed(body: str, *, at: dt.datetime | None = None, msg_id: str = "msg_1",
                     secret: str = SECRET) -> dict[str, str]:
    """Headers as the reference standardwebhooks signer makes them."""
    when = at or dt.datetime.now(dt.UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body)}


WEBHOOK_BODY = json.dumps({"type": "job.succeeded", "timestamp": "2025-01-02T03:04:05Z",
                           "data": job_json(status="succeeded")})


def test_verify_webhook_accepts_a_reference_signed_message() -> None:
    headers = reference_signed(WEBHOOK_BODY)
    message = verify_webhook(WEBHOOK_BODY.encode(), headers, SECRET)
    assert message.id == "msg_1" and message.type == "job.succeeded"
    assert message.job is not None and message.job.id == "job_1" and message.job.succeeded
    # header names in any case; the body as str; the same signature as our own signer makes
    upper = {k.upper(): v for k, v in headers.items()}
    assert verify_webhook(WEBHOOK_BODY, upper, SECRET).payload["type"] == "job.succeeded"
    assert headers["webhook-signature"] == sign_webhook(SECRET, "msg_1", int(headers["webhook-timestamp"]),
                                                        WEBHOOK_BODY)


def test_verify_webhook_rejects_tampering() -> None:
    headers = reference_signed(WEBHOOK_BODY)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(WEBHOOK_BODY.replace("succeeded", "failed").encode(), headers, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(WEBHOOK_BODY, {**headers, "webhook-id": "msg_2"}, SECRET)
    other = "whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()
    with pytest.raises(WebhookVerificationError):
        verify_webhook(WEBHOOK_BODY, headers, other)
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        with pytest.raises(WebhookVerificationError):
            verify_webhook(WEBHOOK_BODY, {k: v for k, v in headers.items() if k != missing}, SECRET)


def test_verify_webhook_rejects_old_and_future_messages() -> None:
    now = dt.datetime.now(dt.UTC)
    for skew in (-6 * 60, 6 * 60):
        headers = reference_signed(WEBHOOK_BODY, at=now + dt.timedelta(seconds=skew))
        with pytest.raises(WebhookVerificationError, match="too (old|new)"):
            verify_webhook(WEBHOOK_BODY, headers, SECRET)
    inside = reference_signed(WEBHOOK_BODY, at=now - dt.timedelta(seconds=4 * 60))
    assert verify_webhook(WEBHOOK_BODY, inside, SECRET).id == "msg_1"


def test_verify_webhook_accepts_any_of_several_signatures_and_secrets() -> None:
    headers = reference_signed(WEBHOOK_BODY)
    old = "whsec_" + base64.b64encode(b"the previous secret, now rotated").decode()
    wrong = sign_webhook(old, "msg_1", int(headers["webhook-timestamp"]), WEBHOOK_BODY)
    rotated = {**headers, "webhook-signature": f"v2,abc {wrong} {headers['webhook-signature']}"}
    assert verify_webhook(WEBHOOK_BODY, rotated, SECRET).id == "msg_1"
    assert verify_webhook(WEBHOOK_BODY, headers, [old, SECRET]).id == "msg_1"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(WEBHOOK_BODY, {**headers, "webhook-signature": wrong}, SECRET)


# -- models ----------------------------------------------------------------------------------------


MODELS = {"object": "list", "data": [
    {"name": "qwen-image", "pipeline": "QwenImagePipeline", "operations": ["generate", "inpaint"],
     "default_for": ["generate"], "defaults": {"steps": 12, "true_cfg_scale": 2.5}, "max_side_px": 512,
     "state": {"workers_ready": 2, "queued": 3, "running": 1, "median_render_s": 4.5}},
    {"name": "qwen-image-edit", "pipeline": "QwenImageEditPipeline", "operations": ["edit", "inpaint"],
     "default_for": ["edit", "inpaint"], "defaults": {"steps": None, "true_cfg_scale": None},
     "max_side_px": None, "state": {"workers_ready": 0, "queued": 0, "running": 0, "median_render_s": None},
     "added_later": True},
]}


def test_submit_sends_the_model_in_either_encoding_and_the_job_shows_it() -> None:
    accepted = job_json(model="qwen-image", params={"operation": "inpaint", "model": "qwen-image"})
    handler = Recorder(httpx.Response(202, json=accepted))
    client, _ = make_client(handler)
    job = client.inpaint(png_bytes(), "a hat", boxes=[(0, 0, 0.5, 0.5)], model="qwen-image")  # JSON
    assert job.model == "qwen-image"
    client.edit(png_bytes(), "a hat", model="qwen-image-edit")  # multipart
    client.edit(png_bytes(), "a hat")
    as_json, multipart, unnamed = handler.requests
    assert json.loads(as_json.content)["model"] == "qwen-image"
    assert b'name="model"\r\n\r\nqwen-image-edit\r\n' in multipart.content
    assert b'name="model"' not in unnamed.content  # none named: the server's default applies


def test_a_job_names_its_model_from_the_view_or_its_params_or_none() -> None:
    assert Job.from_dict(job_json(model="a")).model == "a"
    assert Job.from_dict(job_json(params={"operation": "edit", "model": "b"})).model == "b"
    assert Job.from_dict(job_json()).model is None  # a server from before the model catalog


@pytest.mark.parametrize("code", ["unknown_model", "unsupported_operation"])
def test_a_refused_model_is_a_bad_request_with_its_code(code: str) -> None:
    handler = Recorder(httpx.Response(422, json=error_json(code, "no such model: nope", param="model")))
    client, sleeps = make_client(handler)
    with pytest.raises(BadRequest) as raised:
        client.generate("a lighthouse", model="nope")
    assert raised.value.code == code and raised.value.param == "model" and raised.value.status_code == 422
    assert sleeps == []


def test_models_are_typed_with_their_live_state() -> None:
    handler = Recorder(httpx.Response(200, json=MODELS))
    client, _ = make_client(handler)
    t2i, edit = client.models()
    [request] = handler.requests
    assert request.method == "GET" and request.url.path == "/v1/models"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert (t2i.name, t2i.pipeline, t2i.operations, t2i.default_for) == (
        "qwen-image", "QwenImagePipeline", ["generate", "inpaint"], ["generate"])
    assert t2i.defaults == {"steps": 12, "true_cfg_scale": 2.5} and t2i.max_side_px == 512
    assert (t2i.state.workers_ready, t2i.state.queued, t2i.state.running, t2i.state.median_render_s) == (2, 3, 1, 4.5)
    assert edit.state.workers_ready == 0 and edit.state.median_render_s is None and edit.max_side_px is None
    assert edit.serves("edit") and not edit.serves("generate") and edit.raw["added_later"] is True


def test_models_of_the_async_client_and_a_body_that_is_not_a_list() -> None:
    handler = Recorder(httpx.Response(200, json=MODELS), httpx.Response(200, json={"object": "list"}))

    async def main() -> list[str]:
        async with AsyncClient(BASE, KEY, transport=httpx.MockTransport(handler)) as client:
            names = [m.name for m in await client.models()]
            with pytest.raises(APIError) as raised:
                await client.models()
            assert raised.value.code == "invalid_response"
            return names

    assert asyncio.run(main()) == ["qwen-image", "qwen-image-edit"]
