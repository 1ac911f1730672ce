"""API-key authentication and the API's settings."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api import auth
from api.app import create_app
from api.auth import parse_api_keys
from api.settings import ApiSettings
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(services=fake_services()))


def assert_unauthorized(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.json()["error"]["message"]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer not-a-key"},
    {"Authorization": f"Bearer {TEST_KEYS['acme']}x"},
    {"Authorization": f"Basic {TEST_KEYS['acme']}"},
    {"Authorization": TEST_KEYS["acme"]},
])
def test_a_missing_or_wrong_key_is_401_with_a_bearer_challenge(client: TestClient, headers: dict[str, str]) -> None:
    assert_unauthorized(client.get("/v1/jobs/job_x", headers=headers))
    assert_unauthorized(client.post("/v1/jobs", json={"prompt": "p"}, headers=headers))


def test_authentication_comes_before_body_parsing(client: TestClient) -> None:
    assert_unauthorized(client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "text/plain"}))


def test_each_key_authenticates_as_its_own_tenant() -> None:
    settings = make_settings(api_keys=SecretStr("acme:k1, acme:k2 ,globex:k3"))
    services = fake_services(settings)
    client = TestClient(create_app(services=services))
    ids = {}
    for key in ("k1", "k2", "k3"):
        response = client.get("/v1/jobs/job_unknown", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 404  # authenticated; the job just does not exist
        ids[key] = response.json()
    response = client.post("/v1/jobs", headers={"Authorization": "bearer k3"},  # scheme is case-insensitive
                           json={"prompt": "p", "image": "data:image/png;base64,AAAA"})
    assert response.status_code == 422  # got past auth
    assert parse_api_keys("acme:k1,acme:k2,globex:k3").tenant_for("k2") == "acme"
    assert parse_api_keys("acme:k1,acme:k2,globex:k3").tenant_for("k3") == "globex"


def test_keys_are_compared_in_constant_time_against_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = parse_api_keys("a:first-key,b:second-key,c:third-key")
    assert keys.tenant_for("first-key") == "a"
    assert len(calls) == 3  # no early exit on a match
    assert all(len(x) == len(y) == 32 for x, y in calls)  # digests: equal lengths, key length not leaked


@pytest.mark.parametrize("raw", ["acme", "acme:", ":SECRETKEY", "ac me:SECRETKEY", "acme/../x:SECRETKEY",
                                 "a:SECRETKEY,b:SECRETKEY"])
def test_malformed_api_keys_fail_at_startup_without_printing_the_key(raw: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_api_keys(raw)
    assert "SECRETKEY" not in str(error.value)
    with pytest.raises(ValueError) as at_startup:
        create_app(services=fake_services(make_settings(api_keys=SecretStr(raw))))
    assert "SECRETKEY" not in str(at_startup.value)


def test_no_keys_configured_means_every_request_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="editfarm.api"):
        client = TestClient(create_app(services=fake_services(make_settings(api_keys=SecretStr("")))))
    assert "EDITFARM_API_KEYS is empty" in caplog.text
    assert_unauthorized(client.get("/v1/jobs/job_x", headers={"Authorization": "Bearer "}))
    assert_unauthorized(client.get("/v1/jobs/job_x", headers={"Authorization": "Bearer anything"}))


def test_keys_never_appear_in_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        client.get("/v1/jobs/job_x", headers={"Authorization": "Bearer wrong-key-abcdef"})
        client.post("/v1/jobs", headers={"Authorization": f"Bearer {TEST_KEYS['acme']}"},
                    json={"prompt": "p", "image": "data:image/png;base64,AAAA"})
    assert "wrong-key-abcdef" not in caplog.text
    assert TEST_KEYS["acme"] not in caplog.text


def test_settings_come_from_editfarm_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITFARM_API_KEYS", "acme:env-key")
    monkeypatch.setenv("EDITFARM_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("EDITFARM_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("EDITFARM_S3_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("EDITFARM_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = ApiSettings()
    assert settings.api_keys.get_secret_value() == "acme:env-key"
    assert "env-key" not in repr(settings) and "s3-secret" not in repr(settings)
    assert settings.allow_http_urls and not settings.allow_private_urls
    assert settings.max_image_pixels == 1000 and settings.max_body_bytes == 40 * 1024 * 1024
    s3 = settings.s3_config()
    assert s3.secret_access_key == "s3-secret" and s3.endpoint_url == "http://127.0.0.1:9000"
    assert s3.bucket == "editfarm"


def test_create_app_builds_real_services_from_settings_without_connecting() -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0", s3_endpoint_url="http://127.0.0.1:1")
    app = create_app(settings)
    services = app.state.services
    assert services.redis is not None and services.settings is settings
    client = TestClient(app)
    assert client.get("/healthz").status_code == 200  # liveness touches no dependency


def test_a_key_created_in_the_tenant_store_authenticates_until_revoked() -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from editfarm_testing.api import fake_services, make_settings

    services = fake_services(make_settings())
    info, key = services.tenants.create_key("initech")
    with TestClient(create_app(services=services)) as client:
        listed = client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert listed.status_code == 200
        services.tenants.revoke(info.key_id)
        refused = client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
