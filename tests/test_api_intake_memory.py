"""What bounds the API's memory under uploads: upload slots (more in test_api_uploads.py), the sources
dropped after intake, data URLs decoded without extra copies, glibc's fixed mmap threshold."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import pytest
from PIL import Image

from api.errors import ApiError
from api.images import decode_data_url
from api.intake import Sources, intake_images
from api.malloc import fix_mmap_threshold
from editfarm_testing.api import make_settings


def _png(side: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def test_intake_drops_each_source_once_its_image_is_taken_in() -> None:
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    sources = Sources(image=url, references=[_png(), url])
    intake = asyncio.run(intake_images(sources, make_settings()))
    assert intake.image is not None and (intake.image.width, intake.image.height) == (8, 8)
    assert [r.width for r in intake.references] == [8, 8]
    assert sources.image is None and sources.references == [] and sources.mask is None


@pytest.mark.parametrize("payload", ["QQ", "QQ==QQ==", "Q!==", "\u00e9AAA"])
def test_a_data_url_that_is_not_strict_base64_is_invalid_image(payload: str) -> None:
    with pytest.raises(ApiError) as raised:
        decode_data_url("data:image/png;base64," + payload, 1000)
    assert raised.value.code == "invalid_image"


def test_a_data_url_wrapped_at_76_columns_decodes() -> None:
    data = bytes(range(256)) * 4
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert decode_data_url("data:image/png;base64," + wrapped, 2000) == data
    assert decode_data_url("data:image/png;base64," + text, 2000) == data


def test_the_mmap_threshold_is_left_alone_when_off_or_chosen_in_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert fix_mmap_threshold(0) is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert fix_mmap_threshold(256 * 1024) is False


def test_the_app_takes_its_upload_slots_from_the_settings() -> None:
    from api.app import create_app
    from editfarm_testing.api import fake_services

    app: Any = create_app(services=fake_services(make_settings(max_concurrent_uploads=3)))
    assert app.state.upload_slots.limit == 3 and app.state.upload_slots.per_tenant == 2
    app = create_app(services=fake_services(make_settings(max_concurrent_uploads=4,
                                                          max_concurrent_uploads_per_tenant=3)))
    assert app.state.upload_slots.per_tenant == 3
