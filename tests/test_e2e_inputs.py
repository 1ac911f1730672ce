"""Inputs end to end through a real local cluster (API, Redis, Celery worker with the tiny model, S3).

Issue 16.2: a phone photo stored landscape with EXIF Orientation=6 is edited upright (portrait).
"""

from __future__ import annotations

import io

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image

from cli.cluster import LocalCluster
from tests.e2e_support import auth, data_url, wait_terminal

pytestmark = pytest.mark.integration


def _portrait_photo_stored_sideways() -> bytes:
    """A 128x64 JPEG (as the sensor stored it) whose EXIF says: turn 90° clockwise to show it."""
    stored = np.zeros((64, 128, 3), dtype=np.uint8)
    stored[:, :64] = (200, 60, 40)
    stored[:, 64:] = (40, 60, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored, "RGB").save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _output(cluster: LocalCluster, key: str) -> Image.Image:
    client = boto3.client("s3", endpoint_url=cluster.s3_url, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    image = Image.open(io.BytesIO(client.get_object(Bucket="editfarm", Key=key)["Body"].read()))
    image.load()
    return image


def test_an_edit_of_an_orientation_6_photo_comes_back_portrait(shared_cluster: LocalCluster) -> None:
    body = {"operation": "edit", "prompt": "make it brighter", "image": data_url(_portrait_photo_stored_sideways(),
                                                                                "image/jpeg"),
            "width": 64, "seed": 5, "steps": 2, "output_format": "png"}
    response = httpx.post(f"{shared_cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)
    assert response.status_code == 202, response.text

    done = wait_terminal(shared_cluster.api_url, response.json()["id"])

    assert done["status"] == "succeeded", done
    [output] = done["outputs"]
    assert (output["width"], output["height"]) == (64, 128)  # the height follows the upright aspect
    assert _output(shared_cluster, output["key"]).size == (64, 128)


def test_an_inpaint_mask_drawn_on_the_upright_photo_is_accepted_and_lines_up(shared_cluster: LocalCluster) -> None:
    mask = Image.new("L", (64, 128), 0)
    mask.paste(255, (0, 0, 64, 32))  # the top quarter of the photo as shown
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    body = {"operation": "inpaint", "prompt": "a hat", "image": data_url(_portrait_photo_stored_sideways(),
                                                                          "image/jpeg"),
            "mask": data_url(buf.getvalue()), "seed": 5, "steps": 2, "output_format": "png"}
    response = httpx.post(f"{shared_cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)
    assert response.status_code == 202, response.text

    done = wait_terminal(shared_cluster.api_url, response.json()["id"])

    assert done["status"] == "succeeded", done
    out = np.asarray(_output(shared_cluster, done["outputs"][0]["key"]).convert("RGB")).astype(int)
    assert out.shape == (128, 64, 3)
    # outside the mask the input's pixels are kept: shown upright, red on top, blue below
    assert out[48, 32, 0] > 150 and out[48, 32, 2] < 100
    assert out[112, 32, 2] > 150 and out[112, 32, 0] < 100
