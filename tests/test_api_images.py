"""Input-image intake: formats, corrupt and oversized images, data URLs and URL fetches (loopback only)."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from api import fetch
from api.app import create_app
from api.deps import Services
from api.errors import ApiError
from api.images import decode_data_url, inspect_image
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings, queued
from storage.store import InMemoryObjectStore

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR (with a correct CRC) claims ``width`` x ``height`` px."""
    png = image_bytes(size=(1, 1))
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:16] + ihdr + crc + png[33:]


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def make_client(**overrides: Any) -> tuple[TestClient, Services]:
    services = fake_services(make_settings(**overrides))
    return TestClient(create_app(services=services)), services


def post_image(client: TestClient, image: str) -> Any:
    return client.post("/v1/jobs", json={"prompt": "p", "image": image}, headers=ACME)


def assert_refused(response: Any, services: Services, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["param"] == "image"
    assert queued(services) == []
    assert isinstance(services.objects, InMemoryObjectStore) and services.objects.objects == {}
    assert services.store.tenant_job_ids("acme") == []


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any) -> Any:
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "ext", "mime"), [("PNG", "png", "image/png"), ("JPEG", "jpg", "image/jpeg"),
                                                  ("WEBP", "webp", "image/webp")])
def test_png_jpeg_and_webp_are_accepted_with_their_size_and_type(fmt: str, ext: str, mime: str) -> None:
    image = inspect_image(image_bytes(fmt, (40, 30)), make_settings())
    assert (image.ext, image.content_type, image.width, image.height) == (ext, mime, 40, 30)


def test_non_image_bytes_are_invalid_image_and_nothing_is_stored_or_queued() -> None:
    client, services = make_client()
    assert_refused(post_image(client, data_url(b"%PDF-1.7 definitely not an image")), services,
                   422, "invalid_image")
    response = client.post("/v1/jobs", headers=ACME, data={"prompt": "p"},
                           files={"image": ("x.png", b"\x00" * 100, "image/png")})
    assert_refused(response, services, 422, "invalid_image")


def test_a_truncated_png_is_invalid_image() -> None:
    client, services = make_client()
    png = image_bytes(size=(256, 256))
    assert_refused(post_image(client, data_url(png[: len(png) // 2])), services, 422, "invalid_image")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a_truncated_jpeg_or_webp_is_invalid_image(fmt: str) -> None:
    # no cheap integrity check exists for these: the API decodes them fully
    client, services = make_client()
    noisy = Image.effect_noise((256, 256), 64).convert("RGB")
    buf = io.BytesIO()
    noisy.save(buf, format=fmt, quality=90)
    data = buf.getvalue()
    assert_refused(post_image(client, data_url(data[: len(data) // 2])), services, 422, "invalid_image")


def test_a_png_is_checked_chunk_by_chunk_without_decoding_its_pixels() -> None:
    """The API proves a PNG intact by its chunks (CRCs to IEND, ``verify()``), not by decoding it: a
    file whose chunks are intact but whose compressed pixels are not (made so on purpose) is taken in,
    and the worker's full decode refuses it before any render (tests/test_e2e_edit.py)."""
    from tests.e2e_support import png_with_corrupt_pixels

    client, services = make_client()
    bad = png_with_corrupt_pixels()
    flipped = bytearray(image_bytes(size=(64, 64)))
    flipped[flipped.index(b"IDAT") + 6] ^= 0xFF  # one bit pattern changed inside the pixel data: its CRC fails
    assert_refused(post_image(client, data_url(bytes(flipped))), services, 422, "invalid_image")
    assert post_image(client, data_url(bad)).status_code == 202


def test_an_empty_upload_is_invalid_image() -> None:
    client, services = make_client()
    response = client.post("/v1/jobs", headers=ACME, data={"prompt": "p"},
                           files={"image": ("x.png", b"", "image/png")})
    assert_refused(response, services, 422, "invalid_image")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_unsupported_image_format(fmt: str) -> None:
    client, services = make_client()
    assert_refused(post_image(client, data_url(image_bytes(fmt))), services, 422, "unsupported_image_format")


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (7_000, 7_000), (9_000, 10)])
def test_huge_header_dimensions_are_refused_before_any_pixel_is_decoded(
    no_pixel_decoding: None, width: int, height: int,
) -> None:
    client, services = make_client()
    assert_refused(post_image(client, data_url(png_claiming(width, height))), services, 422, "image_too_large")


def test_pixel_and_side_limits_come_from_settings() -> None:
    settings = make_settings(max_image_pixels=1000, max_image_side_px=50)
    with pytest.raises(ApiError) as too_many:
        inspect_image(image_bytes(size=(40, 40)), settings)
    assert too_many.value.code == "image_too_large" and too_many.value.status_code == 422
    with pytest.raises(ApiError) as too_wide:
        inspect_image(image_bytes(size=(60, 2)), settings)
    assert too_wide.value.code == "image_too_large"
    assert inspect_image(image_bytes(size=(30, 30)), settings).width == 30


def test_an_image_over_max_image_bytes_is_413_payload_too_large() -> None:
    client, services = make_client(max_image_bytes=100)
    assert_refused(post_image(client, data_url(image_bytes(size=(64, 64)))), services, 413, "payload_too_large")
    response = client.post("/v1/jobs", headers=ACME, data={"prompt": "p"},
                           files={"image": ("x.png", image_bytes(size=(64, 64)), "image/png")})
    assert_refused(response, services, 413, "payload_too_large")


def test_data_urls_must_be_base64_and_decode() -> None:
    assert decode_data_url("data:image/png;base64,aGVs\nbG8=", 100) == b"hello"  # wrapped lines are fine
    with pytest.raises(ApiError) as not_base64:
        decode_data_url("data:image/png,raw", 100)
    assert not_base64.value.code == "invalid_parameter"
    with pytest.raises(ApiError) as bad:
        decode_data_url("data:image/png;base64,***", 100)
    assert bad.value.code == "invalid_image"
    with pytest.raises(ApiError) as big:
        decode_data_url("data:image/png;base64," + "A" * 400, 100)
    assert big.value.code == "payload_too_large" and big.value.status_code == 413


# -- URL fetches from a loopback server -----------------------------------------------------------

PNG = image_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        routes = {
            "/img.png": lambda: self._send(200, PNG),
            "/hop1": lambda: self._redirect("/hop2"),
            "/hop2": lambda: self._redirect("/img.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/meta": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/missing": lambda: self._send(404, b"no"),
            "/big": lambda: self._send(200, b"\x89PNG" + b"\x00" * 5000),
            "/slow": self._slow,
        }
        routes.get(self.path, lambda: self._send(404, b"no"))()

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _slow(self) -> None:
        time.sleep(2)
        self._send(200, PNG)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = {"allow_http_urls": True, "allow_private_urls": True}


def test_an_image_url_on_an_allowed_host_is_fetched_and_stored(server: str) -> None:
    client, services = make_client(**LOCAL)
    response = post_image(client, f"{server}/img.png")
    assert response.status_code == 202, response.text
    assert isinstance(services.objects, InMemoryObjectStore)
    assert [data for data, _ in services.objects.objects.values()] == [PNG]


def test_up_to_three_redirects_are_followed(server: str) -> None:
    client, _ = make_client(**LOCAL)
    assert post_image(client, f"{server}/hop1").status_code == 202
    client, services = make_client(**LOCAL)
    assert_refused(post_image(client, f"{server}/loop"), services, 422, "image_fetch_failed")


def test_the_default_policy_refuses_http_and_private_image_urls(server: str) -> None:
    client, services = make_client()
    assert_refused(post_image(client, f"{server}/img.png"), services, 422, "url_not_allowed")
    client, services = make_client(allow_http_urls=True)
    assert_refused(post_image(client, f"{server}/img.png"), services, 422, "url_not_allowed")
    client, services = make_client()
    assert_refused(post_image(client, "ftp://127.0.0.1/x.png"), services, 422, "url_not_allowed")


def test_a_redirect_to_the_metadata_address_is_refused_even_when_private_urls_are_allowed(server: str) -> None:
    client, services = make_client(**LOCAL)
    assert_refused(post_image(client, f"{server}/meta"), services, 422, "url_not_allowed")


def test_the_connection_itself_is_guarded_even_if_the_url_check_were_bypassed(
    server: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Simulates DNS rebinding: the pre-check passes, the address actually dialled is loopback.
    monkeypatch.setattr(fetch, "check_url_policy", lambda url, settings, param: None)
    client, services = make_client(allow_http_urls=True)
    assert_refused(post_image(client, f"{server}/img.png"), services, 422, "url_not_allowed")


def test_fetch_errors_are_image_fetch_failed(server: str) -> None:
    client, services = make_client(**LOCAL, url_fetch_timeout_s=0.5)
    assert_refused(post_image(client, f"{server}/missing"), services, 422, "image_fetch_failed")
    assert_refused(post_image(client, f"{server}/slow"), services, 422, "image_fetch_failed")
    closed = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    assert_refused(post_image(client, f"http://127.0.0.1:{port}/x.png"), services, 422, "image_fetch_failed")


def test_a_fetched_body_over_max_image_bytes_is_413(server: str) -> None:
    client, services = make_client(**LOCAL, max_image_bytes=1000)
    assert_refused(post_image(client, f"{server}/big"), services, 413, "payload_too_large")
