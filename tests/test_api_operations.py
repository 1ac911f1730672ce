"""POST /v1/jobs for every operation: what each accepts and stores, and each validation rule's
code and param (in process: TestClient over the in-memory fakes of editfarm_testing/api.py)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.deps import Services
from broker.schema import JobStatus
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings, queued
from storage.store import InMemoryObjectStore

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}


def image_bytes(size: tuple[int, int] = (64, 48), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 200 if mode == "L" else (200, 30, 30) if mode == "RGB" else (200, 30, 30, 128)).save(
        buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


IMAGE = data_url(image_bytes())
MASK = data_url(image_bytes(mode="L"))


def make_client(**overrides: Any) -> tuple[TestClient, Services]:
    services = fake_services(make_settings(**overrides))
    return TestClient(create_app(services=services)), services


@pytest.fixture
def client_services() -> tuple[TestClient, Services]:
    return make_client()


def objects_of(services: Services) -> InMemoryObjectStore:
    assert isinstance(services.objects, InMemoryObjectStore)
    return services.objects




def assert_nothing_accepted(services: Services) -> None:
    assert queued(services) == []
    assert objects_of(services).objects == {}
    assert services.store.tenant_job_ids("acme") == []


def assert_error(response: Any, status: int, code: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error.get("param") == param, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def accepted(client: TestClient, services: Services, body: dict[str, Any]) -> Any:
    """Submit ``body`` (JSON), expect 202, and return the stored job."""
    response = client.post("/v1/jobs", json=body, headers=ACME)
    assert response.status_code == 202, response.text
    view = response.json()
    assert view["status"] == "queued" and view["operation"] == body.get("operation", "edit")
    job = services.store.get(view["id"])
    assert job is not None and job.status is JobStatus.QUEUED
    assert queued(services)[-1][0] == job.id
    for key in [*job.input_keys, *([job.mask_key] if job.mask_key else [])]:
        assert key.startswith(f"tenants/acme/jobs/{job.id}/inputs/") and key in objects_of(services).objects
    return job


# -- a valid request per operation -----------------------------------------------------------------


def test_an_edit_with_reference_images_stores_them_after_the_main_image(client_services: Any) -> None:
    client, services = client_services
    refs = [data_url(image_bytes((32, 32), "JPEG"), "image/jpeg"), data_url(image_bytes((48, 32), "WEBP"))]
    job = accepted(client, services, {"operation": "edit", "prompt": "put the hat on the cat", "image": IMAGE,
                                      "images": refs, "width": 512, "height": 384, "num_images": 2,
                                      "output_format": "jpeg", "output_quality": 80, "dpi": 300})
    assert [k.rsplit("/", 1)[1] for k in job.input_keys] == ["0.png", "1.jpg", "2.webp"]
    assert job.mask_key is None
    p = job.params
    assert (p.width, p.height, p.num_images, p.output_quality, p.dpi) == (512, 384, 2, 80, 300)


def test_a_generate_job_takes_no_image_and_has_no_input_keys(client_services: Any) -> None:
    client, services = client_services
    job = accepted(client, services, {"operation": "generate", "prompt": "a red bicycle", "width": 1024,
                                      "height": 576, "seed": 5})
    assert job.input_keys == [] and job.mask_key is None and objects_of(services).objects == {}
    assert (job.params.width, job.params.height, job.params.seed) == (1024, 576, 5)


def test_an_inpaint_with_a_mask_and_boxes_stores_the_mask_under_its_own_key(client_services: Any) -> None:
    client, services = client_services
    job = accepted(client, services, {"operation": "inpaint", "prompt": "a wooden table", "image": IMAGE,
                                      "mask": MASK, "boxes": [[0.1, 0.1, 0.5, 0.5]], "strength": 0.8})
    assert job.mask_key == f"tenants/acme/jobs/{job.id}/inputs/mask.png"
    assert objects_of(services).objects[job.mask_key][0] == image_bytes(mode="L")
    assert job.params.boxes == [[0.1, 0.1, 0.5, 0.5]] and job.params.strength == 0.8


def test_an_inpaint_with_boxes_only_and_no_prompt_is_accepted(client_services: Any) -> None:
    client, services = client_services
    job = accepted(client, services, {"operation": "inpaint", "image": IMAGE, "boxes": [[0, 0, 1, 0.5]]})
    assert job.mask_key is None and job.params.prompt is None and len(job.input_keys) == 1


def test_an_outpaint_with_margins_or_a_target_size_is_accepted(client_services: Any) -> None:
    client, services = client_services
    job = accepted(client, services, {"operation": "outpaint", "image": IMAGE, "outpaint": {"right": 64}})
    assert job.params.outpaint is not None and job.params.outpaint.right == 64
    job = accepted(client, services, {"operation": "outpaint", "image": IMAGE,
                                      "outpaint": {"width": 128, "height": 48, "direction": "left"}})
    assert job.params.outpaint is not None and job.params.outpaint.canvas((64, 48)) == (128, 48)


def test_a_move_with_an_object_mask_is_accepted(client_services: Any) -> None:
    client, services = client_services
    job = accepted(client, services, {"operation": "move", "image": IMAGE, "mask": MASK,
                                      "move": {"box": [0.1, 0.1, 0.4, 0.4], "dx": 12, "dy": -4, "scale": 0.9}})
    assert job.mask_key is not None
    assert job.params.move is not None and (job.params.move.dx, job.params.move.dy) == (12, -4)


def test_an_upscale_with_a_target_and_tiling_is_accepted(client_services: Any) -> None:
    client, services = client_services
    job = accepted(client, services, {"operation": "upscale", "image": IMAGE, "width": 2048,
                                      "upscale": {"tile": 512, "overlap": 64}, "strength": 0.25})
    assert job.params.width == 2048 and job.params.upscale is not None and job.params.upscale.tile == 512


def test_loras_from_the_cluster_bucket_and_allowed_urls_are_accepted() -> None:
    client, services = make_client(allow_private_urls=True, allow_http_urls=True)
    loras = [{"uri": "s3://editfarm/loras/style.safetensors", "scale": 0.8},
             {"uri": "http://127.0.0.1:9/loras/detail.safetensors"}]
    job = accepted(client, services, {"prompt": "p", "image": IMAGE, "loras": loras})
    assert [(lora.uri, lora.scale) for lora in job.params.loras] == [
        ("s3://editfarm/loras/style.safetensors", 0.8), ("http://127.0.0.1:9/loras/detail.safetensors", 1.0)]


def test_another_bucket_is_allowed_for_loras_only_when_the_setting_lists_it() -> None:
    body = {"prompt": "p", "image": IMAGE, "loras": [{"uri": "s3://shared-loras/a.safetensors"}]}
    client, services = make_client()
    assert_error(client.post("/v1/jobs", json=body, headers=ACME), 422, "url_not_allowed", "loras")
    assert_nothing_accepted(services)
    client, services = make_client(lora_buckets="shared-loras, other")
    accepted(client, services, body)


def test_multipart_takes_files_for_image_references_and_mask_and_json_text_for_structured_fields(
        client_services: Any) -> None:
    client, services = client_services
    files = [("image", ("in.png", image_bytes(), "image/png")),
             ("mask", ("mask.png", image_bytes(mode="L"), "image/png"))]
    response = client.post("/v1/jobs", headers=ACME, files=files, data={
        "operation": "inpaint", "prompt": "a lamp", "boxes": json.dumps([[0.5, 0.5, 1, 1]]), "num_images": "2",
        "strength": "0.5", "dpi": "", "loras": json.dumps([{"uri": "s3://editfarm/l.safetensors", "scale": 2}])})
    assert response.status_code == 202, response.text
    job = services.store.get(response.json()["id"])
    assert job is not None and job.mask_key and len(job.input_keys) == 1
    assert job.params.boxes == [[0.5, 0.5, 1, 1]] and job.params.num_images == 2 and job.params.dpi is None
    assert job.params.loras[0].scale == 2

    refs = [("images", (f"r{i}.png", image_bytes((16 * (i + 1), 16)), "image/png")) for i in range(3)]
    response = client.post("/v1/jobs", headers=ACME, data={"prompt": "p"},
                           files=[("image", ("in.png", image_bytes(), "image/png")), *refs])
    assert response.status_code == 202, response.text
    job = services.store.get(response.json()["id"])
    assert job is not None and len(job.input_keys) == 4
    assert Image.open(io.BytesIO(objects_of(services).get(job.input_keys[3]))).size == (48, 16)

    response = client.post("/v1/jobs", headers=ACME, data={"operation": "outpaint", "outpaint": '{"top": 32}'},
                           files=[("image", ("in.png", image_bytes(), "image/png"))])
    assert response.status_code == 202, response.text


def test_multipart_refuses_bad_json_text_and_more_than_five_files(client_services: Any) -> None:
    client, services = client_services
    image = [("image", ("in.png", image_bytes(), "image/png"))]
    response = client.post("/v1/jobs", headers=ACME, files=image,
                           data={"operation": "inpaint", "boxes": "[[0, 0, 1"})
    assert_error(response, 422, "invalid_parameter", "boxes")
    refs = [("images", (f"r{i}.png", image_bytes(), "image/png")) for i in range(4)]
    response = client.post("/v1/jobs", headers=ACME, files=[*image, *refs], data={"prompt": "p"})
    assert_error(response, 422, "invalid_parameter", "images")  # 5 files: parsed, then too many references
    response = client.post("/v1/jobs", headers=ACME, data={"prompt": "p"},
                           files=[*image, *refs, ("mask", ("m.png", image_bytes(), "image/png"))])
    assert_error(response, 400, "invalid_request", None)  # 6 files: the parser's limit
    response = client.post("/v1/jobs", headers=ACME, data={"prompt": "p"},
                           files=[*image, ("mask", ("m.png", image_bytes(), "image/png")),
                                  ("mask", ("m.png", image_bytes(), "image/png"))])
    assert_error(response, 422, "invalid_parameter", "mask")
    assert_nothing_accepted(services)


# -- every validation rule: its code and param, and nothing accepted ------------------------------


def _inpaint(**fields: Any) -> dict[str, Any]:
    return {"operation": "inpaint", "prompt": "p", "image": IMAGE, "boxes": [[0, 0, 0.5, 0.5]], **fields}


def _outpaint(spec: dict[str, Any], image: str = IMAGE) -> dict[str, Any]:
    return {"operation": "outpaint", "image": image, "outpaint": spec}


def _move(spec: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"operation": "move", "image": IMAGE, "move": {"box": [0.1, 0.1, 0.4, 0.4], **spec}, **fields}


def _edit(**fields: Any) -> dict[str, Any]:
    return {"prompt": "p", "image": IMAGE, **fields}


def _lora(uri: str = "s3://editfarm/l.safetensors", scale: float = 1.0) -> dict[str, Any]:
    return {"uri": uri, "scale": scale}


RULES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("unknown operation", {"operation": "colorize", "image": IMAGE}, 422, "unknown_operation", "operation"),
    ("no image for inpaint", {"operation": "inpaint", "boxes": [[0, 0, 1, 1]]}, 422, "missing_image", "image"),
    ("no image for upscale", {"operation": "upscale"}, 422, "missing_image", "image"),
    ("no prompt for generate", {"operation": "generate"}, 422, "missing_field", "prompt"),
    ("no prompt for edit", {"image": IMAGE}, 422, "missing_field", "prompt"),
    ("inpaint without mask or boxes", _inpaint(boxes=[]), 422, "missing_field", "mask"),
    ("outpaint without its spec", {"operation": "outpaint", "image": IMAGE}, 422, "missing_field", "outpaint"),
    ("move without its spec", {"operation": "move", "image": IMAGE}, 422, "missing_field", "move"),
    ("an image for generate", {"operation": "generate", "prompt": "p", "image": IMAGE},
     422, "invalid_parameter", "image"),
    ("references on inpaint", _inpaint(images=[IMAGE]), 422, "invalid_parameter", "images"),
    ("references on generate", {"operation": "generate", "prompt": "p", "images": [IMAGE]},
     422, "invalid_parameter", "images"),
    ("four references", _edit(images=[IMAGE] * 4), 422, "invalid_parameter", "images"),
    ("references not a list", _edit(images=IMAGE), 422, "invalid_parameter", "images"),
    ("a mask on edit", _edit(mask=MASK), 422, "invalid_parameter", "mask"),
    ("a mask on outpaint", {**_outpaint({"left": 16}), "mask": MASK}, 422, "invalid_parameter", "mask"),
    ("a mask on upscale", {"operation": "upscale", "image": IMAGE, "mask": MASK},
     422, "invalid_parameter", "mask"),
    ("a mask not the image's size", _inpaint(mask=data_url(image_bytes((32, 24), mode="L"))),
     422, "invalid_parameter", "mask"),
    ("a move mask not the image's size", _move({"dx": 4}, mask=data_url(image_bytes((64, 64), mode="L"))),
     422, "invalid_parameter", "mask"),
    ("a box outside 0..1", _inpaint(boxes=[[0, 0, 1.5, 1]]), 422, "invalid_parameter", "boxes"),
    ("an empty box", _inpaint(boxes=[[0.2, 0.2, 0.2, 0.5]]), 422, "invalid_parameter", "boxes"),
    ("a box with x0 > x1", _inpaint(boxes=[[0.6, 0.1, 0.2, 0.5]]), 422, "invalid_parameter", "boxes"),
    ("a box of 3 numbers", _inpaint(boxes=[[0.1, 0.1, 0.2]]), 422, "invalid_parameter", "boxes"),
    ("17 boxes", _inpaint(boxes=[[0, 0, 0.5, 0.5]] * 17), 422, "invalid_parameter", "boxes"),
    ("boxes on edit", _edit(boxes=[[0, 0, 0.5, 0.5]]), 422, "invalid_parameter", "boxes"),
    ("width off the 16 grid", _edit(width=500), 422, "invalid_parameter", "width"),
    ("height below 16", {"operation": "generate", "prompt": "p", "height": 0}, 422, "invalid_parameter", "height"),
    ("edit wider than 1024", _edit(width=1040), 422, "invalid_parameter", "width"),
    ("generate taller than 1024", {"operation": "generate", "prompt": "p", "height": 2048},
     422, "invalid_parameter", "height"),
    ("upscale wider than 2048", {"operation": "upscale", "image": IMAGE, "width": 2064},
     422, "invalid_parameter", "width"),
    ("width for inpaint", _inpaint(width=64), 422, "invalid_parameter", "width"),
    ("height for outpaint", {**_outpaint({"left": 16}), "height": 64}, 422, "invalid_parameter", "height"),
    ("width for move", _move({"dx": 4}, width=64), 422, "invalid_parameter", "width"),
    ("strength for edit", _edit(strength=0.5), 422, "invalid_parameter", "strength"),
    ("strength for generate", {"operation": "generate", "prompt": "p", "strength": 0.5},
     422, "invalid_parameter", "strength"),
    ("strength 0", _inpaint(strength=0), 422, "invalid_parameter", "strength"),
    ("strength above 1", _inpaint(strength=1.5), 422, "invalid_parameter", "strength"),
    ("num_images 0", _edit(num_images=0), 422, "invalid_parameter", "num_images"),
    ("num_images 5", _edit(num_images=5), 422, "invalid_parameter", "num_images"),
    ("outpaint target smaller than the image", _outpaint({"width": 32, "height": 48}),
     422, "invalid_parameter", "outpaint"),
    ("outpaint target the image's size", _outpaint({"width": 64}), 422, "invalid_parameter", "outpaint"),
    ("outpaint canvas over 4096", _outpaint({"left": 4000, "right": 64}), 422, "invalid_parameter", "outpaint"),
    ("outpaint margins and a target", _outpaint({"left": 16, "width": 128}), 422, "invalid_parameter", "outpaint"),
    ("outpaint adding nothing", _outpaint({"left": 0}), 422, "invalid_parameter", "outpaint"),
    ("outpaint negative margin", _outpaint({"left": -16}), 422, "invalid_parameter", "outpaint.left"),
    ("outpaint unknown direction", _outpaint({"width": 128, "direction": "up"}),
     422, "invalid_parameter", "outpaint.direction"),
    ("outpaint unknown field", _outpaint({"lefty": 16}), 422, "invalid_parameter", "outpaint.lefty"),
    ("outpaint spec on edit", _edit(outpaint={"left": 16}), 422, "invalid_parameter", "outpaint"),
    ("a move that moves nothing", _move({"dx": 0, "dy": 0, "scale": 1}), 422, "invalid_parameter", "move"),
    ("a move scale of 10", _move({"scale": 10}), 422, "invalid_parameter", "move.scale"),
    ("a move with a bad box", {"operation": "move", "image": IMAGE, "move": {"box": [0.5, 0, 0.1, 1], "dx": 3}},
     422, "invalid_parameter", "move.box"),
    ("a move spec on inpaint", _inpaint(move={"box": [0, 0, 1, 1], "dx": 1}), 422, "invalid_parameter", "move"),
    ("an upscale spec on edit", _edit(upscale={"scale": 2}), 422, "invalid_parameter", "upscale"),
    ("an upscale overlap of half a tile", {"operation": "upscale", "image": IMAGE,
                                           "upscale": {"tile": 256, "overlap": 128}},
     422, "invalid_parameter", "upscale"),
    ("a LoRA uri with another scheme", _edit(loras=[_lora("ftp://host/l.safetensors")]),
     422, "invalid_parameter", "loras.uri"),
    ("a LoRA that is not .safetensors", _edit(loras=[_lora("s3://editfarm/l.ckpt")]),
     422, "invalid_parameter", "loras.uri"),
    ("a LoRA scale of 5", _edit(loras=[_lora(scale=5)]), 422, "invalid_parameter", "loras.scale"),
    ("five LoRAs", _edit(loras=[_lora()] * 5), 422, "invalid_parameter", "loras"),
    ("a LoRA from another bucket", _edit(loras=[_lora("s3://elsewhere/l.safetensors")]),
     422, "url_not_allowed", "loras"),
    ("a LoRA URL on a private host", _edit(loras=[_lora("https://127.0.0.1/l.safetensors")]),
     422, "url_not_allowed", "loras"),
    ("a plain-http LoRA URL", _edit(loras=[_lora("http://example.com/l.safetensors")]),
     422, "url_not_allowed", "loras"),
    ("output_quality 0", _edit(output_quality=0), 422, "invalid_parameter", "output_quality"),
    ("output_quality 101", _edit(output_quality=101), 422, "invalid_parameter", "output_quality"),
    ("dpi 0", _edit(dpi=0), 422, "invalid_parameter", "dpi"),
    ("dpi 10001", _edit(dpi=10001), 422, "invalid_parameter", "dpi"),
    # reference images and masks get the main image's intake checks, named by their own param
    ("a reference that is not an image", _edit(images=[data_url(b"hello")]), 422, "invalid_image", "images"),
    ("a GIF reference", _edit(images=[data_url(image_bytes(fmt="GIF"), "image/gif")]),
     422, "unsupported_image_format", "images"),
    ("a reference of bad base64", _edit(images=["data:image/png;base64,@@@"]), 422, "invalid_image", "images"),
    ("a mask that is not an image", _inpaint(mask=data_url(b"hello")), 422, "invalid_image", "mask"),
    ("a GIF mask", _inpaint(mask=data_url(image_bytes(fmt="GIF"), "image/gif")),
     422, "unsupported_image_format", "mask"),
    ("a mask that is not a string", _inpaint(mask=5), 422, "invalid_parameter", "mask"),
    ("a mask URL on a private host", _inpaint(mask="https://127.0.0.1/mask.png"), 422, "url_not_allowed", "mask"),
    ("a reference URL over http", _edit(images=["http://example.com/r.png"]), 422, "url_not_allowed", "images"),
]


@pytest.mark.parametrize(("case", "body", "status", "code", "param"), RULES, ids=[r[0] for r in RULES])
def test_each_validation_rule_has_its_code_and_param_and_nothing_is_accepted(
        client_services: Any, case: str, body: dict[str, Any], status: int, code: str, param: str | None) -> None:
    client, services = client_services
    assert_error(client.post("/v1/jobs", json=body, headers=ACME), status, code, param)
    assert_nothing_accepted(services)


def test_an_oversized_reference_or_mask_is_image_too_large_under_its_own_param() -> None:
    client, services = make_client(max_image_side_px=100)
    big = data_url(image_bytes((128, 16)))
    assert_error(client.post("/v1/jobs", json=_edit(images=[big]), headers=ACME), 422, "image_too_large", "images")
    client, services = make_client(max_image_side_px=100)
    response = client.post("/v1/jobs", json={"operation": "inpaint", "image": data_url(image_bytes((16, 16))),
                                             "mask": data_url(image_bytes((16, 128), mode="L"))}, headers=ACME)
    assert_error(response, 422, "image_too_large", "mask")
    assert_nothing_accepted(services)


def test_a_mask_url_that_cannot_be_fetched_is_image_fetch_failed_for_mask() -> None:
    client, services = make_client(allow_private_urls=True, allow_http_urls=True, url_fetch_timeout_s=5)
    # port 9 (discard) on loopback: nothing listens, the connection is refused
    response = client.post("/v1/jobs", json=_inpaint(mask="http://127.0.0.1:9/mask.png"), headers=ACME)
    error = assert_error(response, 422, "image_fetch_failed", "mask")
    assert "mask" in error["message"]
    assert_nothing_accepted(services)


# -- OpenAPI ------------------------------------------------------------------------------------------


def test_openapi_declares_the_operations_and_every_new_field(client_services: Any) -> None:
    client, _ = client_services
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["Operation"]["enum"] == ["edit", "generate", "inpaint", "outpaint", "move", "upscale"]
    fields = {"image", "images", "mask", "boxes", "outpaint", "move", "upscale", "loras", "width", "height",
              "strength", "num_images", "output_quality", "dpi"}
    assert fields <= set(schemas["JobRequest"]["properties"])
    multipart = schemas["JobMultipartRequest"]["properties"]
    assert fields <= set(multipart)
    assert multipart["images"]["items"]["format"] == "binary" and multipart["mask"]["format"] == "binary"
    assert multipart["boxes"]["type"] == "string"  # JSON text in a form field
    for name in ("OutpaintParams", "MoveParams", "UpscaleParams", "LoraParams"):
        assert schemas[name]["additionalProperties"] is False
