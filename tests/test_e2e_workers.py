"""Production worker behaviour with real processes: cancel, priorities, timeouts, crashes, the
visibility timeout, progress streams, Flower and metrics.

Two render workers (Celery prefork, the tiny Qwen-Image-Edit pipeline), a webhook
worker running the reaper, the API, Redis and the S3 server; short leases and a
5 s visibility timeout so the failure paths happen within a test. A fleet
(editfarm_testing/catalog.py): both workers serve ``qwen-image-edit``, so the queues, indexes,
node names and metric labels are the per-model ones (tests/test_e2e_priority.py keeps a
one-model cluster's legacy names covered end to end).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from broker import keys
from cli.cluster import ROOT, ClusterConfig, LocalCluster
from cli.localservices import free_port, wait_until
from editfarm_testing.catalog import EDIT_MODEL, TEXT_TO_IMAGE_MODEL, fleet_catalog, legacy_render_keys
from editfarm_testing.cluster import process_log, worker_child_pid
from editfarm_testing.webhooks import ByJob, WebhookReceiver
from tests.e2e_support import API_KEYS, auth, data_url, png_bytes, wait_terminal

pytestmark = pytest.mark.integration

FAST_FAILOVER = {
    "EDITFARM_LEASE_S": "3", "EDITFARM_HEARTBEAT_INTERVAL_S": "0.5", "EDITFARM_REAPER_INTERVAL_S": "0.5",
    "EDITFARM_VISIBILITY_TIMEOUT_S": "5", "EDITFARM_UNACKED_RESTORE_INTERVAL_S": "1",
    "EDITFARM_WEBHOOK_RETRY_SCHEDULE_S": "0,0.5,1,2",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("workers")
    config = ClusterConfig(workdir=workdir, api_keys=API_KEYS, extra_env=FAST_FAILOVER,
                           **fleet_catalog(workdir, edit_source=tiny_model, edit_workers=2))
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def hooks() -> Iterator[ByJob]:
    with WebhookReceiver() as receiver:
        yield ByJob(receiver)


def submit(cluster: LocalCluster, steps: int = 2, **fields: object) -> dict:  # type: ignore[type-arg]
    body = {"operation": "edit", "prompt": "p", "image": data_url(png_bytes()), "seed": 1, "steps": steps,
            **fields}
    response = httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=30)
    assert response.status_code == 202, response.text
    return dict(response.json())


def get(cluster: LocalCluster, job_id: str) -> dict:  # type: ignore[type-arg]
    return dict(httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}", headers=auth(), timeout=10).json())


def wait_for(cluster: LocalCluster, job_id: str, check, timeout_s: float = 60) -> dict:  # type: ignore[no-untyped-def,type-arg]
    box: dict = {}  # type: ignore[type-arg]

    def probe() -> bool:
        box["job"] = get(cluster, job_id)
        return bool(check(box["job"]))
    wait_until(probe, timeout_s, f"job {job_id}", interval_s=0.1)
    return box["job"]


def busy(cluster: LocalCluster, count: int = 2, steps: int = 60) -> list[str]:
    """Occupy every render worker with a long job; returns their ids (cancel them when done)."""
    ids = [submit(cluster, steps=steps)["id"] for _ in range(count)]
    for job_id in ids:
        wait_for(cluster, job_id, lambda j: j["progress"]["step"] >= 1)
    return ids


def cancel(cluster: LocalCluster, job_id: str) -> httpx.Response:
    return httpx.post(f"{cluster.api_url}/v1/jobs/{job_id}/cancel", headers=auth(), timeout=10)


def test_canceling_a_queued_job_ends_it_at_once_and_it_never_reaches_the_gpu(
        cluster: LocalCluster, hooks: ByJob) -> None:
    blockers = busy(cluster)
    queued = submit(cluster, webhook=hooks.receiver.url)
    assert get(cluster, queued["id"])["queue_position"] == 0
    response = cancel(cluster, queued["id"])
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert cancel(cluster, queued["id"]).status_code == 409
    for job_id in blockers:
        cancel(cluster, job_id)
    time.sleep(3)  # the canceled job's message reaches a worker now, and must be dropped there
    final = get(cluster, queued["id"])
    assert final["status"] == "canceled" and final["started_at"] is None and final["attempts"] == 0
    [delivery] = hooks.for_job(queued["id"])
    assert json.loads(delivery.body)["type"] == "job.canceled"


def test_a_jobs_queued_and_running_places_are_its_models_keys(cluster: LocalCluster) -> None:
    blockers = busy(cluster)
    waiting = submit(cluster, priority="high")["id"]
    r = redis.Redis.from_url(cluster.redis_url)
    try:
        assert r.zscore(keys.queued("high", EDIT_MODEL), waiting) is not None
        assert set(blockers) <= {j.decode() for j in r.lrange(keys.inflight(EDIT_MODEL), 0, -1)}
        assert not [k for k in legacy_render_keys() if r.exists(k)]  # nothing under the one-model names
    finally:
        for job_id in blockers:
            cancel(cluster, job_id)
    assert wait_terminal(cluster.api_url, waiting)["status"] == "succeeded"
    assert r.zscore(keys.queued("high", EDIT_MODEL), waiting) is None
    assert not {j.decode() for j in r.lrange(keys.inflight(EDIT_MODEL), 0, -1)} & {waiting, *blockers}


def test_canceling_a_running_job_stops_it_at_the_next_step(cluster: LocalCluster, hooks: ByJob) -> None:
    job = submit(cluster, steps=60, webhook=hooks.receiver.url)
    wait_for(cluster, job["id"], lambda j: j["progress"]["step"] >= 2)
    assert cancel(cluster, job["id"]).status_code == 200
    step_at_cancel = get(cluster, job["id"])["progress"]["step"]
    time.sleep(2)
    final = get(cluster, job["id"])
    assert final["status"] == "canceled"
    assert final["progress"]["step"] <= step_at_cancel + 1  # at most the step in flight finished
    assert [json.loads(d.body)["type"] for d in hooks.for_job(job["id"])] == ["job.canceled"]


def test_high_priority_jobs_start_before_normal_and_low_ones(cluster: LocalCluster) -> None:
    blockers = busy(cluster)
    low = submit(cluster, priority="low")["id"]
    normal = submit(cluster, priority="normal")["id"]
    high = submit(cluster, priority="high")["id"]
    assert [get(cluster, j)["queue_position"] for j in (high, normal, low)] == [0, 1, 2]
    for job_id in blockers:
        cancel(cluster, job_id)
    started = {j: wait_terminal(cluster.api_url, j)["started_at"] for j in (high, normal, low)}
    assert started[high] <= started[normal] <= started[low]


def test_a_job_past_its_timeout_fails_with_code_timeout(cluster: LocalCluster) -> None:
    job = submit(cluster, steps=80, timeout_s=2)
    final = wait_terminal(cluster.api_url, job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "timeout"
    assert final["progress"]["step"] < 80


def test_a_job_whose_worker_is_killed_mid_render_ends_once_with_one_webhook(
        cluster: LocalCluster, hooks: ByJob) -> None:
    job = submit(cluster, steps=24, webhook=hooks.receiver.url)
    wait_for(cluster, job["id"], lambda j: j["progress"]["step"] >= 2)
    pids = {name: worker_child_pid(cluster, name) for name in ("render0", "render1")}
    r = redis.Redis.from_url(cluster.redis_url)
    holder = json.loads(r.hget(f"editfarm:job:{job['id']}", "worker") or b'""')
    victim = "render0" if holder.startswith("render0") else "render1"
    os.kill(pids[victim], signal.SIGKILL)
    final = wait_terminal(cluster.api_url, job["id"], timeout_s=120)
    assert final["status"] == "succeeded" and final["attempts"] == 2
    assert [json.loads(d.body)["type"] for d in hooks.for_job(job["id"], settle_s=2)] == ["job.succeeded"]
    cluster.wait_worker_ready(victim, timeout_s=120)  # Celery replaced the killed child


def test_a_job_longer_than_the_visibility_timeout_runs_once(cluster: LocalCluster, hooks: ByJob) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    pubsub = r.pubsub()
    job = submit(cluster, steps=40, webhook=hooks.receiver.url)  # ~10 s, twice the visibility timeout
    pubsub.subscribe(f"editfarm:events:{job['id']}")
    final = wait_terminal(cluster.api_url, job["id"], timeout_s=120)
    time.sleep(6)  # the redelivered copy has had time to arrive and be dropped
    starts = []
    while (message := pubsub.get_message(timeout=0.1)) is not None:
        if message["type"] == "message":
            event = json.loads(message["data"])
            if event["type"] == "status" and event["data"]["status"] == "running":
                starts.append(event)
    assert final["status"] == "succeeded" and final["attempts"] == 1
    assert len(starts) <= 1  # subscribed after submit: the one start may predate the subscription
    assert len(hooks.for_job(job["id"], settle_s=2)) == 1
    worker_logs = process_log(cluster, "render0") + process_log(cluster, "render1")
    assert worker_logs.count(job["id"]) >= 1


def test_the_event_stream_gives_state_first_then_progress_then_done(cluster: LocalCluster) -> None:
    job = submit(cluster, steps=6)
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    with httpx.stream("GET", f"{cluster.api_url}/v1/jobs/{job['id']}/events", headers=auth(),
                      timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((name, json.loads(line.split(":", 1)[1])))
                if name == "done":
                    break
    names = [n for n, _ in events]
    assert names[0] == "status" and names[-1] == "done"
    assert "progress" in names
    previews = [d for n, d in events if n == "preview"]  # the cluster asks for one every 2 steps
    assert previews and all(p["url"].startswith("http") for p in previews)
    assert httpx.get(previews[0]["url"]).content[:3] == b"\xff\xd8\xff"  # a JPEG
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    assert events[-1][1]["status"] == "succeeded"


def test_a_late_client_of_a_finished_job_gets_the_final_state_and_the_stream_ends(
        cluster: LocalCluster) -> None:
    job = submit(cluster)
    wait_terminal(cluster.api_url, job["id"])
    response = httpx.get(f"{cluster.api_url}/v1/jobs/{job['id']}/events", headers=auth(), timeout=30)
    assert "event: status" in response.text and "event: done" in response.text


def labelled(text: str, sample: str) -> list[dict[str, str]]:
    """The label sets of every ``sample`` (e.g. ``editfarm_jobs_total``) in a Prometheus exposition."""
    return [dict(s.labels) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == sample]


def test_metrics_of_the_api_and_every_worker_expose_the_cluster(cluster: LocalCluster) -> None:
    wait_terminal(cluster.api_url, submit(cluster)["id"])
    api = httpx.get(f"{cluster.api_url}/metrics").text
    # every model of the catalog, the one without a worker too
    assert {"model": TEXT_TO_IMAGE_MODEL, "priority": "high"} in labelled(api, "editfarm_queue_depth")
    assert {"model": EDIT_MODEL, "priority": "high"} in labelled(api, "editfarm_queue_depth")
    assert {"model": EDIT_MODEL} in labelled(api, "editfarm_jobs_running")
    assert {"model": EDIT_MODEL, "status": "submitted"} in labelled(api, "editfarm_jobs_total")
    rendered = ""
    for name in ("render0", "render1"):
        rendered += httpx.get(f"http://127.0.0.1:{cluster.metrics_ports[name]}/metrics").text
    assert {"model": EDIT_MODEL, "status": "succeeded"} in labelled(rendered, "editfarm_jobs_total")
    assert {"model": EDIT_MODEL, "le": "600.0"} in labelled(rendered, "editfarm_render_seconds_bucket")
    assert "editfarm_render_seconds_bucket" in rendered and "editfarm_queue_wait_seconds_bucket" in rendered
    assert 'le="600.0"' in rendered  # buckets reach minutes
    hooks_metrics = httpx.get(f"http://127.0.0.1:{cluster.metrics_ports['webhooks']}/metrics").text
    assert "editfarm_webhook_deliveries_total" in hooks_metrics


def test_flower_shows_the_workers_behind_basic_auth(cluster: LocalCluster) -> None:
    port = free_port()
    env = {**cluster.env, "FLOWER_BASIC_AUTH": "ops:s3cret"}
    log = open(cluster.workdir / "logs" / "flower.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "flower", "--port", str(port),
                             "--address", "127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/api/workers"

        def workers_listed() -> bool:
            response = httpx.get(url, auth=("ops", "s3cret"), timeout=5)
            return response.status_code == 200 and f"render0-{EDIT_MODEL}@local" in response.text
        wait_until(workers_listed, 60, "flower")
        assert httpx.get(url, timeout=5).status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)


def test_sigterm_lets_the_running_job_finish_and_takes_no_new_one(cluster: LocalCluster) -> None:
    job = submit(cluster, steps=16)
    wait_for(cluster, job["id"], lambda j: j["progress"]["step"] >= 1)
    r = redis.Redis.from_url(cluster.redis_url)
    holder = json.loads(r.hget(f"editfarm:job:{job['id']}", "worker") or b'""')
    name = "render0" if holder.startswith("render0") else "render1"
    code = cluster.stop_process(name, signal.SIGTERM, timeout_s=120, group=False)
    assert code == 0
    final = get(cluster, job["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 1
    cluster.start_render_worker(int(name[-1]), model=EDIT_MODEL)
    cluster.wait_worker_ready(name)


def test_a_drain_window_that_runs_out_hands_the_job_to_another_worker(cluster: LocalCluster) -> None:
    name = cluster.start_render_worker(2, {"EDITFARM_DRAIN_TIMEOUT_S": "1"}, model=EDIT_MODEL)
    cluster.wait_worker_ready(name)
    others = ("render0", "render1")
    for other in others:  # only the short-drain worker may take the next job
        cluster.stop_process(other, signal.SIGTERM, timeout_s=120, group=False)
    try:
        job = submit(cluster, steps=40)
        wait_for(cluster, job["id"], lambda j: j["progress"]["step"] >= 1)
        assert cluster.stop_process(name, signal.SIGTERM, timeout_s=60, group=False) == 0
        handed = get(cluster, job["id"])
        assert handed["status"] == "queued" and handed["progress"]["step"] < 40
    finally:
        for index in range(len(others)):
            cluster.start_render_worker(index, model=EDIT_MODEL)
    final = wait_terminal(cluster.api_url, job["id"], timeout_s=180)
    assert final["status"] == "succeeded" and final["attempts"] == 2
