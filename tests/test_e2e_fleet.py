"""A fleet of two pools (issue 14), real processes: the API, Redis, SeaweedFS, the webhook worker and one
render worker per model (the render stand-in: each job holds its worker ``RENDER_S`` seconds), each
consuming only its model's queues.

Routing (the job record names the worker node that ran it), a model with no worker (its jobs wait,
queued, until one starts), one pool's worker killed mid-render (the other pool's jobs untouched, the
killed job ends exactly once), strict priority within a model and none across models.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from broker.jobstore import RedisJobStore
from cli.cluster import ClusterConfig, LocalCluster
from cli.localservices import wait_until
from tests.e2e_support import API_KEYS, auth, data_url, png_bytes, wait_terminal

pytestmark = pytest.mark.integration

RENDER_S = 2.0
ENV = {"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": repr(RENDER_S),
       # a killed worker's job is taken over within seconds (see tests/test_faults.py)
       "EDITFARM_LEASE_S": "3", "EDITFARM_HEARTBEAT_INTERVAL_S": "0.5", "EDITFARM_REAPER_INTERVAL_S": "0.5",
       "EDITFARM_VISIBILITY_TIMEOUT_S": "5", "EDITFARM_UNACKED_RESTORE_INTERVAL_S": "1",
       "EDITFARM_LANE_LEAD_S": "1", "EDITFARM_GIVE_WAY_WAIT_S": "4"}
CATALOG = """
models:
  - name: t2i
    source: /nowhere/t2i           # the stand-in loads nothing
    pipeline: QwenImagePipeline
    operations: [generate]
  - name: edit
    source: /nowhere/edit
    pipeline: QwenImageEditPipeline
    operations: [edit]
  - name: lightning                # no pool: its jobs wait until a worker for it starts
    source: /nowhere/t2i
    pipeline: QwenImagePipeline
    operations: [generate]
    defaults: {steps: 8}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("fleet")
    catalog = workdir / "models.yaml"
    catalog.write_text(CATALOG.replace("operations: [generate]\n  - name: edit",
                                       "operations: [generate]\n    default_for: [generate]\n  - name: edit"))
    config = ClusterConfig(workdir=workdir, models_file=catalog, render_pools={"t2i": 1, "edit": 1},
                           api_keys=API_KEYS, extra_env=ENV)
    with LocalCluster(config) as running:
        yield running


def submit(cluster: LocalCluster, operation: str = "edit", steps: int = 4, priority: str = "normal",
           model: str | None = None) -> str:
    body: dict[str, Any] = {"operation": operation, "prompt": "p", "seed": 1, "steps": steps, "priority": priority}
    if operation == "edit":
        body["image"] = data_url(png_bytes())
    if model is not None:
        body["model"] = model
    response = httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def get(cluster: LocalCluster, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}", headers=auth(), timeout=10).json())


def node(cluster: LocalCluster, job_id: str) -> str:
    """The Celery node that ran the job, from its record (``<node>/<instance of that start>``)."""
    job = RedisJobStore(redis.Redis.from_url(cluster.redis_url)).get(job_id)
    assert job is not None and job.worker is not None
    return job.worker.split("/")[0]


def models(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    listing = httpx.get(f"{cluster.api_url}/v1/models", headers=auth(), timeout=10).json()
    return {m["name"]: m["state"] for m in listing["data"]}


def wait_rendering(cluster: LocalCluster, job_id: str) -> None:
    wait_until(lambda: get(cluster, job_id)["progress"]["step"] >= 1, 60, f"job {job_id}", interval_s=0.05)


def started_order(cluster: LocalCluster, job_ids: list[str]) -> list[str]:
    started = {job_id: wait_terminal(cluster.api_url, job_id)["started_at"] for job_id in job_ids}
    assert all(started.values()), started
    return sorted(job_ids, key=lambda job_id: started[job_id])


@pytest.fixture(autouse=True)
def _settle(cluster: LocalCluster) -> Iterator[None]:
    yield
    wait_until(lambda: not httpx.get(f"{cluster.api_url}/v1/jobs?status=queued,running", headers=auth(),
                                     timeout=10).json()["data"], 90, "an idle cluster", interval_s=0.2)


def test_each_operation_goes_to_its_models_pool(cluster: LocalCluster) -> None:
    generate, edit = submit(cluster, "generate"), submit(cluster, "edit")
    for job_id, model in ((generate, "t2i"), (edit, "edit")):
        done = wait_terminal(cluster.api_url, job_id)
        assert done["status"] == "succeeded" and done["model"] == model, done
    assert node(cluster, generate) == "render0-t2i@local"
    assert node(cluster, edit) == "render1-edit@local"
    state = models(cluster)
    assert state["t2i"]["workers_ready"] == state["edit"]["workers_ready"] == 1
    assert state["lightning"]["workers_ready"] == 0
    assert state["edit"]["median_render_s"] is not None and state["edit"]["median_render_s"] >= RENDER_S * 0.5


def test_a_job_for_a_model_without_a_worker_waits_queued_until_one_starts(cluster: LocalCluster) -> None:
    job_id = submit(cluster, "generate", model="lightning")
    assert get(cluster, job_id)["params"]["steps"] == 4  # set by the job: the model's 8 is only a default
    time.sleep(3 * RENDER_S)  # both pools idle all along: neither may take it
    assert get(cluster, job_id)["status"] == "queued"
    assert models(cluster)["lightning"] == {"workers_ready": 0, "queued": 1, "running": 0, "median_render_s": None}
    worker = cluster.start_render_worker(5, model="lightning")
    try:
        cluster.wait_worker_ready(worker)
        done = wait_terminal(cluster.api_url, job_id)
        assert done["status"] == "succeeded" and done["attempts"] == 1
        assert node(cluster, job_id) == "render5-lightning@local"
    finally:
        cluster.stop_process(worker)


def test_killing_one_pools_worker_mid_render_leaves_the_other_pool_alone(cluster: LocalCluster) -> None:
    killed = submit(cluster, "edit", steps=40)
    wait_rendering(cluster, killed)
    others = [submit(cluster, "generate") for _ in range(3)]
    cluster.stop_process("render1", sig=signal.SIGKILL)  # the edit pool's only worker, mid-render
    for job_id in others:
        done = wait_terminal(cluster.api_url, job_id)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert node(cluster, job_id) == "render0-t2i@local"
    assert get(cluster, killed)["status"] in {"running", "queued"}  # its pool has no worker now
    cluster.start_render_worker(1, model="edit")
    cluster.wait_worker_ready("render1")
    done = wait_terminal(cluster.api_url, killed)
    assert done["status"] == "succeeded" and done["attempts"] == 2 and len(done["outputs"]) == 1, done
    # exactly once: one output object, one terminal transition (its attempts were not bumped again)
    time.sleep(2)
    assert get(cluster, killed)["attempts"] == 2


def test_priority_is_strict_within_a_model(cluster: LocalCluster) -> None:
    running = submit(cluster, "edit", steps=20)
    wait_rendering(cluster, running)
    low1, low2 = submit(cluster, "edit", 2, "low"), submit(cluster, "edit", 2, "low")
    high = submit(cluster, "edit", 2, "high")
    assert started_order(cluster, [low1, low2, high]) == [high, low1, low2]


def test_a_job_of_one_model_never_waits_on_another_models_queue(cluster: LocalCluster) -> None:
    # the edit pool busy, with high jobs queued behind: a low text-to-image job starts at once on its own
    # pool (its worker does not give way to another model's higher jobs)
    running = submit(cluster, "edit", steps=20)
    wait_rendering(cluster, running)
    highs = [submit(cluster, "edit", 2, "high") for _ in range(2)]
    low = submit(cluster, "generate", 2, "low")
    # a worker that counted the other model's queued highs would give way (EDITFARM_GIVE_WAY_WAIT_S, twice)
    # and start the low job after them
    done = {job_id: wait_terminal(cluster.api_url, job_id) for job_id in [running, low, *highs]}
    assert all(job["status"] == "succeeded" for job in done.values())
    assert done[low]["started_at"] < done[running]["finished_at"]  # while the edit pool was still busy
    assert all(done[low]["started_at"] < done[high]["started_at"] for high in highs)
