"""Strict priority across the render lane's lookahead, with a real render worker (issue 16.8).

One render worker (Celery prefork, the render stand-in: every job holds the device for
``RENDER_S`` seconds, spread over its steps) behind the real API, Redis and S3 server. The
outside review's sequence: the worker busy on a 40-step job, two ``low`` jobs, then a ``high``
one a second later, then the running job canceled. The ``high`` job must start first, whatever
the worker had already taken from the broker into its render lane.

Every test runs twice: on a fleet (editfarm_testing/catalog.py: the worker serves ``qwen-image-edit``,
so the gate reads ``render.qwen-image-edit.*`` and ``editfarm:queued:qwen-image-edit:*``), and on a
one-model cluster (``EDITFARM_MODEL`` alone: jobs carry the model ``default``, queues ``render.high``…),
the upgrade path's end-to-end test of the legacy names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from broker.keys import LEGACY_MODEL
from broker.queues import RenderQueue
from cli.cluster import ClusterConfig, LocalCluster
from cli.localservices import wait_until
from editfarm_testing.catalog import EDIT_MODEL, fleet_catalog
from tests.e2e_support import API_KEYS, auth, data_url, png_bytes, wait_terminal

pytestmark = pytest.mark.integration

RENDER_S = 4.0  # every stand-in job holds its worker this long, spread over its steps
ENV = {"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": repr(RENDER_S),
       # the lane takes the next job 2 s before the end: wide enough a window to act in under load
       "EDITFARM_LANE_LEAD_S": "2", "EDITFARM_GIVE_WAY_WAIT_S": "8"}


# the model the render workers serve, per cluster mode
MODEL = {"fleet": EDIT_MODEL, "legacy": LEGACY_MODEL}


@pytest.fixture(scope="module", params=["fleet", "legacy"])
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp(f"priority-{request.param}")
    if request.param == "fleet":  # the stand-in loads nothing: any source
        config = ClusterConfig(workdir=workdir, api_keys=API_KEYS, extra_env=ENV,
                               **fleet_catalog(workdir, edit_source="/nowhere/standin"))
    else:
        config = ClusterConfig(workdir=workdir, model="standin", api_keys=API_KEYS, render_workers=1, extra_env=ENV)
    with LocalCluster(config) as running:
        yield running


def model_of(cluster: LocalCluster) -> str:
    """The model the cluster's render workers serve (every job here runs on it)."""
    return MODEL["fleet" if cluster.config.models_file is not None else "legacy"]


def start_another_worker(cluster: LocalCluster, index: int) -> str:
    model = model_of(cluster)
    return cluster.start_render_worker(index, model=None if model == LEGACY_MODEL else model)


def submit(cluster: LocalCluster, steps: int, priority: str = "normal") -> str:
    body = {"operation": "edit", "prompt": "p", "image": data_url(png_bytes()), "seed": 1, "steps": steps,
            "priority": priority}
    response = httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def get(cluster: LocalCluster, job_id: str) -> dict:  # type: ignore[type-arg]
    return dict(httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}", headers=auth(), timeout=10).json())


def wait_rendering(cluster: LocalCluster, job_id: str) -> None:
    wait_until(lambda: get(cluster, job_id)["progress"]["step"] >= 1, 60, f"job {job_id}", interval_s=0.05)


def cancel(cluster: LocalCluster, job_id: str) -> None:
    response = httpx.post(f"{cluster.api_url}/v1/jobs/{job_id}/cancel", headers=auth(), timeout=10)
    assert response.status_code == 200, response.text


def started_order(cluster: LocalCluster, job_ids: list[str]) -> list[str]:
    started = {job_id: wait_terminal(cluster.api_url, job_id)["started_at"] for job_id in job_ids}
    assert all(started.values()), started
    return sorted(job_ids, key=lambda job_id: started[job_id])


def test_a_high_job_queued_behind_two_low_ones_starts_first_when_the_running_job_is_canceled(
        cluster: LocalCluster) -> None:
    running = submit(cluster, steps=40)
    wait_rendering(cluster, running)
    low1, low2 = submit(cluster, 2, "low"), submit(cluster, 2, "low")
    time.sleep(1.0)
    high = submit(cluster, 2, "high")
    cancel(cluster, running)
    assert started_order(cluster, [low1, low2, high]) == [high, low1, low2]
    assert get(cluster, running)["status"] == "canceled"
    assert {get(cluster, job_id)["model"] for job_id in (running, low1, low2, high)} == {model_of(cluster)}


def test_a_high_job_queued_while_the_running_job_nears_its_end_starts_before_the_low_ones(
        cluster: LocalCluster) -> None:
    # the low job is taken into the render lane near the end of the running render (lane_lead_s);
    # a high one queued before the device frees must still go first
    running = submit(cluster, steps=40)
    wait_rendering(cluster, running)
    low1, low2 = submit(cluster, 2, "low"), submit(cluster, 2, "low")
    wait_until(lambda: get(cluster, running)["progress"]["step"] >= 34, 60, "the running job's end",
               interval_s=0.02)
    high = submit(cluster, 2, "high")
    assert started_order(cluster, [running, low1, low2, high]) == [running, high, low1, low2]


def test_jobs_of_one_priority_still_start_in_submission_order(cluster: LocalCluster) -> None:
    running = submit(cluster, steps=40)
    wait_rendering(cluster, running)
    jobs = [submit(cluster, 2, "normal") for _ in range(3)]
    cancel(cluster, running)
    assert started_order(cluster, jobs) == jobs


def test_a_low_job_does_not_start_while_a_high_one_waits_in_another_workers_lane(cluster: LocalCluster) -> None:
    # two workers: the first to near its render's end takes the high job into its lane (its message
    # leaves the list, the job stays queued); the other one's running job is canceled then, and it
    # takes the low job with its device free. The low job must wait for the high one to start.
    second = start_another_worker(cluster, 1)
    try:
        cluster.wait_worker_ready(second)
        first_running = submit(cluster, steps=40)
        wait_rendering(cluster, first_running)
        other_running = submit(cluster, steps=40)
        wait_rendering(cluster, other_running)
        low, high = submit(cluster, 2, "low"), submit(cluster, 2, "high")
        broker = redis.Redis.from_url(cluster.redis_url)
        high_queue = RenderQueue(model=model_of(cluster)).names["high"]
        wait_until(lambda: broker.llen(high_queue) == 0, 60, "the high job taken into a lane",
                   interval_s=0.01)
        assert get(cluster, high)["status"] == "queued"  # taken early, waiting for that worker's device
        cancel(cluster, other_running)
        assert started_order(cluster, [high, low]) == [high, low]
        assert get(cluster, first_running)["status"] == "succeeded"
    finally:
        cluster.stop_process(second)


@pytest.fixture(autouse=True)
def _settle(cluster: LocalCluster) -> Iterator[None]:
    yield
    # leave no job of one test on the device for the next one
    wait_until(lambda: not httpx.get(f"{cluster.api_url}/v1/jobs?status=queued,running", headers=auth(),
                                     timeout=10).json()["data"], 60, "an idle cluster", interval_s=0.2)



