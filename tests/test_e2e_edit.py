"""One edit job end to end through real parts: API → Redis → Celery worker process → S3 → signed webhook.

Every part is real: a Redis server, the API under uvicorn, a `celery worker`
process loading the tiny Qwen-Image-Edit pipeline with `from_pretrained`, SeaweedFS's
S3 server over HTTP, and an HTTP webhook receiver.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator

import boto3
import httpx
import pytest
import redis
from PIL import Image
from standardwebhooks.webhooks import Webhook

from broker.queues import RenderQueue
from cli.cluster import LocalCluster
from editfarm_testing.catalog import EDIT_MODEL, TEXT_TO_IMAGE_MODEL
from editfarm_testing.webhooks import ByJob, WebhookReceiver
from tests.e2e_support import auth, data_url, png_bytes, png_with_corrupt_pixels, wait_terminal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    """The session's ordinary cluster (tests/conftest.py)."""
    return shared_cluster


@pytest.fixture(scope="module")
def hooks() -> Iterator[ByJob]:
    with WebhookReceiver() as receiver:
        yield ByJob(receiver)


def submit_json(cluster: LocalCluster, **fields: object) -> httpx.Response:
    body = {"operation": "edit", "prompt": "make the sky purple", "image": data_url(png_bytes()),
            "seed": 7, "steps": 2, "true_cfg_scale": 4.0, "output_format": "png", **fields}
    return httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)


def s3_object(cluster: LocalCluster, key: str) -> bytes:
    client = boto3.client("s3", endpoint_url=cluster.s3_url, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    return bytes(client.get_object(Bucket="editfarm", Key=key)["Body"].read())


def test_a_json_edit_job_succeeds_with_its_output_in_s3_and_one_signed_webhook(
        cluster: LocalCluster, hooks: ByJob) -> None:
    response = submit_json(cluster, webhook=hooks.receiver.url)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["urls"]["self"].endswith(f"/v1/jobs/{job['id']}")

    done = wait_terminal(cluster.api_url, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 2, "total": 2}
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    [output] = done["outputs"]
    data = s3_object(cluster, output["key"])
    assert hashlib.sha256(data).hexdigest() == output["sha256"]
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.size == (output["width"], output["height"])
    assert httpx.get(output["url"]).content == data  # the presigned URL serves the same bytes

    deliveries = hooks.for_job(job["id"])
    assert len(deliveries) == 1
    payload = Webhook(cluster.webhook_secret).verify(deliveries[0].body, deliveries[0].headers)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job["id"] and payload["data"]["outputs"][0]["sha256"] == output["sha256"]


def test_a_multipart_upload_edit_job_succeeds(cluster: LocalCluster) -> None:
    response = httpx.post(
        f"{cluster.api_url}/v1/jobs", headers=auth(), timeout=30,
        data={"operation": "edit", "prompt": "add a hat", "seed": "3", "steps": "2"},
        files={"image": ("cat.png", png_bytes(), "image/png")},
    )
    assert response.status_code == 202, response.text
    done = wait_terminal(cluster.api_url, response.json()["id"])
    assert done["status"] == "succeeded" and done["params"]["seed"] == 3


def test_the_same_seed_twice_gives_identical_bytes(cluster: LocalCluster) -> None:
    first, second, other = (submit_json(cluster, seed=s).json()["id"] for s in (11, 11, 12))
    hashes = [wait_terminal(cluster.api_url, j)["outputs"][0]["sha256"] for j in (first, second, other)]
    assert hashes[0] == hashes[1]
    assert hashes[0] != hashes[2]


def test_a_job_without_a_seed_records_the_seed_it_used(cluster: LocalCluster) -> None:
    body = {"operation": "edit", "prompt": "p", "image": data_url(png_bytes()), "steps": 2}
    job = httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30).json()
    assert isinstance(job["params"]["seed"], int)


_FULL_PNG = png_bytes((256, 256))
TRUNCATED_PNG = _FULL_PNG[: len(_FULL_PNG) * 2 // 3]

BAD_REQUESTS = [
    ("non-image bytes", {"image": data_url(b"hello, not an image")}, 422, "invalid_image"),
    ("truncated png", {"image": data_url(TRUNCATED_PNG)}, 422, "invalid_image"),
    ("missing prompt", {"prompt": None}, 422, "missing_field"),
    ("unknown operation", {"operation": "teleport"}, 422, "unknown_operation"),
    ("steps out of range", {"steps": 0}, 422, "invalid_parameter"),
]


@pytest.mark.parametrize(("case", "fields", "status", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_documented_4xx_and_never_reaches_a_worker(
        cluster: LocalCluster, case: str, fields: dict[str, object], status: int, code: str) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    jobs_before = len(list(r.scan_iter("editfarm:job:*")))
    tenant_jobs_before = r.zcard("editfarm:tenant:acme:jobs")
    body = {"operation": "edit", "prompt": "p", "image": data_url(png_bytes()), "steps": 2, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert len(list(r.scan_iter("editfarm:job:*"))) == jobs_before
    assert r.zcard("editfarm:tenant:acme:jobs") == tenant_jobs_before
    # every message waiting in a render queue belongs to a stored job: nothing half-created was sent
    for queue in (*RenderQueue(model=EDIT_MODEL).order, *RenderQueue(model=TEXT_TO_IMAGE_MODEL).order):
        for raw in r.lrange(queue, 0, -1):
            args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
            job_id = args[0]
            assert r.exists(f"editfarm:job:{job_id}")


def test_an_image_the_api_takes_in_but_that_does_not_decode_fails_its_job_not_the_worker(
        cluster: LocalCluster) -> None:
    """The API checks a PNG's chunks, not its pixels: one with intact chunks and corrupt compressed
    data is accepted, then the worker's full decode refuses it before any render: a clean failed
    job with a code the tenant can act on, and the worker goes on with the next job."""
    bad = submit_json(cluster, image=data_url(png_with_corrupt_pixels()))
    assert bad.status_code == 202, bad.text
    failed = wait_terminal(cluster.api_url, bad.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "input_unreadable", failed
    assert "/" not in failed["error"]["message"] and "Traceback" not in failed["error"]["message"]
    assert failed["outputs"] == []
    good = submit_json(cluster)
    assert good.status_code == 202, good.text
    assert wait_terminal(cluster.api_url, good.json()["id"])["status"] == "succeeded"


def test_requests_without_a_valid_key_are_401(cluster: LocalCluster) -> None:
    url = f"{cluster.api_url}/v1/jobs"
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"}):
        response = httpx.post(url, json={"prompt": "p"}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_an_unknown_job_and_another_tenants_job_are_the_same_404(cluster: LocalCluster) -> None:
    job_id = submit_json(cluster).json()["id"]
    unknown = httpx.get(f"{cluster.api_url}/v1/jobs/job_doesnotexist", headers=auth("acme"), timeout=10)
    foreign = httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}", headers=auth("globex"), timeout=10)
    assert unknown.status_code == foreign.status_code == 404
    assert unknown.json()["error"]["code"] == foreign.json()["error"]["code"] == "not_found"
    assert job_id not in foreign.text


def test_health_and_readiness_answer(cluster: LocalCluster) -> None:
    assert httpx.get(f"{cluster.api_url}/healthz").status_code == 200
    assert httpx.get(f"{cluster.api_url}/readyz").status_code == 200
    assert "/v1/jobs" in httpx.get(f"{cluster.api_url}/openapi.json").json()["paths"]
