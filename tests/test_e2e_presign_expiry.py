"""A job's presigned output URL stops working once its expiry has passed (SeaweedFS checks it; moto never did).

The session's ordinary cluster renders one job; a second API process on the same Redis and S3
server, with ``EDITFARM_PRESIGN_EXPIRY_S=2``, hands out its output URL.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from cli.cluster import ROOT, LocalCluster
from cli.localservices import free_port, wait_until
from tests.e2e_support import auth, data_url, png_bytes, wait_terminal

pytestmark = pytest.mark.integration

EXPIRY_S = 2


@pytest.fixture(scope="module")
def short_lived_api(shared_cluster: LocalCluster) -> Iterator[str]:
    """An API process like the cluster's own, whose presigned URLs live ``EXPIRY_S`` seconds."""
    port = free_port()
    log = open(shared_cluster.workdir / "logs" / "api-short-presign.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env={**shared_cluster.env, "EDITFARM_PRESIGN_EXPIRY_S": str(EXPIRY_S)},
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
                   60, "short-presign API")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_an_output_url_stops_working_after_its_expiry_and_a_fresh_get_signs_a_new_one(
        shared_cluster: LocalCluster, short_lived_api: str) -> None:
    body = {"operation": "edit", "prompt": "p", "image": data_url(png_bytes()), "seed": 3, "steps": 2}
    answer = httpx.post(f"{shared_cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)
    assert answer.status_code == 202, answer.text
    done = wait_terminal(shared_cluster.api_url, answer.json()["id"])
    assert done["status"] == "succeeded", done

    job = httpx.get(f"{short_lived_api}/v1/jobs/{done['id']}", headers=auth(), timeout=10).json()
    [output] = job["outputs"]
    assert f"X-Amz-Expires={EXPIRY_S}&" in output["url"]
    fresh = httpx.get(output["url"], timeout=10)
    assert fresh.status_code == 200 and fresh.headers["content-type"] == "image/png"

    time.sleep(EXPIRY_S + 1.2)  # SigV4 expiry has one-second resolution
    late = httpx.get(output["url"], timeout=10)
    assert late.status_code == 403
    assert late.content != fresh.content

    again = httpx.get(f"{short_lived_api}/v1/jobs/{done['id']}", headers=auth(), timeout=10).json()
    assert httpx.get(again["outputs"][0]["url"], timeout=10).content == fresh.content
    # the cluster's own API (the default day-long expiry) still serves the same object
    ordinary = httpx.get(f"{shared_cluster.api_url}/v1/jobs/{done['id']}", headers=auth(), timeout=10).json()
    assert httpx.get(ordinary["outputs"][0]["url"], timeout=10).content == fresh.content
