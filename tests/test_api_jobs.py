"""The job routes, end to end in process: TestClient over in-memory stores and a recording queue."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.deps import Services
from api.models import JobOut
from broker.celery_app import render_job_id
from broker.jobstore import InMemoryJobStore, RedisJobStore
from broker.schema import MAX_SEED, JobStatus, Output
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings, queued
from storage.store import InMemoryObjectStore

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
GLOBEX = {"Authorization": f"Bearer {TEST_KEYS['globex']}"}


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def make_client(services: Services | None = None, **overrides: Any) -> tuple[TestClient, Services]:
    services = services or fake_services(make_settings(**overrides))
    return TestClient(create_app(services=services)), services




def objects_of(services: Services) -> InMemoryObjectStore:
    assert isinstance(services.objects, InMemoryObjectStore)
    return services.objects


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return dict(body["error"])


def assert_nothing_accepted(services: Services) -> None:
    assert queued(services) == []
    assert objects_of(services).objects == {}
    assert services.store.tenant_job_ids("acme") == []


@pytest.fixture
def client_services() -> tuple[TestClient, Services]:
    return make_client()


def submit(client: TestClient, **fields: Any) -> Any:
    body = {"prompt": "make it blue", "image": data_url(image_bytes()), **fields}
    return client.post("/v1/jobs", json=body, headers=ACME)


def test_json_submit_stores_the_input_records_the_job_and_queues_it_once(client_services: Any) -> None:
    client, services = client_services
    png = image_bytes()
    response = client.post("/v1/jobs", headers=ACME, json={
        "prompt": "make it blue", "image": data_url(png), "steps": 12, "output_format": "webp"})
    assert response.status_code == 202, response.text
    view = response.json()
    job_id = view["id"]
    assert view["status"] == "queued" and view["operation"] == "edit"
    assert view["params"]["steps"] == 12 and view["params"]["output_format"] == "webp"
    assert 0 <= view["params"]["seed"] <= MAX_SEED  # picked and recorded
    assert response.headers["location"] == view["urls"]["self"] == f"http://testserver/v1/jobs/{job_id}"
    job = services.store.get(job_id)
    assert job is not None and job.tenant == "acme" and job.status is JobStatus.QUEUED
    assert job.params.seed == view["params"]["seed"]
    assert job.input_keys == [f"tenants/acme/jobs/{job_id}/inputs/0.png"]
    assert objects_of(services).objects[job.input_keys[0]] == (png, "image/png")
    assert queued(services) == [(job_id, "normal")]
    assert view["queue_position"] == 0
    JobOut.model_validate(view)  # the documented response model matches what is returned


def test_a_given_seed_is_kept_and_public_base_url_prefixes_the_links() -> None:
    client, _ = make_client(public_base_url="https://api.example.com/")
    response = submit(client, seed=42)
    assert response.status_code == 202
    view = response.json()
    assert view["params"]["seed"] == 42
    assert response.headers["location"] == f"https://api.example.com/v1/jobs/{view['id']}"
    assert view["urls"]["cancel"] == f"https://api.example.com/v1/jobs/{view['id']}/cancel"


def test_multipart_submit_with_a_file_part_coerces_numeric_form_fields(client_services: Any) -> None:
    client, services = client_services
    jpeg = image_bytes("JPEG")
    response = client.post(
        "/v1/jobs", headers=ACME, files={"image": ("in.jpg", jpeg, "image/jpeg")},
        data={"prompt": "add a hat", "steps": "12", "true_cfg_scale": "3.5", "seed": "7"},
    )
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert (params["steps"], params["true_cfg_scale"], params["seed"]) == (12, 3.5, 7)
    job = services.store.get(response.json()["id"])
    assert job is not None and job.input_keys[0].endswith("/inputs/0.jpg")
    assert objects_of(services).objects[job.input_keys[0]] == (jpeg, "image/jpeg")
    assert len(queued(services)) == 1


def test_multipart_empty_seed_means_a_random_seed_and_bad_numbers_are_invalid(client_services: Any) -> None:
    client, _ = client_services
    files = {"image": ("in.png", image_bytes(), "image/png")}
    ok = client.post("/v1/jobs", headers=ACME, files=files, data={"prompt": "p", "seed": ""})
    assert ok.status_code == 202 and isinstance(ok.json()["params"]["seed"], int)
    bad = client.post("/v1/jobs", headers=ACME, files=files, data={"prompt": "p", "steps": "many"})
    assert_error(bad, 422, "invalid_parameter", "steps")


def test_multipart_image_may_also_be_a_data_url_text_field(client_services: Any) -> None:
    client, _ = client_services
    # httpx sends multipart only when files are given; an empty extra file part forces it
    response = client.post("/v1/jobs", headers=ACME, data={"prompt": "p", "image": data_url(image_bytes())},
                           files={"attachment": ("a.bin", b"", "application/octet-stream")})
    assert_error(response, 422, "invalid_parameter", "attachment")  # only `image` may be a file
    body, content_type = multipart_body({"prompt": "p", "image": data_url(image_bytes())})
    response = client.post("/v1/jobs", headers={**ACME, "Content-Type": content_type}, content=body)
    assert response.status_code == 202, response.text


def multipart_body(fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "editfarm-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             for k, v in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "steps", "webhook_events"])
def test_a_multipart_text_field_that_is_not_utf8_is_refused_naming_it(client_services: Any, field: str) -> None:
    client, services = client_services
    boundary = "editfarm-test-boundary"
    fields = {"operation": b"generate", "prompt": "caf\u00e9".encode(), field: "caf\u00e9".encode("latin-1")}
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields.items()]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    # with or without a charset parameter: form text is UTF-8, never read as Latin-1
    for content_type in (f"multipart/form-data; boundary={boundary}",
                         f"multipart/form-data; charset=latin-1; boundary={boundary}"):
        response = client.post("/v1/jobs", headers={**ACME, "Content-Type": content_type}, content=body)
        error = assert_error(response, 422, "invalid_request", field)
        assert field in error["message"] and "UTF-8" in error["message"]
    assert queued(services) == []
    fields[field] = "caf\u00e9".encode() if field != "steps" else b"4"
    if field == "webhook_events":
        fields[field] = b"completed"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
                    for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
    ok = client.post("/v1/jobs", headers={**ACME, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                     content=body)
    assert ok.status_code == 202, ok.text
    assert services.store.get(ok.json()["id"]).params.prompt == "caf\u00e9"  # type: ignore[union-attr]


def test_get_returns_status_progress_and_presigned_outputs(client_services: Any) -> None:
    client, services = client_services
    job_id = submit(client).json()["id"]
    out = Output(key=f"tenants/acme/jobs/{job_id}/outputs/0.png", content_type="image/png",
                 width=32, height=24, sha256="0" * 64, size_bytes=123)
    assert services.store.transition(job_id, JobStatus.RUNNING, {"progress": {"step": 30, "total": 30}})
    assert services.store.transition(job_id, JobStatus.SUCCEEDED, {"outputs": [out.model_dump()]})
    response = client.get(f"/v1/jobs/{job_id}", headers=ACME)
    assert response.status_code == 200
    view = response.json()
    assert view["status"] == "succeeded" and view["progress"] == {"step": 30, "total": 30}
    assert view["outputs"][0]["key"] == out.key
    assert view["outputs"][0]["url"].startswith("memory://objects/")
    assert view["outputs"][0]["url"].endswith("expires_s=86400")
    assert response.headers["cache-control"] == "no-store"
    JobOut.model_validate(view)


def test_another_tenants_job_answers_exactly_like_an_unknown_id(client_services: Any) -> None:
    client, _ = client_services
    job_id = submit(client).json()["id"]
    theirs = client.get(f"/v1/jobs/{job_id}", headers=GLOBEX)
    unknown = client.get("/v1/jobs/job_000000000000000000000000", headers=GLOBEX)
    assert_error(theirs, 404, "not_found")
    assert theirs.status_code == unknown.status_code and theirs.content == unknown.content


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"image": "x"}, "missing_field", "prompt"),
    ({"prompt": "p", "operation": "teleport"}, "unknown_operation", "operation"),
    ({"prompt": "p", "steps": 0}, "invalid_parameter", "steps"),
    ({"prompt": "p", "steps": 101}, "invalid_parameter", "steps"),
    ({"prompt": "p", "true_cfg_scale": "high"}, "invalid_parameter", "true_cfg_scale"),
    ({"prompt": "p", "output_format": "gif"}, "invalid_parameter", "output_format"),
    ({"prompt": "p", "seed": -1}, "invalid_parameter", "seed"),
    ({"prompt": ""}, "invalid_parameter", "prompt"),
    ({"prompt": "p", "colour": "blue"}, "invalid_parameter", "colour"),
    ({"prompt": "p", "image": None}, "missing_image", "image"),
    ({"prompt": "p", "image": 5}, "invalid_parameter", "image"),
    ({"prompt": "p", "image": "not a url"}, "invalid_parameter", "image"),
])
def test_invalid_fields_get_specific_422_codes_and_nothing_is_accepted(
    client_services: Any, body: dict[str, Any], code: str, param: str,
) -> None:
    client, services = client_services
    full = {"image": data_url(image_bytes()), **body}
    if full["image"] is None:
        del full["image"]
    assert_error(client.post("/v1/jobs", json=full, headers=ACME), 422, code, param)
    assert_nothing_accepted(services)


@pytest.mark.parametrize("raw", [b'{"prompt": "p",', b"\xff\xfe\x00", b'{"prompt": "p", "true_cfg_scale": NaN}'])
def test_malformed_json_is_400_invalid_json(client_services: Any, raw: bytes) -> None:
    client, services = client_services
    response = client.post("/v1/jobs", content=raw, headers={**ACME, "Content-Type": "application/json"})
    assert_error(response, 400, "invalid_json")
    assert_nothing_accepted(services)


def test_a_json_body_that_is_not_an_object_is_invalid_request(client_services: Any) -> None:
    client, _ = client_services
    assert_error(client.post("/v1/jobs", json=[1, 2], headers=ACME), 422, "invalid_request")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_other_content_types_are_415(client_services: Any, content_type: str | None) -> None:
    client, _ = client_services
    headers = {**ACME, **({"Content-Type": content_type} if content_type else {})}
    assert_error(client.post("/v1/jobs", content=b"prompt=p", headers=headers), 415, "unsupported_media_type")


def test_a_body_over_max_body_bytes_is_413_by_header_and_by_bytes_read() -> None:
    client, services = make_client(max_body_bytes=2000)
    big = {"prompt": "p" * 3000, "image": data_url(image_bytes())}
    assert_error(client.post("/v1/jobs", json=big, headers=ACME), 413, "payload_too_large")
    raw = json.dumps(big).encode()
    chunked = client.post("/v1/jobs", content=iter([raw[:1000], raw[1000:]]),
                          headers={**ACME, "Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers  # sent chunked: only the counted cap applies
    assert_error(chunked, 413, "payload_too_large")
    assert_nothing_accepted(services)


def test_a_private_http_webhook_is_refused_under_the_default_policy(client_services: Any) -> None:
    client, services = client_services
    assert_error(submit(client, webhook="http://127.0.0.1/"), 422, "url_not_allowed", "webhook")
    assert_error(submit(client, webhook="https://169.254.169.254/"), 422, "url_not_allowed", "webhook")
    assert_error(submit(client, webhook="https://example.com:99999/"), 422, "url_not_allowed", "webhook")
    assert_nothing_accepted(services)


def test_a_loopback_webhook_is_accepted_when_the_deployment_allows_it() -> None:
    client, _ = make_client(allow_http_urls=True, allow_private_urls=True)
    response = submit(client, webhook="http://127.0.0.1:9/hook")
    assert response.status_code == 202
    assert response.json()["params"]["webhook"] == "http://127.0.0.1:9/hook"


def test_object_store_down_is_503_and_no_job_is_created(client_services: Any) -> None:
    client, services = client_services
    objects_of(services).down = True
    assert_error(submit(client), 503, "unavailable")
    assert services.store.tenant_job_ids("acme") == [] and queued(services) == []


class BrokenJobStore(InMemoryJobStore):
    def create(self, job: Any) -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting to redis:6379")

    def get(self, job_id: str) -> Any:
        raise redis.exceptions.TimeoutError("Timeout reading from socket")


def test_job_store_down_is_503_on_submit_and_read() -> None:
    services = fake_services()
    services.store = BrokenJobStore()
    client, _ = make_client(services)
    assert_error(submit(client), 503, "unavailable")
    assert_error(client.get("/v1/jobs/job_x", headers=ACME), 503, "unavailable")
    assert queued(services) == []


def test_on_redis_the_job_and_its_render_message_are_written_together(redis_client: redis.Redis) -> None:
    services = fake_services()
    services.store = RedisJobStore(redis_client)
    client, _ = make_client(services)
    high = submit(client, priority="high")
    assert high.status_code == 202 and high.json()["queue_position"] == 0
    normal = submit(client)
    assert normal.json()["queue_position"] == 1  # behind the high-priority job
    assert [render_job_id(m) for m in redis_client.lrange("render.high", 0, -1)] == [high.json()["id"]]
    assert [render_job_id(m) for m in redis_client.lrange("render.normal", 0, -1)] == [normal.json()["id"]]


def test_a_job_store_failure_on_submit_leaves_neither_a_job_nor_a_message() -> None:
    services = fake_services()
    services.store = store = BrokenJobStore()
    client, _ = make_client(services)
    assert_error(submit(client), 503, "unavailable")
    assert store.pushed == [] and store.tenant_job_ids("acme") == []


def test_an_unexpected_exception_is_a_json_500_internal_error(
    client_services: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    client, services = client_services

    def explode(job_id: str, tenant: str) -> None:
        raise RuntimeError("boom")

    services.store.get_for_tenant = explode  # type: ignore[method-assign]
    response = client.get("/v1/jobs/job_x", headers=ACME)
    assert_error(response, 500, "internal_error")
    assert "boom" not in response.text
    assert TEST_KEYS["acme"] not in caplog.text


def test_unknown_routes_and_methods_use_the_error_shape(client_services: Any) -> None:
    client, _ = client_services
    assert_error(client.get("/v2/nothing", headers=ACME), 404, "not_found")
    response = client.delete("/v1/jobs", headers=ACME)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"  # every route at the path, not just the first


def test_health_is_always_ok_and_readiness_reports_the_failing_dependency(client_services: Any) -> None:
    client, services = client_services
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"

    class DeadRedis:
        def ping(self) -> bool:
            raise redis.exceptions.ConnectionError("Error 111 connecting to secret-host:6379")

    services.redis = DeadRedis()  # type: ignore[assignment]
    objects_of(services).down = True
    response = client.get("/readyz")
    assert_error(response, 503, "unavailable")
    assert response.json()["checks"] == {"redis": "unavailable", "objects": "unavailable"}
    assert "secret-host" not in response.text
    assert client.get("/healthz").status_code == 200


def test_openapi_documents_both_body_types_and_bearer_auth(client_services: Any) -> None:
    client, _ = client_services
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/jobs"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    schemas = spec["components"]["schemas"]
    for ref in (c["schema"]["$ref"] for c in content.values()):
        name = ref.rsplit("/", 1)[1]
        assert {"prompt", "image", "steps", "seed"} <= set(schemas[name]["properties"])
        assert "prompt" not in schemas[name].get("required", [])  # generate/outpaint/... take none
    assert schemas["JobMultipartRequest"]["properties"]["image"]["format"] == "binary"
    assert "/v1/jobs/{job_id}" in spec["paths"]
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())
    assert client.get("/docs").status_code == 200


def test_the_submit_route_reads_the_key_and_the_idempotency_key_as_declared() -> None:
    client, services = make_client()
    assert client.post("/v1/jobs", json={"prompt": "p", "operation": "generate"}).status_code == 401
    basic = client.post("/v1/jobs", json={"prompt": "p", "operation": "generate"},
                        headers={"Authorization": f"Basic {TEST_KEYS['acme']}"})
    assert basic.status_code == 401
    bad_key = client.post("/v1/jobs", json={"prompt": "p", "operation": "generate"},
                          headers={**ACME, "Idempotency-Key": ""})
    assert bad_key.status_code == 422 and bad_key.json()["error"]["param"] == "Idempotency-Key"
    first = client.post("/v1/jobs", json={"prompt": "p", "operation": "generate"},
                        headers={**ACME, "idempotency-key": "k1"})
    again = client.post("/v1/jobs", json={"prompt": "p", "operation": "generate"},
                        headers={**ACME, "Idempotency-Key": "k1"})
    assert first.status_code == 202 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert len(queued(services)) == 1
