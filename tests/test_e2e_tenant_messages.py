"""No internals reach a tenant, end to end through a real local cluster (issue 16.5).

Real failures: a LoRA file that is not a safetensors file (the worker caches it under its own
path and the pipeline refuses it), a LoRA URL whose host speaks plain HTTP where https is
expected, and webhooks to a loopback port that speaks plain HTTP (TLS fails) or refuses. What
the tenant reads (the job, its event stream, its delivery log) is checked with the same
``assert_for_tenant`` as the unit cases.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest

from cli.cluster import LocalCluster
from editfarm_testing.webhooks import Reply, WebhookReceiver
from tests.e2e_support import auth, wait_terminal
from tests.test_tenant_messages import assert_for_tenant

pytestmark = pytest.mark.integration

GENERATE = {"operation": "generate", "prompt": "a red ball", "width": 64, "height": 48, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def plain_http_port() -> Iterator[int]:
    """A loopback port answering plain HTTP 200 to anything (where the URLs below say https)."""
    with WebhookReceiver(reply=lambda delivery: Reply(200)) as receiver:
        yield receiver.port


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _submit(cluster: LocalCluster, **fields: object) -> str:
    response = httpx.post(f"{cluster.api_url}/v1/jobs", json={**GENERATE, **fields}, headers=auth(), timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _events(cluster: LocalCluster, job_id: str) -> str:
    """The job's event stream; the job has ended, so it is its status and ``done``, then it closes."""
    response = httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}/events", headers=auth(), timeout=30)
    assert response.status_code == 200
    return response.text


def _deliveries(cluster: LocalCluster, job_id: str, attempts: int = 1, timeout_s: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}/deliveries", headers=auth(), timeout=10)
        data = response.json()["data"]
        if data and len(data[0]["attempts"]) >= attempts:
            return list(data)
        assert time.monotonic() < deadline, data
        time.sleep(0.2)


def test_failed_lora_jobs_and_deliveries_show_the_tenant_codes_and_sentences_only(
        shared_cluster: LocalCluster, plain_http_port: int, refused_port: int) -> None:
    s3 = boto3.client("s3", endpoint_url=shared_cluster.s3_url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.put_object(Bucket="editfarm", Key="loras/not-a-lora.safetensors", Body=b"\x00" * 64 + b"not safetensors")
    bad_file = _submit(shared_cluster, loras=[{"uri": "s3://editfarm/loras/not-a-lora.safetensors"}],
                       webhook=f"https://127.0.0.1:{plain_http_port}/hook")
    bad_url = _submit(shared_cluster, loras=[{"uri": f"https://127.0.0.1:{plain_http_port}/style.safetensors"}],
                      webhook=f"https://127.0.0.1:{refused_port}/hook")

    file_job = wait_terminal(shared_cluster.api_url, bad_file)
    url_job = wait_terminal(shared_cluster.api_url, bad_url)

    assert file_job["status"] == "failed" and file_job["error"]["code"] == "invalid_input", file_job
    assert "LoRA" in file_job["error"]["message"]
    assert url_job["status"] == "failed" and url_job["error"]["code"] == "input_unreadable", url_job
    assert "tls_failed" in url_job["error"]["message"]
    file_hook, url_hook = _deliveries(shared_cluster, bad_file), _deliveries(shared_cluster, bad_url)
    assert file_hook[0]["attempts"][0]["error"].startswith("tls_failed: ")
    assert url_hook[0]["attempts"][0]["error"].startswith("connection_refused: ")
    listing = httpx.get(f"{shared_cluster.api_url}/v1/jobs", headers=auth(), timeout=10).json()
    assert_for_tenant(file_job, url_job, _events(shared_cluster, bad_file), _events(shared_cluster, bad_url),
                      file_hook, url_hook, listing)
