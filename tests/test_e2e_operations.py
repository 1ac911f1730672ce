"""Every operation end to end through real parts: the API under uvicorn → Redis → a `celery
worker` process running the tiny Qwen-Image model → SeaweedFS's S3 server.

The jobs are submitted together once (the module's ``results``) and the tests check their
outputs, so the module costs one cluster start plus about fifteen small renders. Inputs keep
sides that are multiples of 16, so inpaint/outpaint render at the image's own size (no resize):
their untouched pixels can be compared bit for bit.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from cli.cluster import LocalCluster
from tests.e2e_support import auth, data_url, wait_terminal

pytestmark = pytest.mark.integration

SIZE = (64, 48)
LORA_KEY = "loras/tiny-style.safetensors"


def noise_png(size: tuple[int, int] = SIZE, mode: str = "RGB", seed: int = 0) -> bytes:
    """A random image: every pixel differs, so "unchanged" is a real check."""
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = rng.integers(60, 256, size=(size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


def left_half_mask(size: tuple[int, int] = SIZE, value: int = 255) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(value, (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


RGBA_INPUT = noise_png(mode="RGBA", seed=1)
RGB_INPUT = noise_png(seed=2)
MASK = left_half_mask()


@pytest.fixture(scope="module")
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    """The session's ordinary cluster (tests/conftest.py)."""
    return shared_cluster


def s3(cluster: LocalCluster) -> Any:
    return boto3.client("s3", endpoint_url=cluster.s3_url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def post(cluster: LocalCluster, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)


def submit(cluster: LocalCluster, body: dict[str, Any]) -> str:
    response = post(cluster, {"seed": 5, "steps": 2, "true_cfg_scale": 1.0, **body})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def submit_multipart_inpaint(cluster: LocalCluster) -> str:
    """inpaint of an RGBA PNG with a mask, as file parts, with a DPI."""
    response = httpx.post(
        f"{cluster.api_url}/v1/jobs", headers=auth(), timeout=30,
        data={"operation": "inpaint", "prompt": "a red ball", "seed": "5", "steps": "2", "true_cfg_scale": "1",
              "dpi": "300"},
        files=[("image", ("in.png", RGBA_INPUT, "image/png")), ("mask", ("mask.png", MASK, "image/png"))])
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def results(cluster: LocalCluster, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every job of the module, submitted at once (the one worker runs them in order), finished."""
    from workers.pipeline.tiny import write_tiny_lora

    lora = write_tiny_lora(tmp_path_factory.mktemp("lora"), seed=1)
    s3(cluster).put_object(Bucket="editfarm", Key=LORA_KEY, Body=lora.read_bytes())
    generate = {"operation": "generate", "prompt": "a red ball", "width": 64, "height": 48}
    ids = {
        "generate_two": submit(cluster, {**generate, "num_images": 2, "seed": 9}),
        "inpaint_rgba": submit_multipart_inpaint(cluster),
        "inpaint_again": submit_multipart_inpaint(cluster),
        "outpaint": submit(cluster, {"operation": "outpaint", "image": data_url(RGB_INPUT),
                                     "outpaint": {"right": 32, "bottom": 16}}),
        "move": submit(cluster, {"operation": "move", "image": data_url(RGB_INPUT),
                                 "move": {"box": [0.1, 0.1, 0.5, 0.5], "dx": 16, "dy": 4}}),
        "upscale": submit(cluster, {"operation": "upscale", "image": data_url(RGB_INPUT),
                                    "output_format": "jpeg", "output_quality": 70, "dpi": 150}),
        "edit_refs": submit(cluster, {"operation": "edit", "prompt": "put the ball on the table",
                                      "image": data_url(RGB_INPUT), "images": [data_url(noise_png((32, 32)))],
                                      "width": 64, "height": 48}),
        # a LoRA job between two identical jobs without it: the model is itself again afterwards
        "no_lora_before": submit(cluster, generate),
        "lora": submit(cluster, {**generate, "loras": [{"uri": f"s3://editfarm/{LORA_KEY}", "scale": 1.0}]}),
        "no_lora_after": submit(cluster, generate),
        "missing_lora": submit(cluster, {**generate, "loras": [{"uri": "s3://editfarm/loras/none.safetensors"}]}),
        "black_mask": submit(cluster, {"operation": "inpaint", "image": data_url(RGB_INPUT),
                                       "mask": data_url(left_half_mask(value=0))}),
    }
    return {name: wait_terminal(cluster.api_url, job_id, timeout_s=150) for name, job_id in ids.items()}


def succeeded(results: dict[str, Any], name: str) -> dict[str, Any]:
    job = results[name]
    assert job["status"] == "succeeded", job
    return dict(job)


def download(cluster: LocalCluster, output: dict[str, Any]) -> Image.Image:
    data = httpx.get(output["url"], timeout=30).content
    assert hashlib.sha256(data).hexdigest() == output["sha256"]
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (output["width"], output["height"])
    return image


# -- sizes per operation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), [
    ("generate_two", (64, 48)), ("inpaint_rgba", SIZE), ("outpaint", (96, 64)), ("move", SIZE),
    ("upscale", (128, 96)), ("edit_refs", (64, 48)), ("lora", (64, 48)),
])
def test_each_operation_outputs_its_size(cluster: LocalCluster, results: dict[str, Any], name: str,
                                         size: tuple[int, int]) -> None:
    job = succeeded(results, name)
    assert job["outputs"] and all((o["width"], o["height"]) == size for o in job["outputs"])
    assert download(cluster, job["outputs"][0]).size == size
    assert job["progress"]["step"] == job["progress"]["total"] > 0


def test_inpaint_keeps_every_pixel_outside_the_mask_and_the_alpha_channel(
        cluster: LocalCluster, results: dict[str, Any]) -> None:
    job = succeeded(results, "inpaint_rgba")
    [output] = job["outputs"]
    image = download(cluster, output)
    assert image.format == "PNG" and image.mode == "RGBA" and output["content_type"] == "image/png"
    before = np.asarray(Image.open(io.BytesIO(RGBA_INPUT)))
    after = np.asarray(image)
    half = SIZE[0] // 2
    assert np.array_equal(after[:, half:], before[:, half:])  # outside the mask: bit for bit, alpha too
    assert not np.array_equal(after[:, :half, :3], before[:, :half, :3])  # inside: repainted
    assert np.array_equal(after[..., 3], before[..., 3])  # inpaint keeps the input's alpha everywhere
    assert round(image.info["dpi"][0]) == 300 and job["params"]["dpi"] == 300


def test_the_same_seed_gives_the_same_bytes_for_a_non_edit_operation(results: dict[str, Any]) -> None:
    first = succeeded(results, "inpaint_rgba")["outputs"][0]["sha256"]
    assert succeeded(results, "inpaint_again")["outputs"][0]["sha256"] == first


def test_outpaint_grows_the_canvas_and_keeps_the_input_at_its_place(
        cluster: LocalCluster, results: dict[str, Any]) -> None:
    image = download(cluster, succeeded(results, "outpaint")["outputs"][0])
    before = np.asarray(Image.open(io.BytesIO(RGB_INPUT)))
    assert np.array_equal(np.asarray(image.convert("RGB"))[:SIZE[1], :SIZE[0]], before)


def test_num_images_two_gives_two_distinct_outputs(cluster: LocalCluster, results: dict[str, Any]) -> None:
    outputs = succeeded(results, "generate_two")["outputs"]
    assert len(outputs) == 2 and outputs[0]["sha256"] != outputs[1]["sha256"]
    assert [o["key"].rsplit("/", 1)[1] for o in outputs] == ["0.png", "1.png"]
    assert all(download(cluster, o).mode == "RGB" for o in outputs)


def test_jpeg_quality_and_dpi_reach_the_file(cluster: LocalCluster, results: dict[str, Any]) -> None:
    [output] = succeeded(results, "upscale")["outputs"]
    image = download(cluster, output)
    assert output["content_type"] == "image/jpeg" and output["key"].endswith("/outputs/0.jpeg")
    assert image.format == "JPEG" and image.info["dpi"] == (150, 150)


def test_a_lora_changes_the_output_and_the_next_job_is_the_base_model_again(results: dict[str, Any]) -> None:
    before = succeeded(results, "no_lora_before")["outputs"][0]["sha256"]
    with_lora = succeeded(results, "lora")["outputs"][0]["sha256"]
    after = succeeded(results, "no_lora_after")["outputs"][0]["sha256"]
    assert with_lora != before
    assert after == before


def test_inputs_the_worker_cannot_use_fail_the_job_with_their_own_code(results: dict[str, Any]) -> None:
    missing = results["missing_lora"]
    assert missing["status"] == "failed" and missing["error"]["code"] == "input_unreadable", missing
    black = results["black_mask"]
    assert black["status"] == "failed" and black["error"]["code"] == "invalid_input", black
    assert "mask" in black["error"]["message"]


# -- validation end to end -----------------------------------------------------------------------------


BAD = [
    ("an image for generate", {"operation": "generate", "prompt": "p", "image": data_url(RGB_INPUT)},
     "invalid_parameter", "image"),
    ("inpaint without a mask or boxes", {"operation": "inpaint", "image": data_url(RGB_INPUT)},
     "missing_field", "mask"),
    ("a mask not the image's size", {"operation": "inpaint", "image": data_url(RGB_INPUT),
                                     "mask": data_url(left_half_mask((32, 32)))}, "invalid_parameter", "mask"),
    ("a LoRA from another bucket", {"prompt": "p", "image": data_url(RGB_INPUT),
                                    "loras": [{"uri": "s3://other/l.safetensors"}]}, "url_not_allowed", "loras"),
    ("an edit wider than 1024", {"prompt": "p", "image": data_url(RGB_INPUT), "width": 2048},
     "invalid_parameter", "width"),
]


@pytest.mark.parametrize(("case", "body", "code", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_refused_before_anything_is_stored(
        cluster: LocalCluster, case: str, body: dict[str, Any], code: str, param: str) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    jobs_before = len(list(r.scan_iter("editfarm:job:*")))
    response = post(cluster, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param
    assert len(list(r.scan_iter("editfarm:job:*"))) == jobs_before


def test_openapi_announces_every_operation(cluster: LocalCluster) -> None:
    schemas = httpx.get(f"{cluster.api_url}/openapi.json", timeout=10).json()["components"]["schemas"]
    assert set(schemas["Operation"]["enum"]) == {"edit", "generate", "inpaint", "outpaint", "move", "upscale"}
