"""Retention end to end, real processes: the API, a stand-in render worker and the webhook worker
(whose sweeper thread deletes finished jobs) on real Redis and the real S3 server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from broker import keys
from cli.cluster import ClusterConfig, LocalCluster
from editfarm_testing.catalog import fleet_catalog
from tests.e2e_support import API_KEYS, auth, wait_terminal

pytestmark = pytest.mark.integration

ENV = {"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": "0", "EDITFARM_ARCHIVE_JOBS": "true",
       "EDITFARM_RETENTION_SWEEP_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("retention")  # a fleet (editfarm_testing/catalog.py) of stand-ins
    config = ClusterConfig(workdir=workdir, api_keys=API_KEYS, extra_env=ENV,
                           **fleet_catalog(workdir, edit_source="/nowhere/standin"))
    with LocalCluster(config) as running:
        running.wait_worker_ready("render0", timeout_s=120)
        yield running


def _without_signatures(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "outputs": [{**o, "url": o["url"].split("?")[0]} for o in body["outputs"]]}


def test_a_finished_job_leaves_redis_and_is_read_from_the_archive(cluster: LocalCluster) -> None:
    client = redis.Redis.from_url(cluster.redis_url)
    submitted = httpx.post(f"{cluster.api_url}/v1/jobs", headers=auth("acme"), timeout=30, json={
        "operation": "generate", "prompt": "a purple sky", "width": 256, "height": 256, "steps": 2,
        "retention_s": 2})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.json()["params"]["retention_s"] == 2
    live = wait_terminal(cluster.api_url, job_id)
    assert live["status"] == "succeeded" and live["outputs"]

    deadline = time.monotonic() + 60
    while client.exists(keys.job(job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not client.exists(keys.job(job_id)), "the sweeper never deleted the finished job"
    assert client.zscore(keys.tenant_jobs("acme"), job_id) is None
    assert client.zscore(keys.EXPIRY, job_id) is None

    archived = httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}", headers=auth("acme"), timeout=30)
    assert archived.status_code == 200
    assert _without_signatures(archived.json()) == _without_signatures(live)
    output = httpx.get(archived.json()["outputs"][0]["url"], timeout=30)
    assert output.status_code == 200 and len(output.content) == live["outputs"][0]["size_bytes"]
    assert httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}", headers=auth("globex"), timeout=30).status_code == 404
    listed = httpx.get(f"{cluster.api_url}/v1/jobs", headers=auth("acme"), timeout=30).json()
    assert job_id not in [j["id"] for j in listed["data"]] and listed["includes_archived"] is False


def test_a_longer_retention_than_the_tenants_is_refused(cluster: LocalCluster) -> None:
    refused = httpx.post(f"{cluster.api_url}/v1/jobs", headers=auth("acme"), timeout=30, json={
        "operation": "generate", "prompt": "a purple sky", "width": 256, "height": 256,
        "retention_s": 8 * 24 * 3600})
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "invalid_parameter"
    assert refused.json()["error"]["param"] == "retention_s"
